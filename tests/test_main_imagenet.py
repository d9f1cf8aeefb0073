"""main_imagenet.py end to end on a tiny ImageFolder of JPEG files, plus its loader and memory banks."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import main_imagenet
import utils.loop as loop
from data.samplers import EpochShuffleBatchSampler
from utils.checkpoint import load_checkpoint
from utils.cli import run_main
from utils.contrast import MemoryContrast
from data.batch import Batch
from utils.supervised import Objective

torch.set_num_threads(1)

from tests import ROOT  # noqa: E402
from tests.two_nodes import free_port  # noqa: E402

MCL = ["--alpha", "0.1", "--gamma", "1.", "--beta", "0.1", "--lam", "1."]
RUN_FILES = ("checkpoint.pth.tar", "best.pth.tar", "config.json", "metrics.jsonl", "summary.json")


def write_folder(root, images_per_class, classes=("ant", "bee", "cat"), size=40, seed=0):
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(images_per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.JPEG", format="JPEG")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_folder(root / "train", 6)
    write_folder(root / "val", 2, seed=1)
    return root


def tiny(data_dir, ckpt_dir, run_name, *extra):
    return ["--data", str(data_dir), "--image-size", "32", "--arch", "resnet18", "--number-net", "2", *MCL,
            "--neg_k", "8", "--batch-size", "6", "--epochs", "1", "--init-lr", "0.01", "--num-workers", "0",
            "--no-progress", "--device", "cpu", "--max-eval-batches", "2", "--deterministic",
            "--checkpoint-dir", str(ckpt_dir), "--run-name", run_name, *extra]


@pytest.fixture(scope="module", autouse=True)
def keep_determinism_setting():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
    """One uninterrupted epoch (3 steps of 6 images); the reference for the resume test."""
    ckpt_dir = tmp_path_factory.mktemp("runs")
    assert main_imagenet.main(tiny(data_dir, ckpt_dir, "full")) == 0
    yield ckpt_dir / "full"
    shutil.rmtree(ckpt_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def drop_checkpoints(tmp_path):
    """Each checkpoint of two ResNet-18 is ~180 MB: do not leave them in pytest's kept temp dirs."""
    yield
    for path in tmp_path.rglob("*.pth.tar"):
        path.unlink()


def banks(ckpt):
    state = ckpt["extra"]["contrast"]
    return [state[f"memory_{n}"] for n in range(ckpt["number_net"])]


def test_mcl_run_writes_the_run_directory_with_all_four_terms(full_run):
    for name in RUN_FILES:
        assert (full_run / name).exists(), name
    record = json.loads((full_run / "metrics.jsonl").read_text().splitlines()[0])
    for term in ("vcl", "soft_vcl", "icl", "soft_icl"):
        assert record["train"][term] > 0, term
    assert len(record["test"]["top1"]) == 2 and "ens_top5" in record["test"]
    ckpt = load_checkpoint(str(full_run / "checkpoint.pth.tar"))
    assert ckpt["script"] == "main_imagenet" and ckpt["finished"] and ckpt["config"]["n_data"] == 18
    bank = banks(ckpt)[0]
    assert bank.shape == (18, 128)
    # Every training image was visited once, so every row was refreshed into a unit vector.
    assert torch.allclose(bank.norm(dim=1), torch.ones(18), atol=1e-5)
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["finished"] and summary["best_acc"] == max(record["test"]["top1"])


def test_evaluate_the_best_checkpoint(full_run, data_dir, capsys):
    capsys.readouterr()
    argv = ["--data", str(data_dir), "--image-size", "32", "--device", "cpu", "--num-workers", "0", "--evaluate",
            "--evaluate-checkpoint", str(full_run / "best.pth.tar")]
    assert main_imagenet.main(argv) == 0
    out = capsys.readouterr().out
    assert "on 6 validation images" in out and "net 1 (resnet18)" in out and "ensemble: top-1" in out


