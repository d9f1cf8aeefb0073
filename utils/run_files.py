"""Run directory bookkeeping: config.json, metrics.jsonl, summary.json, log.txt, TensorBoard.

Only the main process writes; other ranks get a logger whose methods do nothing.
"""
import fcntl
import json
import os
from typing import Any, Dict, List, Optional

from utils.errors import ConfigError
from utils.machine import provenance

RUN_FILES = ("checkpoint.pth.tar", "metrics.jsonl", "summary.json")
# What config.json records besides the flags: what the run found (classes, topology, normalisation)
# and where and how it ran (provenance). ``--config config.json`` skips these keys.
RECORDED_KEYS = frozenset({
    "script", "topology", "num_classes", "n_data", "world_size", "world_size_total", "batch_per_process",
    "versions", "provenance", "normalization",
})
LOCK_FILE = ".lock"
_held_locks: Dict[str, Any] = {}  # run directory -> open lock file, for the life of the process


def holds_a_run(run_dir: str) -> bool:
    """True when ``run_dir`` already has a checkpoint, metrics or a summary of some run."""
    return any(os.path.exists(os.path.join(run_dir, name)) for name in RUN_FILES)


def check_run_dir_free(run_dir: str, resuming: bool, overwrite: bool) -> None:
    """ConfigError when a fresh start would overwrite the run that ``run_dir`` holds.

    A run directory is reused only by an explicit choice: --resume continues the run,
    --overwrite starts it again.
    """
    if resuming or overwrite or not holds_a_run(run_dir):
        return
    raise ConfigError(f"{run_dir} already holds a run; add --resume to continue it, or --overwrite to "
                      "start it again (its checkpoints and metrics are then replaced)")


def lock_run_dir(run_dir: str) -> None:
    """Take an exclusive lock on ``run_dir`` for the life of this process (the OS drops it when the
    process dies); ConfigError naming the process that holds it already."""
    path = os.path.join(run_dir, LOCK_FILE)
    if run_dir in _held_locks:
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"{run_dir} is in use by {holder}; wait for it to end, or choose another run "
                          "directory (--run-name / --checkpoint)") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    _held_locks[run_dir] = f


def unlock_run_dir(run_dir: str) -> None:
    """Release :func:`lock_run_dir`'s lock (also released when the process ends)."""
    f: Optional[Any] = _held_locks.pop(run_dir, None)
    if f is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def ensure_writable_dir(path: str) -> str:
    """Create ``path`` if needed; ConfigError when it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"cannot write to {path} ({err.strerror or err}); pass a writable --checkpoint-dir"
        ) from None
    return path


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """Records of a metrics.jsonl file; a torn last line (killed run) is skipped."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class RunLogger:
    """Writes the files of one run directory (no-op when ``enabled`` is False)."""

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:  # tensorboard is a requirement, but keep training without it
                self._tb = None

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.run_dir, "metrics.jsonl")

    def write_config(self, config: Dict[str, Any]) -> None:
        """config.json: ``config`` (the flags and what the run found) and the run's provenance
        (utils.machine.provenance: command line, git commit, host, hardware, versions)."""
        if self.enabled:
            _write_json_atomic(os.path.join(self.run_dir, "config.json"), {**config, "provenance": provenance()})

    def write_summary(self, summary: Dict[str, Any]) -> None:
        if self.enabled:
            _write_json_atomic(os.path.join(self.run_dir, "summary.json"), summary)

    def remove_summary(self) -> None:
        """A run that (re)starts training is unfinished until it writes a new summary."""
        path = os.path.join(self.run_dir, "summary.json")
        if self.enabled and os.path.exists(path):
            os.unlink(path)

    def text(self, line: str) -> None:
        """Print ``line`` and append it to log.txt."""
        if not self.enabled:
            return
        print(line, flush=True)
        with open(os.path.join(self.run_dir, "log.txt"), "a") as f:
            f.write(line + "\n")

    def keep_epochs_up_to(self, completed: int) -> None:
        """Keep the records of epochs 1..``completed`` only (a resumed run redoes the later ones)."""
        if not self.enabled or not os.path.exists(self.metrics_path):
            return
        kept = [r for r in read_metrics(self.metrics_path) if r.get("epoch", completed + 1) <= completed]
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, self.metrics_path)

    def log_epoch(self, record: Dict[str, Any]) -> None:
        """Append one epoch's record and its scalars to TensorBoard."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self._tb is not None:
            step = record["epoch"]
            for key, value in _flatten(record).items():
                if key != "epoch":
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _flatten(record: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """{"test": {"top1": [a, b]}} -> {"test/top1/net0": a, "test/top1/net1": b}."""
    flat: Dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if isinstance(v, (int, float)):
                    flat[f"{name}/net{i}"] = float(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat
