"""Run directory bookkeeping: config.json, metrics.jsonl, summary.json, log.txt, TensorBoard.

Only the main process writes; other ranks get a logger whose methods do nothing.
"""
import json
import os
from typing import Any, Dict, List

from utils.errors import ConfigError


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
        if self.enabled:
            _write_json_atomic(os.path.join(self.run_dir, "config.json"), config)

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

    def keep_epochs_before(self, epoch: int) -> None:
        """Drop records of epochs >= ``epoch`` (a resumed run redoes them)."""
        if not self.enabled or not os.path.exists(self.metrics_path):
            return
        kept = [r for r in read_metrics(self.metrics_path) if r.get("epoch", -1) < epoch]
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
