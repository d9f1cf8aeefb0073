"""Linear evaluation of main_lincls.py (SPEC section 4): a torchvision classifier with a
frozen pre-trained backbone (eval mode, BatchNorm statistics too) and a fresh fc; the
epoch loop, evaluation and the check that no weight outside the fc changed."""
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tv_models

from models.pretrained import FC_KEYS, load_backbone
from utils import distributed as du
from utils.engine import NonFiniteLossError, Precision
from utils.epoch_loop import EpochLoop, reduced_means
from utils.logging import read_metrics
from utils.metrics import AccuracyCounter, SumMeter


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
             precision: Precision = Precision()) -> Dict[str, Any]:
    """Top-1/top-5 (%) and mean loss over the whole val split (every rank evaluates its shard)."""
    model.eval()
    acc, meter = AccuracyCounter(1), SumMeter()
    for i, (images, targets) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        images, targets = precision.prepare_inputs(images.to(ctx.device)), targets.to(ctx.device)
        with precision.autocast(ctx.device):
            logits = model(images).float()
        meter.update({"loss": float(F.cross_entropy(logits, targets))}, images.size(0))
        acc.update([logits], targets)
    result = reduced_means(acc, meter, ("loss",), ctx.device)
    return {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"]}


# ----------------------------------------------------------------------------- the loop

class LinearRun(EpochLoop):
    """Epochs of fc training on a frozen backbone, evaluation, checkpoints, graceful stop.

    ``reference`` is :func:`frozen_snapshot` of the loaded backbone; every epoch checks it.
    """

    def __init__(self, args, ctx, model, ddp_model, optimizer, train_loader, sampler, val_loader,
                 reference: Dict[str, torch.Tensor], logger, run_dir: str, meta: Dict[str, Any], stop=None) -> None:
        super().__init__(args, ctx, model, ddp_model, optimizer, train_loader, sampler, logger, run_dir, meta,
                         num_heads=1, stop=stop)
        self.val_loader, self.reference = val_loader, reference

    def extra_state(self) -> Dict[str, Any]:
        return {"net_index": self.args.net_index, "pretrained": self.args.pretrained}

    def set_mode(self) -> None:
        # eval mode: linear evaluation must not touch BatchNorm statistics of the frozen backbone.
        self.ddp_model.eval()

    def to_device(self, raw: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        images, targets = raw
        images = self.precision.prepare_inputs(images.to(self.ctx.device, non_blocking=True))
        return images, targets.to(self.ctx.device, non_blocking=True)

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[Dict[str, float], int]:
        s = self.state
        with self.precision.autocast(self.ctx.device):
            logits = self.ddp_model(images).float()
        loss = F.cross_entropy(logits, targets)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLossError(f"non-finite loss at epoch {s.epoch} step {s.step}; lower --lr "
                                     f"(latest good checkpoint: {self.latest_path})")
        self.optimize(loss)
        s.train_acc.update([logits.detach()], targets)
        return {"loss": value}, images.size(0)

    def progress_line(self, lr: float, total: int, named: Dict[str, float]) -> str:
        return f"Epoch: [{self.state.epoch}][{self.state.step}/{total}] lr {lr:.4f} loss {named['loss']:.4f}"

    def end_epoch(self) -> None:
        s = self.state
        check_frozen_unchanged(self.model, self.reference)
        lr = self.optimizer.param_groups[0]["lr"]
        train = reduced_means(s.train_acc, s.train_meter, ("loss",), self.ctx.device)
        test = evaluate(self.model, self.val_loader, self.ctx, self.args.max_eval_batches, self.precision)
        is_best = test["top1"][0] > s.best_acc or s.best_epoch < 0
        if is_best:
            s.best_acc, s.best_epoch = test["top1"][0], s.epoch
        record = {"epoch": s.epoch, "epochs": self.args.epochs, "lr": lr, "time_s": s.elapsed,
                  "train": train, "test": test, "best_single_top1": test["top1"][0],
                  "best_acc": s.best_acc, "best_epoch": s.best_epoch}
        self.next_epoch()
        self.save()
        if is_best:
            self.save(self.best_path)
        self.logger.log_epoch(record)
        self.logger.text(f"epoch {record['epoch'] + 1}/{record['epochs']} lr={lr:.4f} loss={train['loss']:.4f} | "
                         f"test top-1 {test['top1'][0]:.2f} top-5 {test['top5'][0]:.2f} | "
                         f"best {s.best_acc:.2f} (epoch {s.best_epoch + 1})")

    def before_finish(self) -> None:
        check_frozen_unchanged(self.model, self.reference)

    def on_finished(self) -> None:
        self.logger.text("=> sanity check passed: no weight outside the fc changed")
        self.logger.write_summary(self.summary())

    def summary(self) -> Dict[str, Any]:
        s = self.state
        records = read_metrics(self.logger.metrics_path)
        last = records[-1]["test"] if records else {"top1": [None], "top5": [None]}
        return {"finished": True, "epochs": self.args.epochs, "best_acc": s.best_acc,
                "best_epoch": s.best_epoch, "last_top1": last["top1"], "last_top5": last["top5"],
                "last_mean_top1": last["top1"][0]}
