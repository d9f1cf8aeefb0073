"""main_cifar.py end to end on tiny synthetic data: every mode of the CLI, the run directory."""
import json
import subprocess
import sys

import pytest
import torch

import main_cifar
from data import folder as data_folder
from models import get_model
from tests.image_files import write_jpeg_folder
from tests.script_helpers import load_script, run_cli, run_in_process
from tests.two_nodes import free_port
from utils.checkpoint import load_checkpoint

from tests import ROOT  # noqa: E402
TINY = ["--dataset", "synthetic", "--synthetic-size", "200", "--synthetic-classes", "10", "--batch-size", "16",
        "--m-per-class", "2", "--epochs", "1", "--max-train-batches", "2", "--max-eval-batches", "2",
        "--num-workers", "0", "--no-progress", "--eval-batch-size", "32"]
MCL = ["--alpha", "0.1", "--gamma", "1.", "--beta", "0.1", "--lam", "1."]


def train(tmp_path, *extra, run_name="run"):
    argv = TINY + ["--checkpoint-dir", str(tmp_path), "--run-name", run_name] + list(extra)
    assert main_cifar.main(argv) == 0
    return tmp_path / run_name


def records(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_baseline_run_writes_the_run_directory(tmp_path):
    run = train(tmp_path, "--arch", "resnet32", "--number-net", "2")
    for name in ("checkpoint.pth.tar", "best.pth.tar", "config.json", "metrics.jsonl", "summary.json", "log.txt"):
        assert (run / name).exists(), name
    assert any((run / "tb").iterdir())
    rec = records(run)[0]
    assert len(rec["test"]["top1"]) == 2 and "ens_top1" in rec["test"]
    assert len(rec["test"]["nll"]) == len(rec["test"]["ece"]) == 2 and 0 <= rec["test"]["ens_ece"] <= 100
    assert rec["test"]["loss"] == pytest.approx(sum(rec["test"]["nll"]) / 2)
    assert rec["train"]["vcl"] == rec["train"]["icl"] == 0.0
    ckpt = load_checkpoint(str(run / "checkpoint.pth.tar"))
    assert ckpt["heads"] is None and ckpt["finished"] and ckpt["topology"] == "independent"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_acc"] == max(rec["test"]["top1"])
    assert summary["last_mean_top1"] == pytest.approx(sum(rec["test"]["top1"]) / 2)
    assert summary["last_ens_nll"] == rec["test"]["ens_nll"] and summary["last_ece"] == rec["test"]["ece"]


def test_mcl_x2_has_all_four_contrastive_terms(tmp_path):
    run = train(tmp_path, "--arch", "resnet32", "--number-net", "2", *MCL)
    tr = records(run)[0]["train"]
    for term in ("vcl", "soft_vcl", "icl", "soft_icl"):
        assert tr[term] > 0, term
    ckpt = load_checkpoint(str(run / "checkpoint.pth.tar"))
    assert ckpt["heads"] is not None and len(ckpt["heads"]) > 0


def test_mcl_x3_is_branched_with_logit_distillation(tmp_path):
    run = train(tmp_path, "--arch", "resnet32", "--number-net", "3", "--logit-distill", *MCL)
    ckpt = load_checkpoint(str(run / "checkpoint.pth.tar"))
    assert ckpt["topology"] == "branched"
    assert records(run)[0]["train"]["loss_kd"] > 0
    assert len(records(run)[0]["test"]["top1"]) == 3


def test_mixed_cohort_and_evaluate_of_the_best(tmp_path, capsys):
    run = train(tmp_path, "--arch", "resnet32,wrn_16_2", "--number-net", "2", *MCL)
    capsys.readouterr()
    argv = TINY + ["--arch", "resnet32,wrn_16_2", "--evaluate", "--evaluate-checkpoint", str(run / "best.pth.tar"),
                   "--checkpoint-dir", str(tmp_path)]
    assert main_cifar.main(argv) == 0
    out = capsys.readouterr().out
    assert "net 1 (wrn_16_2)" in out and "ensemble" in out
    ensemble = next(line for line in out.splitlines() if line.strip().startswith("ensemble:"))
    assert " NLL " in ensemble and " ECE " in ensemble


def test_fast_path_runs(tmp_path):
    run = train(tmp_path, "--arch", "resnet32", "--number-net", "2", "--fast", *MCL)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["amp"] == "bf16" and cfg["channels_last"] and cfg["data_path"] == "tensor"


def test_help_lists_every_original_flag():
    out = run_in_process(main_cifar.main, ["--help"])
    assert out.returncode == 0
    for flag in ("--data", "--dataset", "--arch", "--init-lr", "--weight-decay", "--lr-type", "--milestones",
                 "--epochs", "--batch-size", "--num-workers", "--gpu-id", "--manual_seed", "--resume",
                 "--resume-checkpoint", "--evaluate", "--evaluate-checkpoint", "--number-net", "--logit-distill",
                 "--checkpoint-dir", "--kd_T", "--tau", "--alpha", "--gamma", "--beta", "--lam", "--feat-dim"):
        assert flag in out.stdout, flag


TORCHRUN_ARGS = TINY + ["--arch", "resnet32", "--number-net", "2", *MCL, "--run-name", "ddp", "--device", "cpu"]


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    """torchrun with 2 CPU processes: both ranks hold the same weights; rank 0 writes the run directory."""
    script = tmp_path / "ddp_check.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import main_cifar, utils.loop as eng\n"
        "orig = eng.RunLoop.fit\n"
        "def fit(self):\n"
        "    code = orig(self)\n"
        "    flat = torch.cat([p.detach().flatten() for p in self.method.model.parameters()])\n"
        "    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]\n"
        "    dist.all_gather(parts, flat)\n"
        "    assert torch.equal(parts[0], parts[1]), 'ranks differ'\n"
        "    print('RANKS-EQUAL', dist.get_rank(), flush=True)\n"
        "    return code\n"
        "eng.RunLoop.fit = fit\n"
        "main_cifar.main(sys.argv[1:])\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), *TORCHRUN_ARGS, "--checkpoint-dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("RANKS-EQUAL") == 2
    run = tmp_path / "ddp"
    for name in ("checkpoint.pth.tar", "best.pth.tar", "config.json", "metrics.jsonl", "summary.json"):
        assert (run / name).exists(), name
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    # Every image of the tiny test set counted once over both ranks.
    assert len(records(run)) == 1


def test_gathered_contrast_gradient_matches_one_process():
    """all_gather_grad + DDP averaging gives the gradient of one process on the global batch."""
    from tests.ddp_grad_check import run_check

    run_check()


@pytest.mark.parametrize("number_net", [2, 3], ids=["independent", "branched"])
def test_exported_network_gives_the_cohort_logits(tmp_path, number_net):
    """A short real run, then scripts/export.py: the exported net alone equals its place in the cohort."""
    import models
    from models.export import export_network

    run = train(tmp_path, "--arch", "resnet32", "--number-net", str(number_net), *MCL)
    ckpt = load_checkpoint(str(run / "best.pth.tar"))
    cohort = models.build_cohort("resnet32", number_net, ckpt["num_classes"], ckpt["topology"])
    cohort.load_state_dict(ckpt["model"])
    cohort.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        cohort_logits, _ = cohort(x)
    out = tmp_path / "net.pth"
    script = run_in_process(load_script("export").main, [str(run), "--net-index", "1", "--out", str(out)])
    assert script.returncode == 0, script.stderr
    payload = torch.load(out, weights_only=False)
    net = models.get_model(payload["arch"], payload["num_classes"])
    net.load_state_dict(payload["state_dict"])
    with torch.no_grad():
        logits, _ = net.eval()(x)
    assert torch.equal(logits, cohort_logits[1])
    best, _ = export_network(str(run))  # without --net-index: the best network of the best epoch
    assert best["net_index"] in range(number_net)


# ----------------------------------------------------------------------------- your own data and networks

FOLDER = ["--dataset", "folder", "--image-size", "16", "--batch-size", "6", "--m-per-class", "2", "--epochs", "1",
          "--max-train-batches", "2", "--num-workers", "0", "--no-progress", "--eval-batch-size", "4", *MCL]


def test_a_folder_of_jpegs_trains_the_same_on_both_paths(tmp_path, capsys, monkeypatch):
    root = write_jpeg_folder(str(tmp_path / "images"), classes=3, train=8, test=2, size=(20, 20))
    runs = {}
    for path in ("pil", "tensor"):
        argv = FOLDER + ["--data", root, "--data-path", path, "--checkpoint-dir", str(tmp_path), "--run-name", path]
        assert main_cifar.main(argv) == 0
        runs[path] = tmp_path / path
    out = capsys.readouterr().out
    assert "decoding the 24 train + 6 test images of 16 px once into one uint8 tensor" in out
    assert "3 classes, 24 train / 6 test images" in out and "per 16px image" in out
    pil, tensor = records(runs["pil"])[0], records(runs["tensor"])[0]
    assert pil["train"] == tensor["train"] and pil["test"] == tensor["test"]
    for run in runs.values():
        stats = json.loads((run / "normalization.json").read_text())
        config = json.loads((run / "config.json").read_text())
        assert config["normalization"] == {"mean": stats["mean"], "std": stats["std"]}
        assert 0.2 < stats["mean"][0] < 0.8

    # --evaluate: the normalisation of the checkpoint; a set too large for memory falls back to PIL, saying so
    monkeypatch.setattr(data_folder, "available_host_memory", lambda: 1000)
    argv = FOLDER + ["--data", root, "--data-path", "tensor", "--checkpoint-dir", str(tmp_path), "--run-name", "pil",
                     "--evaluate"]
    assert main_cifar.main(argv) == 0
    out = capsys.readouterr().out
    assert "would not fit in memory" in out and "using --data-path pil instead" in out
    assert f"net 0 (resnet32): top-1 {pil['test']['top1'][0]:.2f}" in out


def test_given_normalisation_wins(tmp_path):
    root = write_jpeg_folder(str(tmp_path / "images"), classes=3, train=2, test=1)
    run = train(tmp_path, "--dataset", "folder", "--data", root, "--batch-size", "6", "--mean", "0.4", "0.5", "0.6",
                "--std", "0.2", "0.2", "0.2", "--max-train-batches", "1")
    assert json.loads((run / "config.json").read_text())["normalization"]["mean"] == [0.4, 0.5, 0.6]
    assert not (run / "normalization.json").exists()


def test_the_m_per_class_error_names_every_fix(tmp_path, capsys):
    argv = TINY + ["--synthetic-classes", "3", "--checkpoint-dir", str(tmp_path)]
    code, _, err = run_cli(main_cifar.main, argv, capsys)
    assert code == 2 and err.count("\n") == 1
    for flag in ("--batch-size", "--m-per-class", "--synthetic-classes"):
        assert flag in err


def test_a_runs_config_json_reruns_it_exactly(tmp_path, capsys):
    first = train(tmp_path, "--arch", "resnet32", *MCL, "--seed", "4")
    config = json.loads((first / "config.json").read_text())
    provenance = config["provenance"]
    for key in ("command", "git", "host", "cpu", "gpus", "cuda", "cudnn", "packages"):
        assert key in provenance, key
    assert provenance["arguments"][-2:] == ["--seed", "4"]  # run from Python: the arguments it parsed
    assert main_cifar.main(["--config", str(first / "config.json"), "--run-name", "again"]) == 0
    again = tmp_path / "again"
    assert json.loads((again / "config.json").read_text())["manual_seed"] == 4
    for a, b in zip(records(first), records(again)):
        assert a["train"] == b["train"] and a["test"] == b["test"]


def test_init_from_starts_a_network_from_a_saved_state_dict(tmp_path, capsys):
    torch.manual_seed(7)
    path = str(tmp_path / "resnet32.pth")
    torch.save(get_model("resnet32", 10).state_dict(), path)
    run = train(tmp_path, "--arch", "resnet32,wrn_16_2", "--init-from", f"0={path}", "--epochs", "1")
    assert f"network 0 (resnet32) starts from {path}" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["init_from"] == [f"0={path}"]
    code, _, err = run_cli(main_cifar.main, TINY + ["--init-from", f"2={path}", "--checkpoint-dir", str(tmp_path)],
                           capsys)
    assert code == 2 and "network 2 does not exist (--number-net 2: 0..1)" in err


def test_a_timm_network_in_a_cohort(tmp_path, capsys):
    pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    run = train(tmp_path, "--arch", "timm:convnext_atto,resnet32", *MCL, "--max-train-batches", "1",
                "--max-eval-batches", "1")
    assert "independent cohort of 2: timm:convnext_atto, resnet32" in capsys.readouterr().out
    assert len(records(run)[0]["test"]["top1"]) == 2


def test_without_timm_a_timm_name_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    code, _, err = run_cli(main_cifar.main, TINY + ["--arch", "timm:convnext_atto,resnet32",
                                                    "--checkpoint-dir", str(tmp_path)], capsys)
    assert code == 2 and err.count("\n") == 1 and "pip install timm" in err
