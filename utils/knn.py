"""Weighted kNN monitor of MoCo pre-training (InstDisc's): top-1 of each query encoder's
pooled features on a small labelled ImageFolder."""
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.moco import MoCoMCL, pooled_features
from utils.progress import progress as progress_bar


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device: torch.device, max_batches: int = 0,
                     progress: bool = False, desc: str = "kNN features") -> Tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised pooled features (M, F) and labels (M,) of ``loader`` (a bar on a terminal with ``progress``)."""
    feats, labels = [], []
    total = min(len(loader), max_batches) if max_batches else len(loader)
    for i, (images, targets) in enumerate(progress_bar(loader, total, desc, progress)):
        if max_batches and i >= max_batches:
            break
        feats.append(F.normalize(pooled_features(encoder, images.to(device)).float(), dim=1).cpu())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def weighted_knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                         num_classes: int, k: int = 200, t: float = 0.1, chunk: int = 256) -> torch.Tensor:
    """InstDisc's weighted kNN: class votes sum exp(cos / t) over the k nearest train features.

    train_feats (M, F), test_feats (Q, F) normalised -> predicted classes (Q,).
    """
    k = min(k, train_feats.size(0))
    preds = []
    for start in range(0, test_feats.size(0), chunk):
        sim = test_feats[start:start + chunk] @ train_feats.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.size(0), num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(model: MoCoMCL, knn, device: torch.device, max_batches: int, k: int, t: float,
             progress: bool = False) -> List[float]:
    """Weighted kNN top-1 (%) of every query encoder; ``knn`` = (train loader, val loader, classes)."""
    train_loader, val_loader, num_classes = knn
    result = []
    for n, encoder in enumerate(model.encoders_q):
        was_training = encoder.training
        encoder.eval()
        tr_f, tr_y = extract_features(encoder, train_loader, device, max_batches, progress, f"kNN net {n} train")
        va_f, va_y = extract_features(encoder, val_loader, device, max_batches, progress, f"kNN net {n} val")
        encoder.train(was_training)
        pred = weighted_knn_predict(tr_f, tr_y, va_f, num_classes, k, t)
        result.append(100.0 * float((pred == va_y).float().mean()))
    return result
