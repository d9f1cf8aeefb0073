"""The run's dashboards: TensorBoard (``RUN_DIR/tb``) and, with --wandb, Weights & Biases.

Both get the same names, grouped by their first part:

- ``lr``; ``time/train_s``, ``time/eval_s``, ``time/images_per_s`` (per epoch);
- ``train/loss/<term>`` (``total``, ``cls``, ``kd``, ``vcl``, ``soft_vcl``, ``icl``, ``soft_icl``)
  and ``train/top1/net0`` ... ``train/top1/ensemble``: the epoch's means; MoCo's training
  accuracy, instance discrimination among the queue's keys, is ``train/instance_top1/net0``;
- ``test/<metric>/net<i>``, ``test/<metric>/mean`` (over the networks) and
  ``test/<metric>/ensemble`` for ``top1``, ``top5``, ``nll``, ``ece``; ``test/loss``;
  ``test/top1/best_net`` (this epoch's best network); ``knn/top1/net<i>`` (MoCo's monitor);
  ``best/top1``, ``best/epoch`` (the best epoch so far);
- ``train_step/loss/<term>`` and ``train_step/lr`` every --print-freq steps.

Epoch series are indexed by the epoch (from 1), ``train_step/`` series by the optimizer
step since the start of the run (from 1). TensorBoard also gets the configuration as text
(``config``) and, when the run finishes, as hyper-parameters with the final metrics (the
HParams tab), one grid of augmented training images (``train/augmented_images``) and,
with --tb-embeddings, the projector's test features.

A resumed run continues the same dashboards without repeating a point: the TensorBoard
files keep only what happened up to the checkpoint (:func:`trim_event_files`); W&B resumes
the same run (its id is kept in ``RUN_DIR/wandb.json``).
"""
import glob
import json
import os
import shutil
import uuid
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from utils.errors import ConfigError

STEP_GROUP = "train_step"
IMAGES_TAG = "train/augmented_images"
CONFIG_TAG = "config"
LOSS_NAMES = {"loss": "total", "loss_cls": "cls", "loss_kd": "kd"}
FINAL_GROUPS = ("test", "knn", "best")  # the groups whose last values compare finished runs
FINAL_TAGS = ("train/loss/total",)  # and these (all MoCo pre-training has without --knn-data)
WANDB_ID_FILE = "wandb.json"


# ----------------------------------------------------------------------------- names

def loss_name(term: str) -> str:
    """A loss term's dashboard name: ``loss`` -> ``total``, ``loss_cls`` -> ``cls``, ``icl`` -> ``icl``."""
    return LOSS_NAMES.get(term, term)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def per_network(prefix: str, values: Sequence[float], ensemble: Optional[float] = None) -> Dict[str, float]:
    """{prefix/net0: v0, ..., prefix/mean (two networks or more), prefix/ensemble}."""
    numbers = [float(v) for v in values if _is_number(v)]
    out = {f"{prefix}/net{i}": v for i, v in enumerate(numbers)}
    if len(numbers) > 1:
        out[f"{prefix}/mean"] = sum(numbers) / len(numbers)
    if _is_number(ensemble):
        out[f"{prefix}/ensemble"] = float(ensemble)
    return out


def _group_scalars(group: str, entry: Mapping[str, Any], numbers_are_losses: bool,
                   accuracy_prefix: str = "") -> Dict[str, float]:
    """One group of a metrics record (``train``, ``test``, ``knn``) under the module docstring's names."""
    out: Dict[str, float] = {}
    for key, value in entry.items():
        if key.startswith("ens_") and key[4:] in entry:
            continue  # named with its networks
        name = accuracy_prefix + key if key in ("top1", "top5") else key
        if isinstance(value, (list, tuple)):
            out.update(per_network(f"{group}/{name}", value, entry.get("ens_" + key)))
        elif _is_number(value):
            out[f"{group}/loss/{loss_name(key)}" if numbers_are_losses else f"{group}/{name}"] = float(value)
    return out


TOP_LEVEL_NAMES = {"lr": "lr", "time_s": "time/train_s", "eval_s": "time/eval_s",
                   "images_per_s": "time/images_per_s", "best_single_top1": "test/top1/best_net",
                   "best_acc": "best/top1", "best_epoch": "best/epoch"}


def epoch_scalars(record: Mapping[str, Any], train_accuracy_prefix: str = "") -> Dict[str, float]:
    """{dashboard name: value} of one metrics.jsonl record (the module docstring's names)."""
    out: Dict[str, float] = {}
    for key, value in record.items():
        if key in ("epoch", "epochs"):
            continue
        if key == "train" and isinstance(value, Mapping):
            out.update(_group_scalars("train", value, True, train_accuracy_prefix))
        elif isinstance(value, Mapping):
            out.update(_group_scalars(key, value, False))
        elif _is_number(value):
            out[TOP_LEVEL_NAMES.get(key, key)] = float(value)
    return out


