"""Linear evaluation of main_lincls.py (docs/method.md §4): a torchvision classifier with a
frozen pre-trained backbone (eval mode, BatchNorm statistics too) and a fresh fc; the
epoch loop, evaluation and the check that no weight outside the fc changed."""
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tv_models

from models.pretrained import FC_KEYS, load_backbone
from utils import distributed as du
from utils.method import Method, StepResult
from utils.metrics import AccuracyCounter, reduce_accuracy
from utils.precision import Precision
from utils.progress import progress as progress_bar


class FrozenWeightsChanged(RuntimeError):
    """A weight outside the fc changed during linear evaluation: a bug, not a user error."""


# ----------------------------------------------------------------------------- the classifier

def reset_fc(model: nn.Module) -> None:
    """fc weight ~ N(0, 0.01), bias 0 (the original's)."""
    nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.fc.bias)


def freeze_all_but_fc(model: nn.Module) -> List[nn.Parameter]:
    """requires_grad only for fc.weight and fc.bias; returns those two."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in FC_KEYS)
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2, "only fc.weight and fc.bias should be trainable"
    return trainable


def frozen_snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Copy (on CPU) of every state entry but the fc: parameters and BatchNorm buffers."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in FC_KEYS}


def check_frozen_unchanged(model: nn.Module, reference: Dict[str, torch.Tensor]) -> None:
    """FrozenWeightsChanged naming the first entry outside the fc that differs from ``reference``."""
    state = model.state_dict()
    for name, ref in reference.items():
        if not torch.equal(state[name].detach().cpu(), ref):
            raise FrozenWeightsChanged(f"{name} changed during linear classification; only the fc may change")


def build_classifier(arch: str, num_classes: int) -> nn.Module:
    """torchvision ``arch`` with ``num_classes`` outputs and the original's fc initialisation."""
    model = tv_models.get_model(arch, weights=None, num_classes=num_classes)
    reset_fc(model)
    return model


def prepare_model(arch: str, state: Optional[Dict[str, torch.Tensor]], num_classes: int, path: str) -> nn.Module:
    """Classifier with the pre-trained backbone loaded and a fresh fc."""
    model = build_classifier(arch, num_classes)
    if state is not None:
        load_backbone(model, state, path)
    return model


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: nn.Module, loader, ctx: du.DistContext, max_batches: int = 0,
             precision: Precision = Precision(), progress: bool = False) -> Dict[str, Any]:
    """Top-1/top-5 (%) and mean loss over the whole val split (every rank evaluates its shard; a bar on the
    main process's terminal with ``progress``).

    Hits and the loss sum stay on the device; one reduction reads them after the last batch.
    """
    model.eval()
    acc = AccuracyCounter(1)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    batches = min(len(loader), max_batches) if max_batches else len(loader)
    for i, (images, targets) in enumerate(progress_bar(loader, batches, "evaluating", progress and ctx.is_main)):
        if max_batches and i >= max_batches:
            break
        images = precision.prepare_inputs(images.to(ctx.device, non_blocking=True))
        targets = targets.to(ctx.device, non_blocking=True)
        with precision.autocast(ctx.device):
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, targets).double() * images.size(0)  # batch mean x size
        acc.update([logits], targets)
    top1, top5, total, (loss_total,) = reduce_accuracy(acc, ctx.device, [loss_sum])
    return {"top1": top1, "top5": top5, "loss": loss_total / max(total, 1)}


# ----------------------------------------------------------------------------- the method

class LinearMethod(Method):
    """Training the fc of a frozen backbone, as a method of the run loop.

    ``reference`` is :func:`frozen_snapshot` of the loaded backbone; every epoch checks it.
    """

    rank_streams = True  # augmentations differ per rank, also after a resume

    def __init__(self, model: nn.Module, ddp_model: nn.Module, val_loader, reference: Dict[str, torch.Tensor],
                 ctx: du.DistContext, precision: Precision, max_eval_batches: int, extra: Dict[str, Any],
                 progress: bool = False) -> None:
        self.model, self.ddp_model, self.val_loader, self.reference = model, ddp_model, val_loader, reference
        self.ctx, self.precision, self.max_eval_batches, self.extra = ctx, precision, max_eval_batches, extra
        self.progress = progress

    def train_mode(self) -> None:
        # eval mode: linear evaluation must not touch BatchNorm statistics of the frozen backbone.
        self.ddp_model.eval()

    def to_device(self, raw: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        images, targets = raw
        images = self.precision.prepare_inputs(images.to(self.ctx.device, non_blocking=True))
        return images, targets.to(self.ctx.device, non_blocking=True)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> StepResult:
        with self.precision.autocast(self.ctx.device):
            logits = self.ddp_model(images).float()
        return StepResult({"loss": F.cross_entropy(logits, targets)}, [logits.detach()], targets)

    def progress_line(self, epoch: int, step: int, total: int, lr: float, named: Dict[str, float], acc) -> str:
        return f"epoch {epoch + 1} step {step}/{total} lr {lr:.4f} loss {named['loss']:.4f}"

    def extra_state(self, for_best: bool = False) -> Dict[str, Any]:
        return dict(self.extra)

    def check(self) -> None:
        check_frozen_unchanged(self.model, self.reference)

    def evaluate(self) -> Tuple[Dict[str, Any], Optional[float]]:
        test = evaluate(self.model, self.val_loader, self.ctx, self.max_eval_batches, self.precision, self.progress)
        return {"test": test, "best_single_top1": test["top1"][0]}, test["top1"][0]

    def format_epoch(self, record: Dict[str, Any]) -> str:
        test = record["test"]
        return (f"epoch {record['epoch']}/{record['epochs']} lr={record['lr']:.4f} "
                f"loss={record['train']['loss']:.4f} | test top-1 {test['top1'][0]:.2f} top-5 {test['top5'][0]:.2f}"
                f" | best {record['best_acc']:.2f} (epoch {record['best_epoch']})")

    def on_finished(self, loop: Any, summary: Dict[str, Any]) -> None:
        loop.logger.text("=> sanity check passed: no weight outside the fc changed")

    def summary(self, state: Any, records: List[Dict[str, Any]], epochs: int) -> Dict[str, Any]:
        last = records[-1]["test"] if records else {"top1": [None], "top5": [None]}
        return {"finished": True, "epochs": epochs, "best_acc": state.best_acc,
                "best_epoch": state.best_epoch, "last_top1": last["top1"], "last_top5": last["top5"],
                "last_mean_top1": last["top1"][0]}
