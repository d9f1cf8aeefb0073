"""main_imagenet.py --method lmcl on the tiny JPEG folder of tests/test_main_imagenet.py: a few steps with
memory banks and meta steps, a kill -9 and --resume bitwise equal to an uninterrupted run, --evaluate,
export without auxiliary branches, the ImageNet defaults."""
import json
import signal

import pytest
import torch

import main_imagenet
import models
from models.export import export_network
from models.lmcl import build_lmcl_cohort
from tests.script_helpers import run_forked, run_in_process
from tests.test_main_imagenet import write_folder
from tests.utils.test_loop import assert_bitwise_equal
from utils.checkpoint import load_checkpoint

ARCH = "shufflenet_v2_x0_5"  # the smallest ImageNet network with an L-MCL variant


def lmcl_flags(data) -> list:
    """One epoch of 3 steps (6 images each), meta steps at steps 0 and 2."""
    return ["--method", "lmcl", "--data", str(data), "--image-size", "32", "--arch", ARCH,
            "--number-net", "2", "--neg_k", "8", "--batch-size", "6", "--epochs", "1", "--init-lr", "0.01",
            "--meta-freq", "2", "--feat-dim", "32", "--num-workers", "0", "--no-progress", "--device", "cpu",
            "--threads", "1"]


@pytest.fixture(scope="module")
def lmcl_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet_lmcl_data")
    write_folder(root / "train", 6)
    write_folder(root / "val", 2, seed=1)
    return root


@pytest.fixture(scope="module")
def lmcl_run(tmp_path_factory, lmcl_data):
    runs = tmp_path_factory.mktemp("imagenet_lmcl_runs")
    assert main_imagenet.main(lmcl_flags(lmcl_data) + ["--checkpoint-dir", str(runs), "--run-name", "r"]) == 0
    return runs / "r", lmcl_data


def test_kill_9_mid_epoch_then_resume_is_bitwise_equal(lmcl_data, tmp_path):
    """Killed right after the last step (a meta step), before its checkpoint, resumed: networks, auxiliary
    branches, heads, weight network and its optimizer, aggregator and memory banks end as in one run."""
    flags = lmcl_flags(lmcl_data) + ["--deterministic", "--save-every-steps", "1", "--run-name", "r"]
    full = run_in_process(main_imagenet.main, flags + ["--checkpoint-dir", str(tmp_path / "a")])
    assert full.returncode == 0, full.stderr[-3000:]
    args = flags + ["--checkpoint-dir", str(tmp_path / "b")]
    killed = run_forked(main_imagenet.main, args, {"MCL_DEBUG_SIGNAL_AFTER_STEPS": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = load_checkpoint(str(tmp_path / "b" / "r" / "checkpoint.pth.tar"))
    assert (partial["epoch"], partial["step"], partial["finished"]) == (0, 2, False)
    resumed = run_in_process(main_imagenet.main, args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = load_checkpoint(str(tmp_path / "a" / "r" / "checkpoint.pth.tar"))
    got = load_checkpoint(str(tmp_path / "b" / "r" / "checkpoint.pth.tar"))
    assert got["finished"] and set(got["extra"]) >= {"contrast", "weight_net", "weight_optimizer", "aggregator"}
    for key in ("model", "heads", "optimizer", "extra", "best_acc", "best_epoch"):
        assert_bitwise_equal(reference[key], got[key], key)


def test_lmcl_run_with_memory_banks(lmcl_run):
    run, _ = lmcl_run
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for term in ("loss_cls", "loss_kd", "vcl", "soft_vcl", "icl", "soft_icl"):
        assert record["train"][term] > 0, term
    assert len(record["test"]["top1"]) == len(record["test"]["agg_top1"]) == 2
    config = json.loads((run / "config.json").read_text())
    assert (config["alpha"], config["beta"], config["epochs"]) == (0.01, 0.01, 1)  # --epochs given
    ckpt = load_checkpoint(str(run / "checkpoint.pth.tar"))
    assert ckpt["method"] == "lmcl" and ckpt["extra"]["weight_optimizer"]["state"]
    banks = ckpt["extra"]["contrast"]
    assert banks["memory_0"].shape == (18, 32)
    # Every image was visited once: every row was refreshed into a unit vector.
    assert torch.allclose(banks["memory_1"].norm(dim=1), torch.ones(18), atol=1e-5)
    assert load_checkpoint(str(run / "best.pth.tar"))["extra"]["contrast"] is None


def test_evaluate_and_export(lmcl_run, capsys):
    run, data = lmcl_run
    capsys.readouterr()
    argv = ["--data", str(data), "--image-size", "32", "--device", "cpu", "--num-workers", "0", "--evaluate",
            "--evaluate-checkpoint", str(run / "best.pth.tar")]
    assert main_imagenet.main(argv) == 0
    out = capsys.readouterr().out
    assert "on 6 validation images" in out and f"net 1 ({ARCH}) aggregated" in out
    payload, _ = export_network(str(run), net_index=0)
    net = models.get_model(payload["arch"], payload["num_classes"])
    net.load_state_dict(payload["state_dict"])
    cohort = build_lmcl_cohort(ARCH, 2, 3)
    cohort.load_state_dict(load_checkpoint(str(run / "best.pth.tar"))["model"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.eval()(x)[0], cohort.eval()(x)[0][0][-1])


def test_imagenet_defaults():
    args = main_imagenet.parse_args(["--method", "lmcl"])
    assert (args.alpha, args.gamma, args.beta, args.lam, args.epochs) == (0.01, 1.0, 0.01, 1.0, 100)
    assert (args.meta_freq, args.tau, args.weight_decay, args.neg_k, args.nce_m) == (500, 0.07, 1e-4, 8192, 0.5)
    assert not args.vcl_partner_memory
    mcl = main_imagenet.parse_args([])
    assert (mcl.alpha, mcl.epochs) == (0.0, 90)
