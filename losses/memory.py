"""Supervised MCL against per-network memory banks (ImageNet, docs/method.md §3).

Each network n keeps a bank M_n (n_data, D) of momentum-averaged, L2-normalised
embeddings, one row per training sample. The banks are constants for the loss (never
trained, no gradient) and are refreshed after each step by ``update_memories``.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from losses.mcl import MCLLosses, assemble_mcl_losses, at_least_float32, supervised_contrastive_loss


def init_memory(n_data: int, dim: int, generator: Optional[torch.Generator] = None,
                device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A fresh bank (n_data, dim), uniform in [-s, s) with s = 1 / sqrt(dim / 3)."""
    bound = 1.0 / math.sqrt(dim / 3)
    bank = torch.rand(n_data, dim, generator=generator, device=device, dtype=dtype)
    return bank.mul_(2 * bound).sub_(bound)


def gather_memory_rows(memory: Tensor, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """memory (n_data, D), idx (B, K) long -> (B, K, D) copy of the rows, outside autograd."""
    rows = memory.detach().index_select(0, idx.reshape(-1).to(memory.device))
    return rows.view(*idx.shape, memory.shape[1]).to(dtype)


def memory_cross_logits(memories: Sequence[Tensor], embeddings: Sequence[Tensor], idx: Tensor,
                        tau: float) -> List[List[Tensor]]:
    """X[a][b][i, k] = M_a[idx_ik] . e_b[i] / tau for every ordered pair (a, b), each (B, K).

    Each bank's rows are gathered once per step (B x K x D, the big tensor) and multiplied
    by all N embeddings of the sample in one bmm, so every gathered row is read once
    instead of once per pair, and no (N, B, K, D) stack is ever built.
    """
    per_sample = torch.stack(list(embeddings), dim=2)  # (B, D, N)
    logits = []
    for memory in memories:
        rows = gather_memory_rows(memory, idx, per_sample.dtype)
        with_all_nets = at_least_float32(torch.bmm(rows, per_sample)) / tau  # (B, K, N)
        logits.append([with_all_nets[:, :, b] for b in range(len(embeddings))])
    return logits


def first_columns_mask(num_columns: int, num_positive: int, device: torch.device) -> Tensor:
    """(1, num_columns) bool, True on the first num_positive columns."""
    return (torch.arange(num_columns, device=device) < num_positive)[None, :]


def memory_mcl_losses(embeddings: Sequence[Tensor], memories: Sequence[Tensor], pos_idx: Tensor,
                      neg_idx: Tensor, tau: float, kd_T: float) -> MCLLosses:
    """Memory-bank MCL terms (docs/method.md §3).

    embeddings: N (B, D) L2-normalised; memories: N (n_data, D) banks (read only);
    pos_idx (B, 1 + pos_k) long, column 0 = the sample's own index; neg_idx (B, neg_k).
    idx = [pos_idx, neg_idx] (K columns). ICL uses X_ab over all K columns with the first
    1 + pos_k as positives (the sample itself in the other bank counts); VCL uses
    V_a = X_aa without column 0, positives its first pos_k columns.
    """
    _check_memory_inputs(embeddings, memories, pos_idx, neg_idx)
    idx = torch.cat([pos_idx, neg_idx], dim=1)
    num_columns, pos_k = idx.shape[1], pos_idx.shape[1] - 1
    X = memory_cross_logits(memories, embeddings, idx, tau)
    own = [X[a][a][:, 1:] for a in range(len(X))]
    device = embeddings[0].device
    cross_positive = first_columns_mask(num_columns, 1 + pos_k, device)
    own_positive = first_columns_mask(num_columns - 1, pos_k, device)
    return assemble_mcl_losses(
        own, X,
        own_loss=lambda logits: supervised_contrastive_loss(logits, own_positive),
        cross_loss=lambda logits: supervised_contrastive_loss(logits, cross_positive),
        kd_T=kd_T)


@torch.no_grad()
def update_memories(memories: Sequence[Tensor], embeddings: Sequence[Tensor], indices: Tensor,
                    momentum: float) -> None:
    """In place, for each network n and sample i: M_n[idx_i] <- normalize(m M_n[idx_i] + (1-m) e_n[i]).

    memories N (n_data, D); embeddings N (B, D); indices (B,) long. Under DDP pass the
    batch gathered over ranks so every rank applies the same update. An index repeated in
    the batch (only possible via DDP padding overlap) is updated once, from its LAST
    occurrence; a raw index_copy_ with duplicates is nondeterministic on CUDA.
    """
    rows, source = _last_occurrences(indices.to(memories[0].device))
    for memory, embedding in zip(memories, embeddings):
        fresh = embedding.detach()[source.to(embedding.device)].to(memory.device, memory.dtype)
        mixed = momentum * memory.index_select(0, rows) + (1 - momentum) * fresh
        memory.index_copy_(0, rows, F.normalize(mixed, dim=1))


def _last_occurrences(indices: Tensor) -> Tuple[Tensor, Tensor]:
    """indices (B,) -> (distinct indices (U,), position in the batch of each one's last occurrence (U,))."""
    rows, inverse = torch.unique(indices, return_inverse=True)
    positions = torch.arange(indices.numel(), device=indices.device)
    last = torch.zeros_like(rows).scatter_reduce_(0, inverse, positions, reduce="amax", include_self=False)
    return rows, last


def _check_memory_inputs(embeddings: Sequence[Tensor], memories: Sequence[Tensor], pos_idx: Tensor,
                         neg_idx: Tensor) -> None:
    if len(embeddings) == 0 or len(embeddings) != len(memories):
        raise ValueError(f"need one memory bank per network; got {len(embeddings)} embeddings "
                         f"and {len(memories)} banks")
    batch = embeddings[0].shape[0]
    if pos_idx.dim() != 2 or pos_idx.shape[0] != batch or pos_idx.shape[1] < 2:
        raise ValueError(f"pos_idx must be (B={batch}, 1 + pos_k) with pos_k >= 1; "
                         f"got {tuple(pos_idx.shape)}")
    if neg_idx.dim() != 2 or neg_idx.shape[0] != batch:
        raise ValueError(f"neg_idx must be (B={batch}, neg_k); got {tuple(neg_idx.shape)}")
