"""The classification and distillation terms of L-MCL (Yang et al., TPAMI 2023).

Inputs are nested per network and stage: ``stage_logits[i][s]`` (B, C), stage S-1 being the
network's own head; ``aggregated[i]`` (B, C) the aggregator's mix of network i's stage logits.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.kd import kl_distill


def stage_cross_entropies(stage_logits: Sequence[Sequence[Tensor]], targets: Tensor) -> Tensor:
    """CE (batch mean) of every stage of every network, (n * S,) in (i, s) order."""
    return torch.stack([F.cross_entropy(z, targets) for net in stage_logits for z in net])


def stage_classification_loss(stage_logits: Sequence[Sequence[Tensor]], targets: Tensor) -> Tensor:
    """sum_i sum_s CE(logits_{i,s}, y): the meta step's outer objective (no aggregator, no KD)."""
    return stage_cross_entropies(stage_logits, targets).sum()


def classification_terms(stage_logits: Sequence[Sequence[Tensor]], aggregated: Sequence[Tensor],
                         targets: Tensor) -> Tuple[Tensor, Tensor]:
    """sum_i sum_s CE(logits_{i,s}, y) + sum_i CE(agg_i, y) -> (total, values (n*S + n,)):
    the stage CEs in (i, s) order, then the aggregated ones."""
    values = torch.cat([stage_cross_entropies(stage_logits, targets),
                        torch.stack([F.cross_entropy(z, targets) for z in aggregated])])
    return values.sum(), values


def aggregate_distillation_terms(stage_logits: Sequence[Sequence[Tensor]], aggregated: Sequence[Tensor],
                                 kd_T: float) -> Tuple[Tensor, Tensor]:
    """sum_i sum_j KL_T(final head of i, agg_j detached), i = j included -> (total, values (n^2,)),
    values in (i, j) order. KL_T is T^2 * batch-mean KL(softmax(agg/T) || softmax(logits/T))."""
    finals: List[Tensor] = [net[-1] for net in stage_logits]
    values = torch.stack([kl_distill(student, teacher.detach(), kd_T)
                          for student in finals for teacher in aggregated])
    return values.sum(), values
