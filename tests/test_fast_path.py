"""Same learning: main_cifar.py --fast (bf16 autocast, channels_last, tensor data) learns like the fp32 default.

The same MCL x2 run (synthetic set, 4 classes, 960 training and 1,000 test images, 8 epochs
of 30 steps, seed 0) once in float32 and once with --fast, as two processes side by side
(one core each). The two trajectories cannot be bitwise equal: bf16 rounds every
convolution. The run is long enough for both to level off, so the final accuracies can be
compared to within 1 point. Measured on 2 cores for seeds 0-3 (last-epoch top-1 of the two
networks, mean; best single network):

    seed   fp32 mean  fast mean  |diff|    fp32 best  fast best  |diff|
    0      95.85      95.00      0.85      96.1       96.0       0.1
    1      95.70      95.20      0.50      96.3       95.4       0.9
    2      95.90      95.40      0.50      96.1       95.8       0.3
    3      95.45      95.50      0.05      96.5       96.1       0.4

(fast with the fused BatchNorm + ReLU kernel; before it, fast gave 95.40 / 95.9, 96.30 /
96.5, 95.10 / 95.5 and 95.15 / 96.0: the same spread, on either side of fp32.)
Training loss per epoch (the whole MCL objective): fast differs from fp32 of the same seed
by at most 16 % on any epoch over those seeds, while fp32 itself differs by up to 38 %
between two seeds. At a shorter length (4 epochs of 480 images) the accuracies are still
climbing and differ by up to 2.5 points between seeds of either mode, so 1 point could not
be told from noise there.

It takes minutes, so it runs only with ``--slow`` (``bash scripts/test.sh --slow``), and only on
a CPU with native bfloat16: one that emulates it would take over half an hour for the --fast run.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from utils.precision import cpu_has_native_bf16

from tests import ROOT  # noqa: E402
CONFIG = ["--dataset", "synthetic", "--synthetic-size", "960", "--synthetic-test-size", "1000",
          "--synthetic-classes", "4", "--batch-size", "32", "--m-per-class", "8", "--epochs", "8",
          "--init-lr", "0.05", "--eval-batch-size", "250", "--num-workers", "0", "--no-progress",
          "--arch", "resnet32", "--number-net", "2", "--alpha", "0.1", "--gamma", "1.", "--beta", "0.1",
          "--lam", "1.", "--manual_seed", "0", "--threads", "1"]
EPOCHS = 8
ACCURACY_POINTS = 1.0
LOSS_RTOL = 0.2


def start(tmp_path, name, *extra):
    cmd = [sys.executable, "main_cifar.py", *CONFIG, "--checkpoint-dir", str(tmp_path), "--run-name", name, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics(tmp_path, name, process):
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-2000:]
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def mean(values):
    return sum(values) / len(values)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU emulates bfloat16 (no AVX512-BF16 or AMX): the "
                                                      "--fast run would take over half an hour")
def test_fast_path_learns_like_fp32(tmp_path):
    runs = {"fp32": start(tmp_path, "fp32"), "fast": start(tmp_path, "fast", "--fast")}
    reference, fast = (metrics(tmp_path, name, process) for name, process in runs.items())
    assert len(reference) == len(fast) == EPOCHS
    ref_loss = [r["train"]["loss"] for r in reference]
    fast_loss = [r["train"]["loss"] for r in fast]
    assert fast_loss == pytest.approx(ref_loss, rel=LOSS_RTOL), (ref_loss, fast_loss)
    assert fast_loss[-1] < fast_loss[0] / 1.5  # it trained
    ref_top1, fast_top1 = mean(reference[-1]["test"]["top1"]), mean(fast[-1]["test"]["top1"])
    assert ref_top1 > 90 and fast_top1 > 90, (ref_top1, fast_top1)  # levelled off (chance: 25)
    assert abs(fast_top1 - ref_top1) <= ACCURACY_POINTS, (ref_top1, fast_top1)
    best_ref, best_fast = reference[-1]["best_acc"], fast[-1]["best_acc"]
    assert abs(best_fast - best_ref) <= ACCURACY_POINTS, (best_ref, best_fast)


def test_backward_and_step_through_a_scaler_takes_the_unscaled_step():
    from utils.precision import backward_and_step

    torch.manual_seed(0)
    x, target = torch.randn(8, 3), torch.randn(8, 2)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=1024.0)):
        torch.manual_seed(1)
        layer = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            optimizer.zero_grad()
            backward_and_step(torch.nn.functional.mse_loss(layer(x), target), optimizer, scaler)
        results.append(layer.weight.detach().clone())
    torch.testing.assert_close(results[0], results[1])
