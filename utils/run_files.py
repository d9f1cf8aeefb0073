"""Run directory bookkeeping: config.json, metrics.jsonl, summary.json, log.txt, the dashboards.

Only the main process writes; other ranks get a logger whose methods do nothing.
"""
import fcntl
import json
import os
from typing import Any, Dict, List, Optional

from utils.dashboard import (CONFIG_TAG, IMAGES_TAG, TensorBoardBoard, WandbBoard, config_markdown,
                             epoch_scalars, final_scalars, flat_config, image_grid, thumbnails)
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
    """Writes the files of one run directory and its dashboards (no-op when ``enabled`` is False).

    Files: config.json, metrics.jsonl, summary.json, log.txt. Dashboards (utils/dashboard.py):
    TensorBoard in ``tb/`` (unless ``tensorboard`` is False) and, with ``wandb_project``, a W&B run.
    :meth:`begin` opens the dashboards when the run (re)starts, cut back to its checkpoint.
    """

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True,
                 wandb_project: Optional[str] = None) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.config: Dict[str, Any] = {}
        self._tb = TensorBoardBoard(os.path.join(run_dir, "tb")) if enabled and tensorboard else None
        self._wandb = WandbBoard(wandb_project, run_dir) if enabled and wandb_project else None
        self._images_logged = False

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.run_dir, "metrics.jsonl")

    def write_config(self, config: Dict[str, Any]) -> None:
        """config.json: ``config`` (the flags and what the run found) and the run's provenance
        (utils.machine.provenance: command line, git commit, host, hardware, versions)."""
        if self.enabled:
            self.config = config
            _write_json_atomic(os.path.join(self.run_dir, "config.json"), {**config, "provenance": provenance()})

    def begin(self, epochs_done: int, steps_done: int) -> None:
        """The run (re)starts after ``epochs_done`` epochs and ``steps_done`` optimizer steps in all: keep the
        metrics of those epochs only, open the dashboards cut back to that point, write the configuration."""
        if not self.enabled:
            return
        self.keep_epochs_up_to(epochs_done)
        fresh = epochs_done == 0 and steps_done == 0
        if self._tb is not None:
            self._images_logged = self._tb.begin(epochs_done, steps_done)
            self._tb.text(CONFIG_TAG, config_markdown(self.config))
        if self._wandb is not None:
            self._wandb.begin(self.config, fresh)

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

    def log_epoch(self, record: Dict[str, Any], scalars: Optional[Dict[str, float]] = None) -> None:
        """Append one epoch's record to metrics.jsonl and its ``scalars`` (default: utils.dashboard.epoch_scalars)
        to the dashboards."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        scalars = epoch_scalars(record) if scalars is None else scalars
        if self._tb is not None:
            self._tb.scalars(scalars, record["epoch"])
        if self._wandb is not None:
            self._wandb.log({**scalars, "epoch": record["epoch"]})

    def log_steps(self, scalars: Dict[str, float], global_step: int) -> None:
        """Step-level values (utils.dashboard.step_scalars) at optimizer step ``global_step`` of the run."""
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.scalars(scalars, global_step)
        if self._wandb is not None:
            self._wandb.log({**scalars, "global_step": global_step})

    @property
    def wants_sample_images(self) -> bool:
        """True until one grid of training images is on the dashboards (a resumed run keeps its first one)."""
        return self.enabled and not self._images_logged and (self._tb is not None or self._wandb is not None)

    def log_sample_images(self, images: Optional[Any]) -> None:
        """One grid of the augmented training images ``images`` (K, 3, H, W), normalised as the network sees them."""
        if not self.wants_sample_images or images is None:
            return
        self._images_logged = True
        grid = image_grid(images)
        if self._tb is not None:
            self._tb.image(IMAGES_TAG, grid, 0)
        if self._wandb is not None:
            self._wandb.image(IMAGES_TAG, grid, 0)

    def log_final(self, scalars: Dict[str, float]) -> None:
        """A finished run: the configuration as hyper-parameters with the final metrics (HParams tab; W&B summary)."""
        if not self.enabled:
            return
        metrics = final_scalars(scalars)
        if self._tb is not None and metrics:
            self._tb.hparams(flat_config(self.config), metrics, 0)
        if self._wandb is not None:
            self._wandb.final(metrics)

    def log_embedding(self, tag: str, features: Any, labels: List[Any], images: Any, step: int) -> None:
        """Features (M, F) with their labels and images (M, 3, H, W) for TensorBoard's projector."""
        if self.enabled and self._tb is not None:
            self._tb.embedding(tag, features, labels, thumbnails(images), step)

    def close(self) -> None:
        for board in (self._tb, self._wandb):
            if board is not None:
                board.close()
        self._wandb = None
