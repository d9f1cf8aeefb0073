"""utils/plots.py through scripts/summarize.py --plot: curves averaged over seeds, optional matplotlib."""
import os
import statistics
import sys

import pytest

from tests.script_helpers import script_cli
from utils.plots import group_curves
from utils.run_dirs import load_run

summarize_cli = script_cli("summarize")


def test_plot_without_matplotlib_says_how_to_install(runs_root, capsys, monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, out, err = summarize_cli([runs_root, "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 2 and out == ""
    assert err == "error: --plot needs matplotlib: pip install matplotlib (or pip install -e .[plot])\n"


def test_plot_writes_one_panel_per_group(runs_root, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = str(tmp_path / "curves.png")
    code, _, err = summarize_cli([runs_root, "--plot", path], capsys)
    assert code == 0 and "2 panels" in err
    assert os.path.getsize(path) > 0


def test_group_curves_average_over_seeds(runs_root):
    runs = [load_run(os.path.join(runs_root, f"baseline_s{s}")) for s in range(3)]
    curves = group_curves(runs)
    epochs, net0 = curves["net 0"]
    assert epochs == [1, 2, 3, 4]  # numbered from 1
    assert net0[1] == pytest.approx(statistics.fmean([60, 61, 63]))
    assert curves["ensemble"][1][0] == pytest.approx(statistics.fmean([52, 51, 53]))
    assert curves["lr"][1] == pytest.approx([0.1] * 4)
