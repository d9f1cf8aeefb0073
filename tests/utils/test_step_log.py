"""A training step never waits for the device; the loop reads the steps' values every few steps,
and a NaN on one rank stops every rank (utils/step_log.py, utils/loop.py)."""
import math
import os

import torch

import main_cifar
from utils.checkpoint import load_checkpoint
from utils.loop import RunLoop, first_non_finite
from utils.step_log import PendingSteps

from tests.two_nodes import RUN, two_nodes


def test_a_read_gives_every_queued_step_and_finds_a_nan():
    pending = PendingSteps(("loss", "vcl"))
    pending.add(0, torch.tensor([1.5, 0.25]), 8)
    pending.add(1, torch.tensor([float("nan"), 0.5]), 8)
    reading = pending.read(None, torch.device("cpu"))
    assert len(pending) == 0 and reading.non_finite and reading.signum is None
    assert reading.steps[0] == (0, {"loss": 1.5, "vcl": 0.25}, 8)
    assert reading.steps[1][0] == 1 and math.isnan(reading.steps[1][1]["loss"])
    empty = pending.read(15, torch.device("cpu"))
    assert empty.steps == [] and not empty.non_finite and empty.signum == 15


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def test_a_step_reads_nothing_on_the_host_and_values_are_read_every_ten_steps(tmp_path, monkeypatch):
    """The fast path for 11 steps of one epoch, one process: no tensor is read on the host inside a training
    step (what would wait for a GPU; only a GPU can count the synchronisations inside torch's own
    operations), and the queued values are read after steps 1, 10 and 11 (the last)."""
    reads, host_reads, in_step = [], [], [False]
    real_read = PendingSteps.read

    def read(self, signum, device):
        reads.append(len(self))
        return real_read(self, signum, device)

    for name in HOST_READS:
        def wrapper(self, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            if in_step[0]:
                host_reads.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    real_step = RunLoop.train_step

    def train_step(self, raw):
        in_step[0] = True
        try:
            return real_step(self, raw)
        finally:
            in_step[0] = False

    monkeypatch.setattr(PendingSteps, "read", read)
    monkeypatch.setattr(RunLoop, "train_step", train_step)
    argv = ["--dataset", "synthetic", "--synthetic-size", "64", "--synthetic-classes", "8", "--batch-size", "4",
            "--m-per-class", "2", "--epochs", "1", "--max-train-batches", "11", "--max-eval-batches", "1",
            "--eval-batch-size", "16", "--num-workers", "0", "--no-progress", "--device", "cpu", "--arch", "resnet32",
            "--number-net", "2", "--alpha", "0.1", "--gamma", "1.", "--beta", "0.1", "--lam", "1.",
            "--logit-distill", "--save-every-steps", "0", "--checkpoint-dir", str(tmp_path),
            "--data-path", "tensor", "--channels-last"]  # --fast but float32: bf16 is slow on some CPUs
    assert main_cifar.main(argv) == 0
    assert host_reads == []
    assert reads == [1, 9, 1]


def main_with_a_nan_on_rank_1(argv):
    """main_cifar.main, where the third step's loss is NaN on rank 1 only."""
    import utils.supervised as supervised

    if os.environ["RANK"] == "1":
        real, calls = supervised.compute_loss, [0]

        def compute_loss(*args, **kwargs):
            terms = real(*args, **kwargs)
            calls[0] += 1
            if calls[0] == 3:
                terms["loss"] = terms["loss"] * float("nan")
            return terms

        supervised.compute_loss = compute_loss  # in the forked child only
    return main_cifar.main(argv)


def test_a_nan_on_one_rank_stops_every_rank_and_keeps_the_last_good_checkpoint(tmp_path):
    nodes = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    results = two_nodes(nodes, RUN[:-6] + ["--save-every-steps", "1", "--checkpoint-dir", "ck", "--run-name", "r"],
                        main=main_with_a_nan_on_rank_1)
    codes = [code for code, _, _ in results]
    lines = [err.strip().splitlines()[-1] if err.strip() else "" for _, _, err in results]
    assert codes == [3, 3], [err[-2000:] for _, _, err in results]
    assert lines[1].startswith("error: non-finite loss at epoch 1 step 2: loss=nan")
    assert lines[0].startswith("error: non-finite loss in another process by epoch 1 step 3")
    assert "the latest good checkpoint is ck/r/checkpoint.pth.tar" in lines[0]
    ckpt = load_checkpoint(os.path.join(nodes[0], "ck", "r", "checkpoint.pth.tar"))
    assert (ckpt["epoch"], ckpt["step"]) == (0, 2)
    assert first_non_finite({"model": ckpt["model"], "heads": ckpt["heads"],
                             "optimizer": ckpt["optimizer"]["state"]}) is None
