"""Small image folders of real JPEG files, written by the tests that need them."""
import os

import numpy as np
from PIL import Image


def write_jpeg_folder(root: str, classes: int = 3, train: int = 8, test: int = 2, size=(20, 20),
                      test_split: str = "val", seed: int = 0) -> str:
    """``root``/train/class<k>/<i>.jpg and ``root``/<test_split>/..., every class a different mean colour.

    size: (height, width) of the images. Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), (test_split, test)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(50 + 150 * c / max(classes - 1, 1), 30, (*size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root
