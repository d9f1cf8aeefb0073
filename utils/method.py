"""What a training method brings to the run loop (utils/loop.py): its step, evaluation, state and summary."""
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from utils.metrics import AccuracyCounter

if TYPE_CHECKING:  # the loop imports this module, not the other way round
    from utils.loop import RunLoop, RunState


@dataclass
class StepResult:
    """What one forward pass of a method gives the loop.

    ``terms``: the method's logged values (``Method.terms``), ``loss`` among them, as tensors;
    ``logits``: detached (B, C) logits whose top-1/top-5 against ``targets`` the epoch's
    training accuracy counts; ``after_update``: work after the optimizer step (bank update,
    enqueue), or None.
    """

    terms: Dict[str, torch.Tensor]
    logits: List[torch.Tensor]
    targets: torch.Tensor
    after_update: Optional[Callable[[], None]] = None


class Method:
    """The parts of a training method the loop calls; see the module docstring.

    ``model`` is the module a checkpoint saves (unwrapped); ``ddp_model`` the one the step runs.
    """

    terms: Tuple[str, ...] = ("loss",)
    num_heads: int = 1  # classifiers counted in the training accuracy
    saves_best: bool = True  # write best.pth.tar at the best epoch
    rank_streams: bool = False  # give every rank its own RNG stream after a resume (augmentations)
    lr_flag: str = "--lr"  # named by the non-finite loss message
    train_accuracy_prefix: str = ""  # of the training accuracy's dashboard names; MoCo's: "instance_"

    model: nn.Module
    ddp_model: nn.Module

    def train_mode(self) -> None:
        self.ddp_model.train()

    def to_device(self, raw: Any) -> Tuple[Any, torch.Tensor]:
        """(inputs, targets) of one loader batch on the training device."""
        raise NotImplementedError

    def forward(self, inputs: Any, targets: torch.Tensor) -> StepResult:
        raise NotImplementedError

    def evaluate(self) -> Tuple[Dict[str, Any], Optional[float]]:
        """After an epoch's training: (what the epoch record adds, e.g. {"test": ...}; the score the
        best epoch maximises, or None)."""
        return {}, None

    def sample_images(self, inputs: Any) -> Optional[torch.Tensor]:
        """Some augmented training images (K, 3, H, W) of one step's ``inputs`` for the dashboards, or None."""
        return inputs if torch.is_tensor(inputs) else None

    def on_finished_dashboards(self, loop: "RunLoop") -> None:
        """Rank 0, at the end of a finished run: extra dashboard content (e.g. an embedding projector)."""

    def check(self) -> None:
        """Invariants checked after every epoch and before the end (e.g. frozen weights)."""

    def train_record(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """The epoch's reduced training means and accuracies, reshaped for metrics.jsonl."""
        return record

    def model_state(self) -> Dict[str, Any]:
        """The checkpoint's "model" and "heads"."""
        return {"model": self.model.state_dict(), "heads": None}

    def load_model_state(self, ckpt: Dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])

    def extra_state(self, for_best: bool = False) -> Dict[str, Any]:
        """The checkpoint's "extra"; ``for_best`` may leave out what evaluation never needs."""
        return {}

    def load_extra_state(self, extra: Dict[str, Any]) -> None:
        pass

    def format_epoch(self, record: Dict[str, Any]) -> str:
        raise NotImplementedError

    def progress_line(self, epoch: int, step: int, total: int, lr: float, named: Dict[str, float],
                      acc: AccuracyCounter) -> str:
        top1 = 100.0 * acc.top1[0] / max(acc.total, 1)
        return (f"epoch {epoch + 1} step {step}/{total} lr {lr:.5f} "
                + " ".join(f"{k} {v:.4f}" for k, v in named.items()) + f" top-1(net 0) {top1:.2f}")

    def summary(self, state: "RunState", records: List[Dict[str, Any]], epochs: int) -> Dict[str, Any]:
        return {"finished": True, "epochs": epochs}

    def on_finished(self, loop: "RunLoop", summary: Dict[str, Any]) -> None:
        """Rank 0, after the final checkpoint and summary.json: last words, extra files."""
