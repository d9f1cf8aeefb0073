"""Weighted kNN monitor of MoCo pre-training (InstDisc's): top-1 of each query encoder's
pooled features on a small labelled ImageFolder.

Sharded over ranks: each rank embeds its contiguous share of the train and val splits,
the train features are gathered in rank order (the whole split, as one process sees it),
each rank classifies its val share on its device, and one reduction sums the hits.
"""
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.moco import MoCoMCL, pooled_features
from utils import distributed as du
from utils.progress import progress as progress_bar


def _feature_size(encoder: nn.Module) -> int:
    """Input size of the encoder's fc head (its first Linear layer)."""
    return next(m for m in encoder.fc.modules() if isinstance(m, nn.Linear)).in_features


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device: torch.device, max_batches: int = 0,
                     progress: bool = False, desc: str = "kNN features") -> Tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features (M, F) float32 and labels (M,) of ``loader``, on ``device``
    (a bar on a terminal with ``progress``)."""
    feats, labels = [], []
    total = min(len(loader), max_batches) if max_batches else len(loader)
    for i, (images, targets) in enumerate(progress_bar(loader, total, desc, progress)):
        if max_batches and i >= max_batches:
            break
        feats.append(F.normalize(pooled_features(encoder, images.to(device, non_blocking=True)).float(), dim=1))
        labels.append(targets.to(device, non_blocking=True))
    if not feats:  # an empty shard still takes part in the gathers
        return torch.empty(0, _feature_size(encoder), device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def weighted_knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                         num_classes: int, k: int = 200, t: float = 0.1, chunk: int = 256) -> torch.Tensor:
    """InstDisc's weighted kNN: class votes sum exp(cos / t) over the k nearest train features.

    train_feats (M, F), test_feats (Q, F) normalised, on one device -> predicted classes (Q,).
    """
    k = min(k, train_feats.size(0))
    preds = []
    for start in range(0, test_feats.size(0), chunk):
        sim = test_feats[start:start + chunk] @ train_feats.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.size(0), num_classes, dtype=sim.dtype, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / t).exp())
        preds.append(votes.argmax(dim=1))
    if not preds:
        return torch.empty(0, dtype=torch.long, device=test_feats.device)
    return torch.cat(preds)


def knn_top1(model: MoCoMCL, knn, device: torch.device, max_batches: int, k: int, t: float,
             progress: bool = False) -> List[float]:
    """Weighted kNN top-1 (%) of every query encoder, on every rank.

    ``knn`` = (train loader, val loader, classes), the loaders over this rank's shards;
    ``max_batches`` caps each rank's batches. The hits stay on the device until one read.
    ``progress``: bars on a terminal (the caller passes it on the main process only).
    """
    train_loader, val_loader, num_classes = knn
    hits = []
    val_labels = torch.empty(0, dtype=torch.long, device=device)
    for n, encoder in enumerate(model.encoders_q):
        was_training = encoder.training
        encoder.eval()
        tr_f, tr_y = extract_features(encoder, train_loader, device, max_batches, progress, f"kNN net {n} train")
        va_f, val_labels = extract_features(encoder, val_loader, device, max_batches, progress, f"kNN net {n} val")
        encoder.train(was_training)
        pred = weighted_knn_predict(du.all_gather_rows(tr_f), du.all_gather_rows(tr_y), va_f, num_classes, k, t)
        hits.append((pred == val_labels).sum())
    counts = torch.stack(hits + [torch.full((), val_labels.numel(), device=device)]).double()
    hits_total = du.all_reduce_sum(counts).tolist()
    total = max(hits_total[-1], 1.0)
    return [100.0 * h / total for h in hits_total[:-1]]
