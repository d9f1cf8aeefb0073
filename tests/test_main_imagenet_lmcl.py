"""main_imagenet.py --method lmcl on the tiny JPEG folder of tests/test_main_imagenet.py: a few steps with
memory banks and meta steps, --evaluate, export without auxiliary branches, the ImageNet defaults."""
import json

import pytest
import torch

import main_imagenet
import models
from models.export import export_network
from models.lmcl import build_lmcl_cohort
from tests.test_main_imagenet import write_folder
from utils.checkpoint import load_checkpoint

ARCH = "shufflenet_v2_x0_5"  # the smallest ImageNet network with an L-MCL variant


@pytest.fixture(scope="module")
def lmcl_run(tmp_path_factory):
    """One epoch of 3 steps (6 images each), meta steps after steps 0 and 2."""
    root = tmp_path_factory.mktemp("imagenet_lmcl")
    write_folder(root / "data" / "train", 6)
    write_folder(root / "data" / "val", 2, seed=1)
    argv = ["--method", "lmcl", "--data", str(root / "data"), "--image-size", "32", "--arch", ARCH,
            "--number-net", "2", "--neg_k", "8", "--batch-size", "6", "--epochs", "1", "--init-lr", "0.01",
            "--meta-freq", "2", "--feat-dim", "32", "--num-workers", "0", "--no-progress", "--device", "cpu",
            "--threads", "1", "--checkpoint-dir", str(root / "runs"), "--run-name", "r"]
    assert main_imagenet.main(argv) == 0
    return root / "runs" / "r", root / "data"


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
