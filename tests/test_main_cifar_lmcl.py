"""main_cifar.py --method lmcl end to end on tiny synthetic data: it learns, resumes bitwise after kill -9,
evaluates, exports one network without its auxiliary branches, runs under 2 gloo processes; its flags."""
import json
import math
import signal

import pytest
import torch

import main_cifar
import models
from models.export import export_network
from models.lmcl import build_lmcl_cohort
from tests.script_helpers import restored_global_state, run_forked, run_in_process
from tests.tiny_lmcl import TINY_ARCH
from tests.two_nodes import two_nodes
from tests.utils.test_loop import assert_bitwise_equal
from utils.checkpoint import load_checkpoint


# 4 classes, batches of 16 (4 per class), the tiny ResNet; one meta step per 6 steps.
TINY = ["--method", "lmcl", "--arch", TINY_ARCH, "--dataset", "synthetic", "--synthetic-size", "480",
        "--synthetic-test-size", "200", "--synthetic-classes", "4", "--batch-size", "16", "--m-per-class", "4",
        "--init-lr", "0.05", "--eval-batch-size", "100", "--num-workers", "0", "--no-progress", "--device", "cpu",
        "--threads", "1"]
LEARN = TINY + ["--epochs", "2", "--max-train-batches", "12", "--meta-freq", "6"]
# 1 epoch of 4 steps, a meta step after steps 0 and 2, a checkpoint after every step.
RESUME = TINY + ["--epochs", "1", "--max-train-batches", "4", "--max-eval-batches", "1", "--meta-freq", "2",
                 "--deterministic", "--save-every-steps", "1", "--feat-dim", "32"]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    base = tmp_path_factory.mktemp("lmcl")
    with restored_global_state():
        assert main_cifar.main(LEARN + ["--checkpoint-dir", str(base), "--run-name", "run"]) == 0
    return base / "run"


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lmcl_learns_and_writes_the_run_directory(learned):
    for name in ("checkpoint.pth.tar", "best.pth.tar", "config.json", "metrics.jsonl", "summary.json", "log.txt"):
        assert (learned / name).exists(), name
    last = records(learned)[-1]
    assert min(last["test"]["top1"]) > 50, last["test"]  # chance: 25
    assert len(last["test"]["agg_top1"]) == 2 and "ens_top1" in last["test"]
    for term in ("loss_cls", "loss_kd", "vcl", "soft_vcl", "icl", "soft_icl"):
        assert last["train"][term] > 0, term
    summary = json.loads((learned / "summary.json").read_text())
    assert summary["method"] == "lmcl" and summary["last_agg_top1"] == last["test"]["agg_top1"]
    assert summary["last_top1"] == last["test"]["top1"] and "final head" in summary["heads"]["top1"]
    config = json.loads((learned / "config.json").read_text())
    assert (config["alpha"], config["gamma"], config["beta"], config["lam"]) == (0.1, 1.0, 0.1, 1.0)
    ckpt = load_checkpoint(str(learned / "checkpoint.pth.tar"))
    assert ckpt["method"] == "lmcl" and ckpt["heads"] and ckpt["extra"]["weight_optimizer"]["state"]
    fresh = build_lmcl_cohort(TINY_ARCH, 2, 4).state_dict()
    assert ckpt["model"].keys() == fresh.keys() and any(k.startswith("nets.1.aux.") for k in fresh)
    # The weight network was trained (by the meta steps) and its optimizer holds momentum.
    assert ckpt["extra"]["weight_optimizer"]["state"]


def test_evaluate_names_the_heads(learned, capsys):
    capsys.readouterr()
    argv = TINY + ["--evaluate", "--evaluate-checkpoint", str(learned / "best.pth.tar")]
    assert main_cifar.main(argv) == 0
    out = capsys.readouterr().out
    assert "L-MCL" in out and f"net 1 ({TINY_ARCH}) aggregated: top-1" in out and "ensemble: top-1" in out
    best = records(learned)[load_checkpoint(str(learned / "best.pth.tar"))["best_epoch"] - 1]["test"]
    assert f"net 0 ({TINY_ARCH}): top-1 {best['top1'][0]:.2f}" in out


