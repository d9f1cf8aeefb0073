"""Self-supervised MCL losses on MoCo queues (docs/method.md §4).

For networks a, b with queries q_a (B, D), keys k_b (B, D) and queue Q_b (D, K):

    A_ab = [q_a . k_b , q_a Q_b] / T      (B, 1 + K), the positive is class 0.

    VCL      = sum_n CE(A_nn, 0)
    soft VCL = sum_{a != b} KL_kdT(A_aa || A_bb)      (teacher A_bb detached)
    ICL      = sum_{a < b} CE(A_ab, 0) + CE(A_ba, 0)
    soft ICL = sum_{a < b} KL_kdT(A_ab || A_ba) + KL_kdT(A_ba || A_ab)

Sums over networks, as the original. The queues must be read before this step's
keys are enqueued.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F

from losses.mcl import MCLLosses, assemble_mcl_losses


def moco_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """q, k (B, D), queue (D, K) -> logits (B, 1 + K) with the positive in column 0."""
    queue = queue.detach()
    l_pos = (q * k.detach()).sum(dim=1, keepdim=True)
    l_neg = q @ queue
    return torch.cat([l_pos, l_neg], dim=1) / T


def all_pair_logits(
    queries: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], queues: torch.Tensor, T: float
) -> List[List[torch.Tensor]]:
    """logits[a][b] = A_ab: query of network a against key and queue of network b."""
    n = len(queries)
    return [[moco_logits(queries[a], keys[b], queues[b], T) for b in range(n)] for a in range(n)]


def positive_class_ce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with target 0 for every row of logits (B, 1 + K)."""
    target = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


def moco_mcl_losses(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    queues: torch.Tensor,
    T: float,
    kd_T: float = 3.0,
) -> MCLLosses:
    """The four MCL terms on MoCo logits.

    queries, keys: N tensors (B, D), L2-normalised (keys carry no gradient);
    queues: (N, D, K) as they were before this step's keys are enqueued.
    Returns MCLLosses(vcl, soft_vcl, icl, soft_icl), scalar tensors; the soft
    terms are 0 when N == 1.
    """
    if len(queries) != len(keys) or len(queries) != queues.size(0):
        raise ValueError(f"got {len(queries)} queries, {len(keys)} keys and {queues.size(0)} queues")
    A = all_pair_logits(queries, keys, queues, T)
    own = [A[n][n] for n in range(len(A))]
    return assemble_mcl_losses(own, A, positive_class_ce, positive_class_ce, kd_T)


def instance_logits(
    queries: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], queues: torch.Tensor, T: float
) -> List[torch.Tensor]:
    """A_nn (B, 1 + K) of every network, for the instance-discrimination accuracy the original logs."""
    with torch.no_grad():
        return [moco_logits(q, k, queues[i], T) for i, (q, k) in enumerate(zip(queries, keys))]