def test_stopped_and_resumed_run_ends_with_the_same_banks(full_run, data_dir, tmp_path, monkeypatch):
    original_step = loop.RunLoop.train_step

    def stop_after_two(self, raw):
        named = original_step(self, raw)
        if self.state.step == 1:  # this is the second step (step counts before the increment)
            self.stop.signum = signal.SIGTERM
        return named

    monkeypatch.setattr(loop.RunLoop, "train_step", stop_after_two)
    argv = tiny(data_dir, tmp_path, "stopped")
    assert main_imagenet.main(argv) == 0
    stopped = load_checkpoint(str(tmp_path / "stopped" / "checkpoint.pth.tar"))
    assert (stopped["epoch"], stopped["step"], stopped["finished"]) == (0, 2, False)
    monkeypatch.setattr(loop.RunLoop, "train_step", original_step)

    restored = {}
    original_restore = loop.RunLoop.restore

    def spy_restore(self, ckpt, path=None):
        original_restore(self, ckpt, path)
        restored["banks"] = [m.clone() for m in self.method.contrast.memories]

    monkeypatch.setattr(loop.RunLoop, "restore", spy_restore)
    assert main_imagenet.main(argv + ["--resume"]) == 0
    for in_ckpt, in_trainer in zip(banks(stopped), restored["banks"]):
        assert torch.equal(in_ckpt, in_trainer)
    resumed = load_checkpoint(str(tmp_path / "stopped" / "checkpoint.pth.tar"))
    reference = load_checkpoint(str(full_run / "checkpoint.pth.tar"))
    assert resumed["finished"]
    for a, b in zip(banks(resumed), banks(reference)):
        assert torch.equal(a, b)


DDP_WRAPPER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import main_imagenet, utils.loop as eng
from losses.memory import init_memory
orig = eng.RunLoop.fit
def fit(self):
    code = orig(self)
    assert self.state.finished
    for n, bank in enumerate(self.method.contrast.memories):
        parts = [torch.empty_like(bank) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, bank)
        assert torch.equal(parts[0], parts[1]), 'banks differ'
        assert torch.allclose(bank.norm(dim=1), torch.ones(bank.shape[0]), atol=1e-5), 'a row was never updated'
    print('BANKS-EQUAL', dist.get_rank(), flush=True)
    return code
