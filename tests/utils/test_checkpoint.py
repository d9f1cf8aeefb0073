"""Checkpoint files: the user's umask, a full disk reported in words, leftovers of killed saves removed."""
import os
import shutil
from collections import namedtuple

import pytest
import torch

from utils import checkpoint as ckpt_mod
from utils.checkpoint import CheckpointError, atomic_save, remove_stale_temporaries
from utils.script_setup import prepare_run_dir


def test_checkpoints_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_save({"w": torch.zeros(2)}, str(tmp_path / "a.pth.tar"))
        os.umask(0o077)
        atomic_save({"w": torch.zeros(2)}, str(tmp_path / "b.pth.tar"))
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "a.pth.tar").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "b.pth.tar").st_mode & 0o777 == 0o600


def test_a_full_disk_inside_torch_save_is_one_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth.tar"
    atomic_save({"w": torch.ones(2)}, str(path))

    def failing_save(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10, 10, 0))
    with pytest.raises(CheckpointError, match="disk is full; the previous checkpoint is intact"):
        atomic_save({"w": torch.zeros(2)}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["w"], torch.ones(2))
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_other_runtime_errors_are_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt_mod.torch, "save", lambda obj, f: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({}, str(tmp_path / "x.pth.tar"))


def test_leftovers_of_killed_saves_are_removed_at_start(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    leftovers = [".checkpoint.pth.tar.abc123.tmp", ".best.pth.tar.x9.tmp"]
    kept = ["checkpoint.pth.tar", "notes.tmp", ".hidden"]
    for name in leftovers + kept:
        (run_dir / name).write_text("x")
    assert remove_stale_temporaries(str(run_dir)) == sorted(leftovers)
    assert sorted(os.listdir(run_dir)) == sorted(kept)
    (run_dir / leftovers[0]).write_text("x")
    prepare_run_dir(str(run_dir))
    assert "removed 1 half-written checkpoint file" in capsys.readouterr().out
    assert sorted(os.listdir(run_dir)) == sorted(kept)
