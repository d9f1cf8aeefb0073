"""scripts/study_cifar.py end to end on a tiny synthetic protocol, and main_cifar.py --train-per-class."""
import json
import os

import numpy as np
import pytest

from data.pipeline import class_balanced_subset, load_arrays
from utils.errors import ConfigError

from tests.script_helpers import load_script, run_in_process

# Float32 only (the dry run below checks the --fast commands) and one seed (tests/utils/test_tables.py
# checks the grouping of seeds): every run is a process of its own, and bf16 is emulated, and slow, on CPUs
# without AVX512-BF16.
TINY = ["--dataset", "synthetic", "--epochs", "2", "--train-per-class", "20", "--m-per-class", "4",
        "--fast-seeds", "--fp32-seeds", "0"]
TINY_RUN = ["--", "--synthetic-size", "200", "--synthetic-classes", "4", "--batch-size", "16",
            "--max-train-batches", "1", "--max-eval-batches", "1"]


def run_study(tmp_path, *extra):
    """scripts/study_cifar.py in this process (its runs are processes of their own)."""
    argv = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "study"), *TINY, *extra, *TINY_RUN]
    return run_in_process(load_script("study_cifar").main, argv)


def test_study_runs_every_setting_and_writes_the_table(tmp_path):
    done = run_study(tmp_path)
    assert done.returncode == 0, done.stderr
    names = sorted(os.listdir(tmp_path / "study"))
    runs = ["fp32-baseline-seed0", "fp32-mcl-seed0"]
    for run in runs:
        assert run in names
        config = json.load(open(tmp_path / "study" / run / "config.json"))
        assert config["train_per_class"] == 20 and config["epochs"] == 2
        assert config["amp"] == "none"
        assert config["data_path"] == "tensor" and config["channels_last"]
        assert (config["alpha"], config["gamma"], config["beta"], config["lam"]) == (
            (0.1, 1.0, 0.1, 1.0) if "mcl" in run else (0.0, 0.0, 0.0, 0.0))
        assert os.path.exists(tmp_path / "study" / run / "summary.json")
    table = open(tmp_path / "study" / "study.md").read()
    for metric in ("Metric: last", "Metric: paper", "Metric: ensemble"):
        assert metric in table
    assert "| Network | Baseline | MCL(×2) |" in table and "| ResNet-32 |" in table

    again = run_study(tmp_path)  # finished runs are skipped, not retrained
    assert again.returncode == 0, again.stderr
    metrics = open(tmp_path / "study" / "fp32-mcl-seed0" / "metrics.jsonl").read()
    assert metrics.count("\n") == 2


def test_study_dry_run_prints_the_commands(tmp_path):
    done = run_in_process(load_script("study_cifar").main, ["--data", "D", "--out", "O", "--dry-run"])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 8  # fast seeds 0-2 and fp32 seed 0, baseline and MCL each
    assert all("--train-per-class 1000" in line and "--epochs 20" in line and "--max-eval-batches 20" in line
               for line in lines)
    assert sum("--fast" in line for line in lines) == 6


def test_study_bad_flag_is_one_line(tmp_path):
    done = run_in_process(load_script("study_cifar").main, ["--data", "D", "--jobs", "0"])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --jobs must be at least 1 (got 0)"]


def test_class_balanced_subset_takes_the_first_images_of_each_class():
    data = load_arrays("synthetic", "", synthetic_size=200, synthetic_classes=4)
    subset = class_balanced_subset(data, 7)
    assert np.bincount(subset.train_labels).tolist() == [7, 7, 7, 7]
    for c in range(4):
        first = np.flatnonzero(data.train_labels == c)[:7]
        assert np.array_equal(subset.train_images[subset.train_labels == c], data.train_images[first])
    assert subset.test_images is data.test_images
    with pytest.raises(ConfigError, match="--train-per-class 51"):
        class_balanced_subset(data, 51)
