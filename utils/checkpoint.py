"""Checkpoints that survive kills: atomic writes, clear errors on bad files, RNG capture.

A checkpoint is a plain dict saved with ``torch.save`` (format in README, section
"Interrupting and resuming"). ``atomic_save`` writes a temporary file in the same
directory, flushes and fsyncs it, then renames it over the target: a kill -9 at any
moment leaves either the previous file or the new one, both readable.
"""
import errno
import os
import random
import shutil
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from utils.errors import CheckpointError

CHECKPOINT_FORMAT = "mcl-checkpoint"
CHECKPOINT_VERSION = 2  # 2: best_epoch numbered from 1


def latest_checkpoint_path(run_dir: str) -> str:
    """The run directory's rolling checkpoint, the one --resume continues."""
    return os.path.join(run_dir, "checkpoint.pth.tar")


def best_checkpoint_path(run_dir: str) -> str:
    """The checkpoint of the run's best epoch (best single-network test top-1)."""
    return os.path.join(run_dir, "best.pth.tar")


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Dict[str, Any], path: str) -> None:
    """Write ``obj`` to ``path`` so that ``path`` is never seen half-written.

    Raises CheckpointError (previous file intact) when the write fails, e.g. on a
    full disk or in a read-only directory.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=TMP_SUFFIX, dir=directory)
    except OSError as err:  # a read-only or foreign directory: nothing was written
        raise CheckpointError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from teammates
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        reason = _write_failure(err, directory)
        if reason is not None:
            kept = "the previous checkpoint is intact" if os.path.exists(path) else "no earlier checkpoint exists"
            raise CheckpointError(f"could not write checkpoint {path}: {reason}; {kept}") from None
        raise
    _fsync_dir(directory)


TMP_SUFFIX = ".tmp"
_LOW_SPACE = 64 * 2 ** 20  # bytes; below this a failed write is taken for a full disk


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_failure(err: BaseException, directory: str) -> Optional[str]:
    """Why writing a checkpoint failed, in words, or None when ``err`` is not a write failure.

    torch.save reports a failed write as RuntimeError (e.g. "[enforce fail at
    inline_container.cc] ... file write failed"), not as OSError.
    """
    if isinstance(err, OSError):
        return "the disk is full" if err.errno == errno.ENOSPC else err.strerror or str(err)
    if isinstance(err, RuntimeError) and ("inline_container" in str(err) or "write" in str(err).lower()):
        try:
            full = shutil.disk_usage(directory).free < _LOW_SPACE
        except OSError:
            full = False
        return "the disk is full" if full else str(err).splitlines()[0]
    return None


def link_checkpoint(src: str, dst: str) -> None:
    """Make ``dst`` name the same file as ``src`` (a hard link, so no second copy on disk), replacing
    ``dst`` atomically; a copy where the filesystem has no hard links."""
    directory = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(directory, "." + os.path.basename(dst) + f".{os.getpid()}" + TMP_SUFFIX)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(directory)


def remove_stale_temporaries(directory: str) -> List[str]:
    """Delete the half-written ``.NAME.*.tmp`` files that killed saves left in ``directory``; their names."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") and ".pth.tar." in name and name.endswith(TMP_SUFFIX):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by this project; CheckpointError for anything else."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (or drop --resume to start fresh)")
    try:
        # Our own files hold numpy RNG states and config dicts, which the weights-only
        # unpickler refuses; only load checkpoints you trust.
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a checkpoint ({type(err).__name__}); "
            "use another file, e.g. best.pth.tar or an earlier copy"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' marker); "
            "pass a checkpoint.pth.tar or best.pth.tar written by its scripts"
        )
    return obj


# The flag that sets a checkpoint field whose name is not the flag's (the topology comes from --cohort).
FLAG_OF_FIELD = {"topology": "--cohort"}


def flag_of_field(key: str) -> str:
    """The command-line flag that sets the checkpoint field ``key``."""
    return FLAG_OF_FIELD.get(key, "--" + key.replace("_", "-"))


def check_compatible(ckpt: Dict[str, Any], path: str, **expected: Any) -> None:
    """CheckpointError when a stored field (arch, number_net, ...) differs from the run's."""
    for key, want in expected.items():
        have = ckpt.get(key)
        if have is not None and have != want:
            raise CheckpointError(
                f"checkpoint {path} has {key}={have!r} but this run has {key}={want!r}; "
                f"pass the matching flags (e.g. {flag_of_field(key)} {have}) or another checkpoint"
            )


class RunDirCheckpoints:
    """``latest_path`` and ``best_path`` of a run loop that has a ``run_dir``."""

    run_dir: str

    @property
    def latest_path(self) -> str:
        return latest_checkpoint_path(self.run_dir)

    @property
    def best_path(self) -> str:
        return best_checkpoint_path(self.run_dir)


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def restore_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only when CUDA is present)."""
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