eng.RunLoop.fit = fit
sys.exit(main_imagenet.main(sys.argv[1:]))
"""


def test_two_gloo_processes_keep_identical_banks(data_dir, tmp_path):
    script = tmp_path / "ddp_banks.py"
    script.write_text(DDP_WRAPPER.format(root=ROOT))
    argv = [a for a in tiny(data_dir, tmp_path, "ddp") if a != "--deterministic"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(script), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("BANKS-EQUAL") == 2
    for name in RUN_FILES:
        assert (tmp_path / "ddp" / name).exists(), name
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("layout", ["missing", "no_val", "empty_class"])
def test_bad_data_is_one_line_and_exit_2(tmp_path, capsys, layout):
    root = tmp_path / "data"
    if layout != "missing":
        write_folder(root / "train", 1, size=8)
        if layout == "empty_class":
            (root / "train" / "dog").mkdir()
            write_folder(root / "val", 1, size=8)
    with pytest.raises(SystemExit) as exit_info:
        run_main(main_imagenet.main, tiny(root, tmp_path, "bad"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "train/" in err


def test_an_unreadable_jpeg_is_skipped_and_named(data_dir, tmp_path, capfd):
    """A garbage and a truncated .JPEG (train and val): the run finishes; each file is named on stderr."""
    root = tmp_path / "data"
    shutil.copytree(data_dir, root)
    good = (root / "train" / "ant" / "000.JPEG").read_bytes()
    (root / "train" / "ant" / "005.JPEG").write_bytes(b"not an image at all")
    (root / "val" / "bee" / "001.JPEG").write_bytes(good[: len(good) // 3])
    assert main_imagenet.main(tiny(root, tmp_path, "damaged")) == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err
    assert err.count("train/ant/005.JPEG") == 1 and err.count("val/bee/001.JPEG") == 1
    assert load_checkpoint(str(tmp_path / "damaged" / "checkpoint.pth.tar"))["finished"]


@pytest.mark.parametrize("flags, words", [
    (["--pos_k", "0"], "--pos_k"), (["--neg_k", "0"], "--neg_k"), (["--nce_m", "1"], "--nce_m"),
    (["--pos_k", "6"], "needs 7 per class"),
])
def test_config_errors(data_dir, tmp_path, capsys, flags, words):
    with pytest.raises(SystemExit) as exit_info:
        run_main(main_imagenet.main, tiny(data_dir, tmp_path, "bad") + flags)
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


def test_help_keeps_the_original_flags_and_defaults():
    parser = main_imagenet.build_parser()
    text = parser.format_help()
    for flag in ("--data", "--dataset", "--arch", "--init-lr", "--lr-type", "--milestones", "--epochs",
                 "--batch-size", "--num-workers", "--gpu-id", "--manual_seed", "--resume", "--resume-checkpoint",
                 "--evaluate", "--evaluate-checkpoint", "--checkpoint-dir", "--number-net", "--logit-distill",
                 "--kd_T", "--alpha", "--gamma", "--beta", "--lam", "--rep-dim", "--feat-dim", "--pos_k",
                 "--neg_k", "--tau", "--nce_m", "--image-size", "--detach-ensemble"):
        assert flag in text, flag
    d = parser.parse_args([])
    assert (d.data, d.dataset, d.arch, d.init_lr, d.lr_type, d.milestones, d.epochs, d.batch_size) == (
        "./data/ImageNet/", "ImageNet", "resnet18", 0.1, "multistep", [30, 60, 90], 90, 256)
    assert (d.weight_decay, d.num_workers, d.number_net, d.kd_T, d.tau, d.feat_dim) == (1e-4, 16, 2, 3, 0.07, 128)
    assert (d.pos_k, d.neg_k, d.nce_m, d.rep_dim, d.image_size, d.detach_ensemble) == (1, 8192, 0.5, 1024, 224, False)
    assert "NOT detached" in text


def test_logit_distillation_is_the_original_imagenet_rule():
    objective = Objective.from_flags(main_imagenet.parse_args(["--logit-distill", "--number-net", "2"]), imagenet=True)
    assert objective.logit_distill and not objective.kd_all_students_when_two and not objective.kd_detach_ensemble
    detached = Objective.from_flags(main_imagenet.parse_args(["--logit-distill", "--detach-ensemble"]), imagenet=True)
    assert detached.kd_detach_ensemble


def test_epoch_order_is_sharded_seeded_and_resumable():
    whole = EpochShuffleBatchSampler(22, 6, seed=3)
    assert len(whole) == 4  # last partial batch of 4 kept
    assert sorted(sum(list(whole), [])) == list(range(22))
    halves = [EpochShuffleBatchSampler(22, 6, seed=3, rank=r, world_size=2) for r in range(2)]
    # Two processes share every global batch; the last one (4 images) is split 2 + 2.
    joined = [a + b for a, b in zip(*[list(h) for h in halves])]
    assert joined == list(whole)
    whole.set_epoch(1)
    epoch1 = list(whole)
    assert epoch1 != joined
    whole.set_start_batch(2)
    assert len(whole) == 2 and list(whole) == epoch1[2:]
    whole.set_epoch(2)
    assert len(whole) == 4  # a new epoch starts at its first batch


def test_memory_contrast_banks_start_equal_and_update_rows():
    make = lambda: MemoryContrast(number_net=2, n_data=10, feat_dim=4, tau=0.07, kd_T=3.0, momentum=0.5, seed=7)
    a, b = make(), make()
    assert all(torch.equal(x, y) for x, y in zip(a.memories, b.memories))
    assert not torch.equal(a.memory_0, a.memory_1)
    embeddings = [torch.nn.functional.normalize(torch.randn(3, 4), dim=1) for _ in range(2)]
    batch = Batch(torch.zeros(3), torch.zeros(3, dtype=torch.long), index=torch.tensor([1, 4, 7]),
                  pos_idx=torch.tensor([[1, 2], [4, 5], [7, 8]]), neg_idx=torch.tensor([[0, 3], [6, 9], [0, 1]]))
    terms = a(embeddings, batch)
    assert all(torch.isfinite(t) and t > 0 for t in terms)
    before = a.memory_0.clone()
    a.after_step(embeddings, batch)
    changed = (a.memory_0 != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [1, 4, 7]
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.memory_0, a.memory_0)
