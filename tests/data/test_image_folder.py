"""data/image_folder.py: listing the class folders with a progress bar gives the same samples."""
import sys

import numpy as np
from PIL import Image

from data.image_folder import TolerantImageFolder


def test_indexing_with_a_bar_lists_the_same_samples(tmp_path, monkeypatch):
    for c in range(3):
        (tmp_path / f"class{c}" / "sub").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * c, np.uint8)).save(tmp_path / f"class{c}" / f"{i}.png")
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"class{c}" / "sub" / "x.png")
    (tmp_path / "class1" / "notes.txt").write_text("not an image")
    plain = TolerantImageFolder(str(tmp_path))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    listed = TolerantImageFolder(str(tmp_path), progress=True)
    assert listed.samples == plain.samples and len(plain.samples) == 9 and listed.classes == plain.classes
