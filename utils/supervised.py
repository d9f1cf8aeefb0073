"""Supervised MCL as a method of the run loop (main_cifar.py and main_imagenet.py).

One step: forward every network of the cohort, project the features with the
per-network heads, and sum per-network cross-entropy, the weighted MCL terms and
(optionally) logit distillation from the ensemble. After each epoch: top-1/top-5 of
every network and of the ensemble on the test set.

How the MCL terms are computed for a batch comes in as a *contrast* object:
``contrast(embeddings, batch) -> MCLLosses`` (in-batch for CIFAR, memory bank for
ImageNet, utils/contrast.py), with optional ``after_step(embeddings, batch)`` and
``state_dict``/``load_state_dict``.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from data.batch import Batch
from losses.ensemble import ensemble_distill_loss, ensemble_logits
from losses.mcl import MCLLosses
from utils import distributed as du
from utils.loop import RunState
from utils.method import Method, StepResult
from utils.metrics import AccuracyCounter, CalibrationCounter, reduce_accuracy
from utils.precision import Precision
from utils.progress import progress as progress_bar

TERMS = ("loss", "loss_cls", "loss_kd", "vcl", "soft_vcl", "icl", "soft_icl")


@dataclass(frozen=True)
class Objective:
    """Weights of the loss terms (the paper's alpha, gamma, beta, lambda) and logit distillation."""

    alpha: float = 0.0  # VCL
    gamma: float = 0.0  # soft VCL
    beta: float = 0.0  # ICL
    lam: float = 0.0  # soft ICL
    logit_distill: bool = False
    kd_T: float = 3.0
    kd_all_students_when_two: bool = True  # CIFAR: both nets when N == 2; ImageNet: last only
    kd_detach_ensemble: bool = True  # the original's ImageNet script does not detach

    @property
    def uses_contrast(self) -> bool:
        return any(w != 0 for w in (self.alpha, self.gamma, self.beta, self.lam))

    @classmethod
    def from_flags(cls, args: Any, imagenet: bool = False) -> "Objective":
        """From --alpha --gamma --beta --lam --logit-distill --kd_T. Logit distillation follows the
        original's scripts: on CIFAR both networks of a pair learn from the detached ensemble; on
        ImageNet only the last network does, with the ensemble detached only under --detach-ensemble."""
        return cls(args.alpha, args.gamma, args.beta, args.lam, getattr(args, "logit_distill", False), args.kd_T,
                   kd_all_students_when_two=not imagenet,
                   kd_detach_ensemble=args.detach_ensemble if imagenet else True)


class CohortWithHeads(nn.Module):
    """The cohort and its projection heads as one module (one DDP wrapper, one state)."""

    def __init__(self, cohort: nn.Module, heads: Optional[nn.ModuleList]) -> None:
        super().__init__()
        self.cohort = cohort
        self.heads = heads

    def forward(self, x: torch.Tensor):
        logits, features = self.cohort(x)
        if self.heads is None:
            return logits, features, None
        embeddings = [head(f) for head, f in zip(self.heads, features)]  # float32 (ProjectionHead)
        return logits, features, embeddings


def compute_loss(
    logits: List[torch.Tensor],
    embeddings: Optional[List[torch.Tensor]],
    batch: Batch,
    objective: Objective,
    contrast: Optional[Callable[[List[torch.Tensor], Batch], MCLLosses]],
) -> Dict[str, torch.Tensor]:
    """All loss terms of one step; ``loss`` is their weighted sum (weights applied)."""
    zero = logits[0].new_zeros(()).float()
    loss_cls = sum(F.cross_entropy(z.float(), batch.targets) for z in logits)
    loss_kd = zero
    if objective.logit_distill:
        loss_kd = ensemble_distill_loss([z.float() for z in logits], objective.kd_T,
                                        objective.kd_all_students_when_two, objective.kd_detach_ensemble)
    terms = MCLLosses(zero, zero, zero, zero)
    if objective.uses_contrast and contrast is not None and embeddings is not None:
        terms = contrast(embeddings, batch)
    vcl = objective.alpha * terms.vcl
    soft_vcl = objective.gamma * terms.soft_vcl
    icl = objective.beta * terms.icl
    soft_icl = objective.lam * terms.soft_icl
    loss = loss_cls + loss_kd + vcl + soft_vcl + icl + soft_icl
    # Terms are logged weighted, as the original logs them.
    return {"loss": loss, "loss_cls": loss_cls, "loss_kd": loss_kd, "vcl": vcl, "soft_vcl": soft_vcl,
            "icl": icl, "soft_icl": soft_icl}


@torch.no_grad()
def evaluate_cohort(cohort: nn.Module, eval_data: Iterable, device: torch.device, precision: Precision,
                    max_batches: int = 0, progress: bool = False) -> Dict[str, Any]:
    """Test metrics of every network and of the ensemble (softmax of the mean logits), over all ranks.

    ``top1``/``top5`` (%), ``nll`` (mean negative log-likelihood, nats) and ``ece`` (expected
    calibration error, %, 15 equal-width confidence bins): lists of N, one per network; the
    ``ens_`` keys: the ensemble's; ``loss``: the mean of the networks' NLL; ``images``: the count.
    ``progress``: a bar on a terminal. Hits and calibration sums stay on ``device``; one
    reduction reads them after the last batch.
    """
    cohort.eval()
    heads = cohort.number_net + 1
    counter, calibration = AccuracyCounter(heads), CalibrationCounter(heads)
    total_batches = _batches(eval_data, max_batches)
    for i, raw in enumerate(progress_bar(eval_data, total_batches, "evaluating", progress)):
        if max_batches and i >= max_batches:
            break
        batch = Batch.from_loader(raw).to(device)
        with precision.autocast(device):
            logits, _ = cohort(precision.prepare_inputs(batch.inputs))
        logits = [z.float() for z in logits]
        every = logits + [ensemble_logits(logits)]
        counter.update(every, batch.targets)
        calibration.update(every, batch.targets)
    top1, top5, total, sums = reduce_accuracy(counter, device, [calibration.device_sums(device)])
    nll, ece = calibration.from_values(sums)
    return {"top1": top1[:-1], "top5": top5[:-1], "ens_top1": top1[-1], "ens_top5": top5[-1],
            "nll": nll[:-1], "ens_nll": nll[-1], "ece": ece[:-1], "ens_ece": ece[-1],
            "loss": sum(nll[:-1]) / cohort.number_net, "images": total}


def _batches(loader: Any, max_batches: int) -> Optional[int]:
    """Batches an evaluation will take (for a progress bar); None when the loader has no length."""
    try:
        n = len(loader)
    except TypeError:
        return None
    return min(n, max_batches) if max_batches else n


@torch.no_grad()
def test_features(cohort: nn.Module, eval_data: Iterable, device: torch.device, precision: Precision,
                  limit: int) -> Tuple[List[torch.Tensor], List[int], torch.Tensor]:
    """Pooled features of every network for the first ``limit`` images of ``eval_data``:
    (N tensors (M, F_n) float32 on the CPU, M labels, the M images (M, 3, H, W) on the CPU)."""
    cohort.eval()
    features: List[List[torch.Tensor]] = [[] for _ in range(cohort.number_net)]
    labels: List[int] = []
    images: List[torch.Tensor] = []
    seen = 0
    for raw in eval_data:
        if seen >= limit:
            break
        batch = Batch.from_loader(raw).to(device)
        take = min(limit - seen, batch.targets.size(0))
        with precision.autocast(device):
            _, feats = cohort(precision.prepare_inputs(batch.inputs[:take]))
        for n, f in enumerate(feats):
            features[n].append(f.float().flatten(1).cpu())
        labels += batch.targets[:take].tolist()
        images.append(batch.inputs[:take].float().cpu())
        seen += take
    return [torch.cat(f) for f in features], labels, torch.cat(images)


class SupervisedMethod(Method):
    """Cross-entropy of every network, the weighted MCL terms and logit distillation; see the module docstring."""

    terms = TERMS
    lr_flag = "--init-lr"

    def __init__(self, model: CohortWithHeads, ddp_model: nn.Module, objective: Objective, contrast: Optional[Any],
                 eval_data: Any, device: torch.device, precision: Precision, max_eval_batches: int = 0,
                 progress: bool = False, embeddings: int = 0) -> None:
        """``progress``: evaluation bars (main process, terminal); ``embeddings``: test images whose features
        go to TensorBoard's projector at the end (0 = none)."""
        self.model, self.ddp_model = model, ddp_model
        self.objective, self.contrast = objective, contrast
        self.eval_data, self.device, self.precision = eval_data, device, precision
        self.max_eval_batches = max_eval_batches
        self.progress, self.embeddings = progress, embeddings
        self.num_heads = model.cohort.number_net + 1  # the networks and their ensemble

    def to_device(self, raw: Any):
        batch = Batch.from_loader(raw).to(self.device)
        return batch, batch.targets

    def sample_images(self, batch: Batch) -> torch.Tensor:
        return batch.inputs

    def forward(self, batch: Batch, targets: torch.Tensor) -> StepResult:
        with self.precision.autocast(self.device):
            logits, _, embeddings = self.ddp_model(self.precision.prepare_inputs(batch.inputs))
        terms = compute_loss(logits, embeddings, batch, self.objective, self.contrast)
        detached = [z.detach().float() for z in logits]
        after = None
        if self.contrast is not None and embeddings is not None and hasattr(self.contrast, "after_step"):
            kept = [e.detach() for e in embeddings]
            after = lambda: self.contrast.after_step(kept, batch)  # noqa: E731
        return StepResult(terms, detached + [ensemble_logits(detached)], targets, after)

    @torch.no_grad()
    def evaluate(self) -> Tuple[Dict[str, Any], Optional[float]]:
        # DDP broadcasts BatchNorm statistics from rank 0 before each training forward, so
        # after the last step every rank holds its own; evaluate (and save) rank 0's.
        du.broadcast_buffers(self.model)
        test = evaluate_cohort(self.model.cohort, self.eval_data, self.device, self.precision,
                               self.max_eval_batches, self.progress)
        test.pop("images")
        best_single = max(test["top1"])
        return {"test": test, "best_single_top1": best_single}, best_single

    def train_record(self, record: Dict[str, Any]) -> Dict[str, Any]:
        top1, top5 = record.pop("top1"), record.pop("top5")
        record.update(top1=top1[:-1], top5=top5[:-1], ens_top1=top1[-1], ens_top5=top5[-1])
        return record

    def model_state(self) -> Dict[str, Any]:
        heads = self.model.heads
        return {"model": self.model.cohort.state_dict(), "heads": heads.state_dict() if heads is not None else None}

    def load_model_state(self, ckpt: Dict[str, Any]) -> None:
        self.model.cohort.load_state_dict(ckpt["model"])
        if self.model.heads is not None and ckpt.get("heads") is not None:
            self.model.heads.load_state_dict(ckpt["heads"])

    def extra_state(self, for_best: bool = False) -> Dict[str, Any]:
        # best.pth.tar leaves out memory banks and the like, which evaluation and export never need.
        keep = not for_best and hasattr(self.contrast, "state_dict")
        return {"contrast": self.contrast.state_dict() if keep else None}

    def load_extra_state(self, extra: Dict[str, Any]) -> None:
        if extra.get("contrast") is not None and hasattr(self.contrast, "load_state_dict"):
            self.contrast.load_state_dict(extra["contrast"])

    def format_epoch(self, record: Dict[str, Any]) -> str:
        t, tr = record["test"], record["train"]
        nets = " ".join(f"{v:.2f}" for v in t["top1"])
        terms = " ".join(f"{k}={tr[k]:.4f}" for k in TERMS if k in tr)
        return (f"epoch {record['epoch']}/{record['epochs']} lr={record['lr']:.5f} {terms} | "
                f"test top-1 [{nets}] ens {t['ens_top1']:.2f} | best {record['best_acc']:.2f} | "
                f"{record['time_s']:.1f}s {record['images_per_s']:.0f} img/s")

    def summary(self, state: RunState, records: List[Dict[str, Any]], epochs: int) -> Dict[str, Any]:
        """The paper's metric (best single network at its best epoch) and the honest last-epoch figures."""
        last = records[-1]["test"] if records else {"top1": [], "ens_top1": None}
        nll, ece = last.get("nll") or [], last.get("ece") or []
        return {
            "finished": True, "epochs": epochs, "best_acc": state.best_acc, "best_epoch": state.best_epoch,
            "last_top1": last["top1"],
            "last_mean_top1": sum(last["top1"]) / len(last["top1"]) if last["top1"] else None,
            "last_ens_top1": last.get("ens_top1"),
            "last_nll": nll, "last_mean_nll": sum(nll) / len(nll) if nll else None, "last_ens_nll": last.get("ens_nll"),
            "last_ece": ece, "last_mean_ece": sum(ece) / len(ece) if ece else None, "last_ens_ece": last.get("ens_ece"),
        }

    def on_finished_dashboards(self, loop: Any) -> None:
        """--tb-embeddings N: the pooled features of every network for the first N test images (this
        process's share of the test set), with labels and thumbnails, to TensorBoard's projector."""
        if not self.embeddings:
            return
        features, labels, images = test_features(self.model.cohort, self.eval_data, self.device, self.precision,
                                                 self.embeddings)
        for i, f in enumerate(features):
            loop.logger.log_embedding(f"test_features_net{i}", f, labels, images, loop.state.epoch)

    def on_finished(self, loop: Any, summary: Dict[str, Any]) -> None:
        last = ", ".join(f"{v:.2f}" for v in summary["last_top1"])
        loop.logger.text(
            f"best single-network top-1 at its best epoch (the paper's CIFAR metric): {summary['best_acc']:.2f} "
            f"at epoch {summary['best_epoch']}\n"
            f"last-epoch top-1 per network: [{last}], mean {summary['last_mean_top1'] or 0:.2f}, "
            f"ensemble {summary['last_ens_top1'] or 0:.2f}"
        )