def step_scalars(terms: Mapping[str, float], lr: float) -> Dict[str, float]:
    """{train_step/loss/<term>: value, train_step/lr: lr} of one training step."""
    out = {f"{STEP_GROUP}/loss/{loss_name(k)}": float(v) for k, v in terms.items()}
    out[f"{STEP_GROUP}/lr"] = float(lr)
    return out


def final_scalars(scalars: Mapping[str, float]) -> Dict[str, float]:
    """The last epoch's values that compare finished runs: the ``test/``, ``knn/`` and ``best/`` groups and the
    training loss."""
    return {k: v for k, v in scalars.items() if k.split("/")[0] in FINAL_GROUPS or k in FINAL_TAGS}


# ----------------------------------------------------------------------------- configuration

def flat_config(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """config.json flattened for hyper-parameter tables: nested keys joined by ``.``, lists as text,
    None as ``None``; numbers, booleans and strings as they are."""
    out: Dict[str, Any] = {}
    for key in sorted(config):
        value, name = config[key], f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = " ".join(str(v) for v in value)
        elif value is None:
            out[name] = "None"
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def config_markdown(config: Mapping[str, Any]) -> str:
    """The configuration as a markdown table (TensorBoard's text plugin renders it)."""
    rows = [f"| `{k}` | `{v}` |" for k, v in flat_config(config).items()]
    return "\n".join(["| flag | value |", "|---|---|", *rows])


# ----------------------------------------------------------------------------- images

def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Normalised images (K, 3, H, W) rescaled per channel to [0, 1] over the batch (float32, CPU): close to
    the pixels before normalisation, whatever the data set's mean and std were."""
    x = images.detach().float().cpu()
    low = x.amin(dim=(0, 2, 3), keepdim=True)
    high = x.amax(dim=(0, 2, 3), keepdim=True)
    return ((x - low) / (high - low).clamp_min(1e-8)).contiguous()


def image_grid(images: torch.Tensor, count: int = 32, per_row: int = 8) -> torch.Tensor:
    """(3, H', W') grid in [0, 1] of the first ``count`` images of (K, 3, H, W)."""
    from torchvision.utils import make_grid

    return make_grid(to_unit_range(images[:count]), nrow=per_row, padding=2)


def thumbnails(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """(K, 3, size, size) in [0, 1]: the projector's sprite images."""
    x = to_unit_range(images)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------- TensorBoard

def _event_files(log_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*")))


def _remove_projector(log_dir: str) -> None:
    """The projector's files of an earlier end of the run (rewritten at the next end)."""
    config = os.path.join(log_dir, "projector_config.pbtxt")
    if os.path.exists(config):
        os.unlink(config)
    for entry in os.scandir(log_dir):
        if entry.is_dir() and entry.name.isdigit():  # add_embedding's <global step>/<tag>/ folders
            shutil.rmtree(entry.path)


def _keeps(value: Any, step: int, epochs_done: int, steps_done: int, resuming: bool) -> bool:
    """Whether one summary value of an earlier process stays (see :func:`trim_event_files`)."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        limit = steps_done if value.tag.startswith(STEP_GROUP + "/") else epochs_done
        return step <= limit
    return kind == "image" and resuming


def trim_event_files(log_dir: str, epochs_done: int, steps_done: int) -> bool:
    """Cut TensorBoard's files in ``log_dir`` back to a run's state before it (re)starts.

    Kept: scalars of the epochs 1..``epochs_done`` and of the steps 1..``steps_done``
    (``train_step/``), and the image grid when the run resumes (``epochs_done`` or
    ``steps_done`` > 0). Dropped: everything later (a killed run got past its checkpoint),
    the configuration text and hyper-parameters (this start writes them again) and the
    projector (the next end writes it). A fresh start thus clears the folder. The kept
    events go into one file named like the first old one, so they stay first in the
    order TensorBoard reads. Returns whether an image grid was kept.
    """
    if not os.path.isdir(log_dir):
        return False
    _remove_projector(log_dir)
    paths = _event_files(log_dir)
    if not paths:
        return False
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    resuming = epochs_done > 0 or steps_done > 0
    kept, images_kept = [], False
    for path in paths:
        for event in LegacyEventFileLoader(path).Load():  # a torn last record (killed writer) is skipped
            what = event.WhichOneof("what")
            if what == "file_version" and not kept:
                kept.append(event)
            if what != "summary":
                continue
            values = [v for v in event.summary.value if _keeps(v, event.step, epochs_done, steps_done, resuming)]
            if values:
                images_kept = images_kept or any(v.WhichOneof("value") == "image" for v in values)
                del event.summary.value[:]
                event.summary.value.extend(values)
                kept.append(event)
    for path in paths:
        os.unlink(path)
    if len(kept) > 1:
        _write_events(paths[0], kept)
    return images_kept


def _write_events(path: str, events: Sequence[Any]) -> None:
    from tensorboard.summary.writer.record_writer import RecordWriter

    with open(path, "wb") as f:
        writer = RecordWriter(f)
        for event in events:
            writer.write(event.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


class TensorBoardBoard:
    """TensorBoard's files of one run (``log_dir``), opened at :meth:`begin`."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self._writer: Any = None

    def begin(self, epochs_done: int, steps_done: int) -> bool:
        """Trim the files (:func:`trim_event_files`), open a writer; whether an image grid was kept."""
        kept = trim_event_files(self.log_dir, epochs_done, steps_done)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(self.log_dir)
        return kept

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()

    def text(self, tag: str, markdown: str) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, markdown, 0)
            self._writer.flush()

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if self._writer is not None:
            self._writer.add_image(tag, grid, step)
            self._writer.flush()

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        """Hyper-parameters and the names of the metrics the HParams tab shows (their values are the
        last points of those scalar series, in this same run)."""
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        for summary in hparams_summaries(dict(hparams), dict(metrics)):
            self._writer.file_writer.add_summary(summary, step)
        self._writer.flush()

    def embedding(self, tag: str, features: torch.Tensor, labels: Sequence[Any], images: torch.Tensor,
                  step: int) -> None:
        if self._writer is not None:
            self._writer.add_embedding(features, metadata=list(labels), label_img=images, global_step=step, tag=tag)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# ----------------------------------------------------------------------------- Weights & Biases

def require_wandb(flag: str = "--wandb") -> Any:
    """The wandb module; ConfigError in one line when it is not installed."""
    try:
        import wandb
    except ImportError:
        raise ConfigError(f"{flag} needs the wandb package: pip install wandb (offline use: WANDB_MODE=offline)") \
            from None
    return wandb


class WandbBoard:
    """One W&B run per run directory; the same names as TensorBoard (epoch series against ``epoch``,
    ``train_step/`` series against ``global_step``). Files go to ``RUN_DIR/wandb`` unless WANDB_DIR says
    otherwise; WANDB_MODE=offline works without a network (``wandb sync`` uploads later)."""

    def __init__(self, project: str, run_dir: str) -> None:
        self.project, self.run_dir = project, run_dir
        self._run: Any = None

    def _run_id(self, fresh: bool) -> str:
        """The run directory's W&B id (a new one for a fresh start), kept in ``wandb.json``."""
        path = os.path.join(self.run_dir, WANDB_ID_FILE)
        if not fresh and os.path.exists(path):
            try:
                with open(path) as f:
                    return str(json.load(f)["id"])
            except (OSError, ValueError, KeyError):
                pass
        run_id = uuid.uuid4().hex[:12]
        with open(path, "w") as f:
            json.dump({"id": run_id, "project": self.project}, f)
        return run_id

    def begin(self, config: Mapping[str, Any], fresh: bool) -> None:
        """Start (or, for a resumed run, continue) the W&B run; ConfigError in one line when it cannot start."""
        wandb = require_wandb()
        run_id = self._run_id(fresh)
        try:
            self._run = wandb.init(
                project=self.project, name=os.path.basename(os.path.normpath(self.run_dir)),
                id=run_id, resume="allow", dir=os.environ.get("WANDB_DIR") or self.run_dir,
                config=flat_config(config), allow_val_change=True, settings=wandb.Settings(console="off"))
        except Exception as err:  # wandb raises many kinds (no login, no network, ...): say which, in one line
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"--wandb {self.project}: W&B could not start ({first}); log in with `wandb login` "
                              "or run offline with WANDB_MODE=offline") from None
        self._run.define_metric("epoch")
        self._run.define_metric("global_step")
        self._run.define_metric(f"{STEP_GROUP}/*", step_metric="global_step")
        for group in ("lr", "time/*", "train/*", "test/*", "knn/*", "best/*"):
            self._run.define_metric(group, step_metric="epoch")

    def log(self, values: Mapping[str, Any]) -> None:
        if self._run is not None:
            self._run.log(dict(values))

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if self._run is not None:
            import wandb

            self._run.log({tag: wandb.Image(grid.permute(1, 2, 0).numpy()), "epoch": step})

    def final(self, metrics: Mapping[str, float]) -> None:
        if self._run is not None:
            self._run.summary.update(dict(metrics))

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
