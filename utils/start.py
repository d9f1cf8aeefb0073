"""Where a run starts -- fresh, resumed from a checkpoint, or already finished -- decided once,
by rank 0, for every rank.

Ranks need not share a filesystem: rank 0 alone looks into the run directory (resolves
``--resume``, claims the directory, reads and checks the checkpoint) and tells the others
what it decided. A rank that has a byte-identical copy of the checkpoint at the same path
(a shared filesystem, or a copy made by hand) reads its own copy; the others receive rank
0's checkpoint through the process group (pickled CPU tensors, one broadcast). Identical
means: same size, same digest of the file's first and last MiB (a torch checkpoint ends
with its zip directory, which holds a CRC-32 of every record) and, once read, the same
epoch and step. A failure on any rank stops every rank with its one line; no rank waits
for another that has stopped.
"""
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from utils import distributed as du
from utils.checkpoint import load_checkpoint

_EDGE = 2 ** 20  # bytes hashed at each end of a checkpoint file


@dataclass
class Start:
    """What a run starts from: ``resume_path`` and its checkpoint ``ckpt`` (None: fresh), and
    whether that checkpoint has already run every epoch (then only rank 0 holds ``ckpt``:
    the others have nothing left to do)."""

    resume_path: Optional[str] = None
    ckpt: Optional[Dict[str, Any]] = None
    finished: bool = False


@dataclass(frozen=True)
class Fingerprint:
    """What identifies one checkpoint file across machines without reading it whole."""

    size: int
    digest: str
    epoch: int
    step: int


def file_digest(path: str) -> Tuple[int, str]:
    """(size in bytes, sha256 of the first and last MiB) of the file at ``path``."""
    size = os.path.getsize(path)
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        sha.update(f.read(_EDGE))
        if size > _EDGE:
            f.seek(max(size - _EDGE, _EDGE))
            sha.update(f.read(_EDGE))
    return size, sha.hexdigest()


def fingerprint(path: str, ckpt: Dict[str, Any]) -> Fingerprint:
    size, digest = file_digest(path)
    return Fingerprint(size, digest, int(ckpt.get("epoch", -1)), int(ckpt.get("step", -1)))


def read_identical_copy(path: str, expected: Fingerprint) -> Optional[Dict[str, Any]]:
    """This machine's copy of the checkpoint rank 0 read, or None when it has none that is identical."""
    try:
        if file_digest(path)[:2] != (expected.size, expected.digest):
            return None
        ckpt = load_checkpoint(path)
    except Exception:  # missing, unreadable, truncated: receive rank 0's instead
        return None
    if (int(ckpt.get("epoch", -1)), int(ckpt.get("step", -1))) != (expected.epoch, expected.step):
        return None
    return ckpt


def decide_start(decide: Callable[[], Start]) -> Start:
    """``decide()`` on rank 0; every rank returns its decision with the same checkpoint content.

    Without a process group this is ``decide()``. A finished run's checkpoint is not shared
    (every rank just stops). A user error raised by ``decide`` (a run directory in use, a
    checkpoint of other flags) stops every rank with that error.
    """
    if du.world_size() == 1:
        return decide()
    kept: List[Start] = []

    def on_main() -> Tuple[Optional[str], bool, Optional[Fingerprint]]:
        start = decide()
        kept.append(start)
        shared = start.ckpt is not None and not start.finished
        return start.resume_path, start.finished, fingerprint(start.resume_path, start.ckpt) if shared else None

    resume_path, finished, expected = du.decided_on_main(on_main)
    start = kept[0] if kept else Start(resume_path, None, finished)
    if expected is not None:
        start.ckpt = share_checkpoint(start.ckpt, resume_path, expected)
    return start


def share_checkpoint(ckpt: Optional[Dict[str, Any]], path: str, expected: Fingerprint) -> Dict[str, Any]:
    """Rank 0's ``ckpt`` (read from ``path``, ``expected`` its fingerprint) on every rank: each
    reads its own identical copy where it has one; one broadcast serves all that have none."""
    own = du.on_every_rank(lambda: ckpt if du.rank() == 0 else read_identical_copy(path, expected))
    if not du.any_rank(own is None):
        return own
    received = du.on_every_rank(lambda: du.broadcast_object(ckpt))
    return own if own is not None else received
