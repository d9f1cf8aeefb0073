"""Runs that survive: exact resume, graceful stops, kill -9, bad input, full disk, non-finite loss."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import main_cifar
from utils import checkpoint as ckpt_mod
from utils.checkpoint import atomic_save, load_checkpoint
from utils.cli import run_main
from utils.errors import CheckpointError

from tests import ROOT  # noqa: E402
from tests.script_helpers import run_forked, run_in_process, start_forked

# 2 epochs x 3 steps, MCL(x2) with logit distillation, deterministic on CPU.
RUN = ["--dataset", "synthetic", "--synthetic-size", "160", "--synthetic-classes", "8", "--batch-size", "16",
       "--m-per-class", "2", "--epochs", "2", "--max-train-batches", "3", "--max-eval-batches", "1",
       "--eval-batch-size", "16", "--num-workers", "0", "--no-progress", "--device", "cpu", "--deterministic",
       "--arch", "resnet32", "--number-net", "2", "--alpha", "0.1", "--gamma", "1.", "--beta", "0.1",
       "--lam", "1.", "--logit-distill", "--save-every-steps", "1"]


def cli(args, env_extra=None, timeout=300):
    """main_cifar.py ``args``: in this process, or in a forked child when the run is to be killed or
    signalled (``env_extra``). One intra-op thread either way (tests/conftest.py): the steps are tiny, and
    the comparisons need the same thread count in every run."""
    if env_extra is None:
        return run_in_process(main_cifar.main, args)
    return run_forked(main_cifar.main, args, env_extra, timeout=timeout)


def final_state(run_dir):
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pth.tar"))
    assert ckpt["finished"]
    return ckpt


def assert_bitwise_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("full")
    out = cli(RUN + ["--checkpoint-dir", str(base), "--run-name", "r"])
    assert out.returncode == 0, out.stderr
    return final_state(base / "r"), base / "r"


@pytest.mark.parametrize("kill_after,save_every", [(2, "1"), (4, "0")], ids=["mid-epoch", "between-epochs"])
def test_kill_9_then_resume_is_bitwise_equal(tmp_path, uninterrupted, kill_after, save_every):
    """Killed after step 2 (saves every step) or after step 4 (only epoch-end saves): resume, same result."""
    args = RUN + ["--checkpoint-dir", str(tmp_path), "--run-name", "r", "--save-every-steps", save_every]
    out = cli(args, {"MCL_DEBUG_SIGNAL_AFTER_STEPS": str(kill_after)})
    assert out.returncode == -signal.SIGKILL
    partial = load_checkpoint(str(tmp_path / "r" / "checkpoint.pth.tar"))
    assert not partial["finished"]
    if save_every == "0":
        assert (partial["epoch"], partial["step"]) == (1, 0)  # the epoch-end checkpoint
    out = cli(args + ["--resume"])
    assert out.returncode == 0, out.stderr
    resumed = final_state(tmp_path / "r")
    reference, ref_dir = uninterrupted
    for key in ("model", "heads", "optimizer", "best_acc", "best_epoch"):
        assert_bitwise_equal(reference[key], resumed[key], key)
    ref_metrics = (ref_dir / "metrics.jsonl").read_text().splitlines()
    got_metrics = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(got_metrics) == 2
    for a, b in zip(ref_metrics, got_metrics):
        ra, rb = json.loads(a), json.loads(b)
        assert ra["test"] == rb["test"] and ra["train"]["loss"] == pytest.approx(rb["train"]["loss"], rel=1e-12)


@pytest.mark.parametrize("sig,code", [("TERM", 0), ("INT", 130)])
def test_signal_finishes_the_step_saves_and_exits(tmp_path, uninterrupted, sig, code):
    args = RUN + ["--checkpoint-dir", str(tmp_path), "--run-name", "r", "--save-every-steps", "0"]
    out = cli(args, {"MCL_DEBUG_SIGNAL_AFTER_STEPS": f"2:{sig}"})
    assert out.returncode == code, out.stderr
    assert "--resume" in out.stderr and "checkpoint.pth.tar" in out.stderr
    saved = load_checkpoint(str(tmp_path / "r" / "checkpoint.pth.tar"))
    assert (saved["epoch"], saved["step"], saved["finished"]) == (0, 2, False)
    if sig == "INT":
        return  # resuming after a stop is the same path for both signals
    out = cli(args + ["--resume", "auto"])
    assert out.returncode == 0, out.stderr
    assert_bitwise_equal(uninterrupted[0]["model"], final_state(tmp_path / "r")["model"])


def test_resuming_a_finished_run_says_so(uninterrupted):
    _, run_dir = uninterrupted
    out = cli(RUN + ["--checkpoint-dir", str(run_dir.parent), "--run-name", "r", "--resume"])
    assert out.returncode == 0
    assert "already finished" in out.stdout


def test_original_resume_checkpoint_flag(uninterrupted, tmp_path):
    _, run_dir = uninterrupted
    out = cli(RUN + ["--checkpoint-dir", str(tmp_path), "--resume", "--resume-checkpoint",
                     str(run_dir / "checkpoint.pth.tar")])
    assert out.returncode == 0 and "already finished" in out.stdout


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        run_main(main_cifar.main, argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


BASE = ["--dataset", "synthetic", "--synthetic-size", "64", "--epochs", "1", "--num-workers", "0", "--no-progress"]


@pytest.mark.parametrize("extra,words", [
    (["--arch", "resnet33"], "resnet32"),
    (["--number-net", "0"], "--number-net"),
    (["--number-net", "1", "--beta", "0.1"], "--number-net 2"),
    (["--batch-size", "15", "--m-per-class", "2"], "not divisible"),
    (["--batch-size", "64", "--m-per-class", "2"], "classes"),
    (["--device", "cuda"], "CUDA"),
], ids=["arch", "number-net", "weights-n1", "divisible", "too-large", "cuda"])
def test_bad_flags_get_one_line(tmp_path, capsys, extra, words):
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("CUDA present")
    err = one_line_error(capsys, BASE + ["--checkpoint-dir", str(tmp_path)] + extra)
    assert words in err


def test_missing_and_malformed_dataset(tmp_path, capsys):
    (tmp_path / "cifar-100-python").mkdir()
    err = one_line_error(capsys, ["--dataset", "cifar100", "--data", str(tmp_path), "--checkpoint-dir",
                                  str(tmp_path / "ck")])
    assert "cifar-100-python" in err


def test_unwritable_checkpoint_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = one_line_error(capsys, BASE + ["--checkpoint-dir", str(blocker / "sub")])
    assert "--checkpoint-dir" in err


def test_bad_checkpoints(tmp_path, capsys, uninterrupted):
    _, run_dir = uninterrupted
    good = (run_dir / "checkpoint.pth.tar").read_bytes()
    truncated = tmp_path / "trunc.pth.tar"
    truncated.write_bytes(good[: len(good) // 2])
    err = one_line_error(capsys, BASE + ["--checkpoint-dir", str(tmp_path), "--resume", str(truncated)])
    assert "truncated" in err
    junk = tmp_path / "junk.pth.tar"
    torch.save({"net": {}}, junk)
    err = one_line_error(capsys, BASE + ["--checkpoint-dir", str(tmp_path), "--resume", str(junk)])
    assert "not a checkpoint" in err
    ckpt_path = str(run_dir / "checkpoint.pth.tar")
    err = one_line_error(capsys, BASE + ["--checkpoint-dir", str(tmp_path), "--arch", "wrn_16_2",
                                         "--resume", ckpt_path])
    assert "arch" in err
    err = one_line_error(capsys, BASE + ["--checkpoint-dir", str(tmp_path), "--arch", "resnet32",
                                         "--number-net", "3", "--resume", ckpt_path])
    assert "--number-net 2" in err and "--number-net 3" in err


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth.tar")
    atomic_save({"format": "mcl-checkpoint", "value": 1}, path)

    def fail_midway(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", fail_midway)
    with pytest.raises(CheckpointError, match="disk is full; the previous checkpoint is intact"):
        atomic_save({"format": "mcl-checkpoint", "value": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["value"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth.tar"]  # no temporary file left behind


def save_forever(argv):
    """Checkpoint i holds a tensor full of i; saves until killed."""
    i = 0
    while True:
        i += 1
        atomic_save({"format": "mcl-checkpoint", "i": i, "w": torch.full((512, 1024), float(i))}, argv[0])


def test_kill_9_during_a_save_loop_never_leaves_an_unreadable_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    for delay in (0.35, 0.65, 0.95):
        path.unlink(missing_ok=True)
        child = start_forked(save_forever, [str(path)])
        while not path.exists():  # at least one complete save
            time.sleep(0.005)
        time.sleep(delay * 0.2)
        child.kill()
        child.wait()
        ckpt = load_checkpoint(str(path))
        assert torch.equal(ckpt["w"], torch.full((512, 1024), float(ckpt["i"])))


def test_non_finite_loss_stops_with_the_terms_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    import utils.supervised as engine

    real = engine.compute_loss
    calls = {"n": 0}

    def nan_on_third(*a, **k):
        terms = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(engine, "compute_loss", nan_on_third)
    argv = BASE + ["--checkpoint-dir", str(tmp_path), "--run-name", "r", "--batch-size", "8", "--m-per-class", "2",
                   "--save-every-steps", "1", "--epochs", "1", "--alpha", "0.1"]
    with pytest.raises(SystemExit) as exc:
        run_main(main_cifar.main, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 3
    assert "non-finite loss at epoch 1 step 2" in err and "loss_cls=" in err and "vcl=" in err
    assert load_checkpoint(str(tmp_path / "r" / "checkpoint.pth.tar"))["step"] == 2


@pytest.mark.parametrize("lr", ["1e6", "1e38"])
def test_an_exploding_run_never_writes_a_poisoned_checkpoint(tmp_path, lr):
    """Huge learning rates overflow the weights; no checkpoint or metrics line with a NaN/inf is written,
    and the checkpoint the message names exists and is finite (or the message says none was written)."""
    run_dir = tmp_path / "r"
    out = cli(RUN + ["--checkpoint-dir", str(tmp_path), "--run-name", "r", "--init-lr", lr, "--epochs", "3"])
    assert out.returncode == 3, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite") and "Traceback" not in out.stderr
    from utils.loop import first_non_finite

    for name in ("checkpoint.pth.tar", "best.pth.tar"):
        if (run_dir / name).exists():
            ckpt = load_checkpoint(str(run_dir / name))
            assert first_non_finite({"model": ckpt["model"], "heads": ckpt["heads"] or {},
                                     "optimizer": ckpt["optimizer"]["state"]}) is None, name
    if "the latest good checkpoint is" in line:
        named = line.split("the latest good checkpoint is ")[1].split(";")[0]
        assert os.path.exists(named)
    else:
        assert "no checkpoint was written" in line
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        assert "NaN" not in metrics.read_text() and "Infinity" not in metrics.read_text()


def test_a_cohort_mismatch_names_the_cohort_flag(tmp_path, capsys, uninterrupted):
    """The resume hint names --cohort (there is no --topology flag)."""
    _, run_dir = uninterrupted
    err = one_line_error(capsys, RUN + ["--checkpoint-dir", str(tmp_path), "--cohort", "branched",
                                        "--resume", str(run_dir / "checkpoint.pth.tar")])
    assert "--topology" not in err and "--cohort independent" in err
    with pytest.raises(CheckpointError) as info:
        ckpt_mod.check_compatible({"topology": "independent"}, "x.pth.tar", topology="branched")
    assert "--topology" not in str(info.value) and "--cohort independent" in str(info.value)


# ----------------------------------------------------------------------------- resuming with other flags

def with_values(args, **values):
    """``args`` with the value after each ``--flag`` replaced (flag=value given as flag_name=value)."""
    args = list(args)
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        args[args.index(flag) + 1] = value
    return args


def test_resume_with_other_data_or_maths_is_refused_naming_every_flag(tmp_path, uninterrupted):
    """A run continued with another data set size and temperature would have overwritten config.json."""
    import shutil

    _, run_dir = uninterrupted
    copy = tmp_path / "r"
    shutil.copytree(run_dir, copy)
    config_before = (copy / "config.json").read_bytes()
    changed = with_values(RUN, synthetic_size="320", epochs="3")
    out = cli(changed + ["--tau", "0.2", "--checkpoint-dir", str(tmp_path), "--run-name", "r", "--resume"])
    err = out.stderr.strip()
    assert out.returncode == 2, err
    assert err.startswith("error: --resume ") and "\n" not in err and "Traceback" not in err
    assert "was trained with --tau 0.1 --synthetic-size 160, this run has --tau 0.2 --synthetic-size 320;" in err
    assert "--epochs" not in err.split(";")[0]  # --epochs may change: raise it to train longer
    assert (copy / "config.json").read_bytes() == config_before


def test_resume_on_another_dataset_names_the_dataset(tmp_path, uninterrupted):
    import numpy as np

    from tests.data.test_cifar import write_fake_cifar10

    _, run_dir = uninterrupted
    write_fake_cifar10(str(tmp_path / "data"), np.random.default_rng(0))
    out = cli(RUN + ["--dataset", "cifar10", "--data", str(tmp_path / "data"), "--checkpoint-dir", str(tmp_path),
                     "--resume", str(run_dir / "checkpoint.pth.tar")])
    err = out.stderr.strip()
    assert out.returncode == 2, err
    assert "was trained with --dataset synthetic" in err and "this run has --dataset cifar10" in err
    assert "\n" not in err and not (tmp_path / "config.json").exists()


def test_flags_that_may_change_on_resume(tmp_path, uninterrupted):
    """How and where a run runs (epochs, workers, device, progress, caps, ...) may change on resume."""
    import shutil

    from utils.script_setup import MAY_CHANGE_ON_RESUME

    assert {"epochs", "num_workers", "workers", "device", "threads", "no_progress", "print_freq", "save_every_steps",
            "max_train_batches", "max_eval_batches", "amp", "fast", "channels_last"} <= MAY_CHANGE_ON_RESUME
    _, run_dir = uninterrupted
    shutil.copytree(run_dir, tmp_path / "r")
    changed = with_values(RUN, epochs="3", save_every_steps="0", max_eval_batches="2")
    # --channels-last stands for the precision flags: bf16 is emulated, and slow, on CPUs without AVX512-BF16.
    out = cli(changed + ["--threads", "1", "--channels-last", "--checkpoint-dir", str(tmp_path), "--run-name", "r",
                         "--resume"])
    assert out.returncode == 0, out.stderr
    assert final_state(tmp_path / "r")["epoch"] == 3


def fake_checkpoint(path, script, arch="resnet32", number_net=2):
    """A finished checkpoint of ``script`` whose top-level fields match the resnet32 x 2 runs here."""
    torch.save({"format": "mcl-checkpoint", "version": 1, "script": script, "arch": arch, "number_net": number_net,
                "topology": "independent", "num_classes": 8, "config": {"script": script}, "epoch": 2, "step": 0,
                "finished": True, "model": {"encoders_q.0.conv1.weight": torch.zeros(1)}}, path)
    return str(path)


@pytest.mark.parametrize("flags", [["--resume"], ["--evaluate", "--evaluate-checkpoint"]], ids=["resume", "evaluate"])
def test_another_scripts_checkpoint_is_refused_in_one_line(tmp_path, capsys, flags):
    """A MoCo checkpoint given to main_cifar.py: neither 'nothing to do' nor a load_state_dict traceback."""
    path = fake_checkpoint(tmp_path / "moco.pth.tar", "main_moco_mcl")
    err = one_line_error(capsys, BASE + ["--checkpoint-dir", str(tmp_path), *flags, path])
    assert f"{path} was written by main_moco_mcl.py" in err and "main_cifar.py" in err


@pytest.mark.parametrize("script,writer", [("main_imagenet", "main_cifar"), ("main_moco_mcl", "main_lincls"),
                                           ("main_lincls", "main_moco_mcl")])
def test_every_script_refuses_another_scripts_checkpoint(tmp_path, capsys, script, writer):
    import importlib

    module = importlib.import_module(script)
    path = fake_checkpoint(tmp_path / "other.pth.tar", writer, arch="resnet18")
    if script == "main_imagenet":
        argv = ["--data", str(tmp_path / "none"), "--checkpoint-dir", str(tmp_path), "--device", "cpu"]
    else:
        argv = ["--data", str(tmp_path / "none"), "--checkpoint", str(tmp_path / "run"), "--device", "cpu",
                "-a", "resnet18"]
    with pytest.raises(SystemExit) as exc:
        run_main(module.main, argv + ["--resume", path])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    assert f"{path} was written by {writer}.py" in err and f"{script}.py" in err


# ----------------------------------------------------------------------------- one run per directory

def test_a_run_directory_is_never_reused_silently(tmp_path):
    """A second fresh start in a directory that holds a run stops in one line; --resume and --overwrite work."""
    args = RUN + ["--checkpoint-dir", str(tmp_path), "--run-name", "r", "--epochs", "1"]
    assert cli(args).returncode == 0
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text()
    again = cli(args)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [again.stderr.strip()]
    assert "already holds a run" in again.stderr and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == metrics  # untouched
    assert (tmp_path / "r" / "summary.json").exists()
    resumed = cli(args + ["--resume"])
    assert resumed.returncode == 0 and "nothing to do" in resumed.stdout
    overwritten = cli(args + ["--overwrite"])
    assert overwritten.returncode == 0, overwritten.stderr[-2000:]


def test_a_second_process_in_the_same_run_directory_is_refused(tmp_path):
    from utils.run_files import lock_run_dir, unlock_run_dir

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    lock_run_dir(str(run_dir))  # this test process plays the run that is training there
    try:
        # A new interpreter: a forked child would inherit this process's record of the lock it holds.
        out = subprocess.run([sys.executable, "main_cifar.py", *RUN, "--checkpoint-dir", str(tmp_path),
                              "--run-name", "r"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        unlock_run_dir(str(run_dir))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"is in use by process {os.getpid()}" in out.stderr.strip()


# ----------------------------------------------------------------------------- kills between the writes

class Killed(BaseException):
    """Stands for a kill -9 (BaseException: nothing catches it on the way out)."""


def _die_after(monkeypatch, moment):
    """Make the first file write (a checkpoint, a metrics line, the summary) that follows a save for which
    ``moment(loop, path)`` holds raise Killed: a kill -9 right after that save."""
    import utils.loop
    import utils.run_files

    armed = []
    real_save = utils.loop.RunLoop.save

    def save(self, path=None, for_best=False):
        if armed:
            raise Killed
        real_save(self, path, for_best)
        if moment(self, path):
            armed.append(True)

    def killed_if_armed(real):
        def write(self, *args):
            if armed:
                raise Killed
            return real(self, *args)
        return write

    monkeypatch.setattr(utils.loop.RunLoop, "save", save)
    for name in ("log_epoch", "write_summary"):
        monkeypatch.setattr(utils.run_files.RunLogger, name, killed_if_armed(getattr(utils.run_files.RunLogger, name)))


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("moment", ["after the first epoch's latest checkpoint", "after the finished checkpoint"])
def test_a_kill_between_the_writes_of_an_epoch_end_is_completed_by_resume(tmp_path, monkeypatch, moment):
    """Whatever write a kill interrupts, --resume ends with one metrics record per epoch, the summary, and
    best.pth.tar at the summary's best epoch (the original order -- latest checkpoint, then best and metrics;
    finished checkpoint, then summary -- lost the epoch's record, or the summary for good)."""
    args = RUN + ["--checkpoint-dir", str(tmp_path), "--run-name", "r"]
    if moment.startswith("after the first"):
        _die_after(monkeypatch, lambda loop, path: path is None and loop.state.step == 0 and loop.state.epoch == 1)
    else:
        _die_after(monkeypatch, lambda loop, path: path is None and loop.state.finished)
    try:
        main_cifar.main(args)
    except Killed:
        pass
    monkeypatch.undo()
    run_dir = tmp_path / "r"
    assert main_cifar.main(args + ["--resume"]) == 0
    records = _records(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_acc"] == max(r["best_single_top1"] for r in records)
    best = load_checkpoint(str(run_dir / "best.pth.tar"))
    assert best["best_epoch"] == summary["best_epoch"] and best["epoch"] == summary["best_epoch"]
    assert final_state(str(run_dir))["epoch"] == 2