def test_export_keeps_the_network_without_auxiliary_branches(learned, tmp_path):
    payload, _ = export_network(str(learned), net_index=1)
    net = models.get_model(payload["arch"], payload["num_classes"])
    net.load_state_dict(payload["state_dict"])  # strict: no auxiliary branch left
    ckpt = load_checkpoint(str(learned / "best.pth.tar"))
    cohort = build_lmcl_cohort(TINY_ARCH, 2, 4)
    cohort.load_state_dict(ckpt["model"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits, _ = cohort.eval()(x)
        alone, _ = net.eval()(x)
    assert torch.equal(alone, logits[1][-1])


def test_kill_9_mid_epoch_then_resume_is_bitwise_equal(tmp_path):
    """Killed during step 3 (its checkpoint not written; step index 2 runs a meta step), resumed: the same
    final state."""
    full = run_in_process(main_cifar.main, RESUME + ["--checkpoint-dir", str(tmp_path / "a"), "--run-name", "r"])
    assert full.returncode == 0, full.stderr[-3000:]
    args = RESUME + ["--checkpoint-dir", str(tmp_path / "b"), "--run-name", "r"]
    killed = run_forked(main_cifar.main, args, {"MCL_DEBUG_SIGNAL_AFTER_STEPS": "3"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = load_checkpoint(str(tmp_path / "b" / "r" / "checkpoint.pth.tar"))
    assert (partial["epoch"], partial["step"], partial["finished"]) == (0, 2, False)
    resumed = run_in_process(main_cifar.main, args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = load_checkpoint(str(tmp_path / "a" / "r" / "checkpoint.pth.tar"))
    got = load_checkpoint(str(tmp_path / "b" / "r" / "checkpoint.pth.tar"))
    assert got["finished"]
    for key in ("model", "heads", "optimizer", "extra", "best_acc", "best_epoch"):
        assert_bitwise_equal(reference[key], got[key], key)
    ref_lines = (tmp_path / "a" / "r" / "metrics.jsonl").read_text().splitlines()
    got_lines = (tmp_path / "b" / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["test"] for x in ref_lines] == [json.loads(x)["test"] for x in got_lines]


def test_fast_runs_the_backbones_in_bf16_and_the_meta_step_in_float32(tmp_path, monkeypatch):
    """--fast with L-MCL: the networks' forward under bf16 autocast, the meta step outside it on float32
    inputs (its second-order gradient needs the precision); finite losses, float32 weights."""
    import utils.lmcl_method

    seen = {"forward": [], "meta": []}
    meta_step, forward = utils.lmcl_method.meta_step, utils.lmcl_method.LMCLMethod.forward

    def recording_meta_step(forward_fn, params, buffers, inputs, *rest, **kwargs):
        seen["meta"].append((torch.is_autocast_enabled("cpu"), inputs.dtype,
                             inputs.is_contiguous(memory_format=torch.channels_last)))
        return meta_step(forward_fn, params, buffers, inputs, *rest, **kwargs)

    def recording_forward(self, batch, targets):
        seen["forward"].append(self.precision.amp)
        return forward(self, batch, targets)

    monkeypatch.setattr(utils.lmcl_method, "meta_step", recording_meta_step)
    monkeypatch.setattr(utils.lmcl_method.LMCLMethod, "forward", recording_forward)
    with restored_global_state():
        assert main_cifar.main(TINY + ["--epochs", "1", "--max-train-batches", "4", "--max-eval-batches", "1",
                                       "--meta-freq", "2", "--fast", "--checkpoint-dir", str(tmp_path),
                                       "--run-name", "r"]) == 0
    assert seen["meta"] == [(False, torch.float32, True)] * 2  # steps 0 and 2
    assert seen["forward"] == ["bf16"] * 4
    train = records(tmp_path / "r")[-1]["train"]
    assert all(math.isfinite(train[term]) for term in ("loss", "loss_cls", "vcl", "icl")), train
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (config["amp"], config["channels_last"], config["data_path"]) == ("bf16", True, "tensor")
    ckpt = load_checkpoint(str(tmp_path / "r" / "checkpoint.pth.tar"))
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values() if t.is_floating_point())


def main_checking_that_ranks_agree(argv):
    """main_cifar.main, and after training: the same weights on every rank, two meta steps run."""
    import torch.distributed as dist

    import utils.loop as loop

    fit = loop.RunLoop.fit

    def fit_then_compare(self):
        code = fit(self)
        method = self.method
        assert method.meta_steps == 2, method.meta_steps
        tensors = list(method.model.parameters()) + list(method.model.buffers()) + list(method.weight_net.parameters())
        flat = torch.cat([t.detach().float().flatten() for t in tensors])
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat)
        assert torch.equal(parts[0], parts[1]), "ranks differ"
        print("RANKS-EQUAL", dist.get_rank(), flush=True)
        return code

    loop.RunLoop.fit = fit_then_compare  # in the forked child only
    return main_cifar.main(argv)


def test_two_gloo_processes_agree(tmp_path):
    """2 CPU processes of one group, 3 steps with 2 meta steps: every rank ends with the same weights."""
    args = TINY + ["--epochs", "1", "--max-train-batches", "3", "--max-eval-batches", "1", "--meta-freq", "2",
                   "--checkpoint-dir", str(tmp_path / "ck"), "--run-name", "ddp"]
    results = two_nodes([str(tmp_path / "rank0"), str(tmp_path / "rank1")], args, main=main_checking_that_ranks_agree)
    for code, out, err in results:
        assert code == 0, err[-3000:]
        assert "RANKS-EQUAL" in out


def test_method_defaults_and_flags():
    lmcl = main_cifar.parse_args(["--method", "lmcl", "--alpha", "0"])
    assert (lmcl.alpha, lmcl.gamma, lmcl.beta, lmcl.lam, lmcl.meta_freq, lmcl.times) == (0.0, 1.0, 0.1, 1.0, 50, 2)
    assert not lmcl.exact_hypergradient and not lmcl.restore_bn_after_meta
    mcl = main_cifar.parse_args([])
    assert (mcl.method, mcl.alpha, mcl.gamma, mcl.beta, mcl.lam) == ("mcl", 0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("flags,words", [
    (["--number-net", "1"], "--number-net 2"),
    (["--logit-distill"], "--logit-distill"),
    (["--cohort", "branched"], "--cohort branched"),
    (["--arch", "mobilenet_v2"], "no L-MCL variant"),
    (["--meta-freq", "0"], "--meta-freq must be at least 1"),
])
def test_bad_lmcl_flags_are_one_line(flags, words, capsys):
    from tests.script_helpers import run_cli

    code, _, err = run_cli(main_cifar.main, ["--method", "lmcl", *flags], capsys)
    assert code == 2 and words in err and "Traceback" not in err, err


def test_help_has_the_lmcl_flags():
    out = run_in_process(main_cifar.main, ["--help"])
    for flag in ("--method", "--meta-freq", "--times", "--exact-hypergradient", "--restore-bn-after-meta",
                 "authors' defaults: --alpha 0.1"):
        assert flag in out.stdout, flag
