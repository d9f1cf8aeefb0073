"""Supervised Mutual Contrastive Learning with in-batch contrast (docs/method.md §2).

Vocabulary: for networks a and b, the "own" logits of a contrast a's embeddings with
themselves (VCL), the "cross" logits contrast a's anchors with b's keys (ICL). The soft
terms make one network's contrastive distribution mimic another's with a KL divergence
whose target is detached. ``assemble_mcl_losses`` combines any such logits into the four
terms; the in-batch version here and the memory-bank version (losses/memory.py) differ
only in how the logits and their positives are built.
"""
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses.kd import kl_distill


class MCLLosses(NamedTuple):
    """The four MCL terms, each a scalar tensor; sums over networks / pairs, not means."""

    vcl: Tensor
    soft_vcl: Tensor
    icl: Tensor
    soft_icl: Tensor


class ProjectionHead(nn.Module):
    """g_n: Linear(dim_in, dim_out) -> ReLU -> Linear(dim_out, dim_out) -> L2 normalise.

    At least float32, also inside an autocast region: the embeddings feed similarity logits
    divided by a small temperature, where bfloat16's 8-bit mantissa (about 3 significant
    digits) would blur the contrastive distributions. The backbone stays under autocast.
    float64 stays float64 (the parity tests run whole models in float64).
    """

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.proj_head = nn.Sequential(
            nn.Linear(dim_in, dim_out), nn.ReLU(inplace=True), nn.Linear(dim_out, dim_out))

    def forward(self, features: Tensor) -> Tensor:
        """(B, dim_in) features (extra trailing dims are flattened) -> (B, dim_out) unit rows."""
        with torch.autocast(features.device.type, enabled=False):
            return F.normalize(self.proj_head(at_least_float32(features.flatten(1))), dim=1)


def build_projection_heads(feature_dims: Sequence[int], dim_out: int = 128) -> nn.ModuleList:
    """One ProjectionHead per network, from that network's feature size."""
    return nn.ModuleList(ProjectionHead(dim, dim_out) for dim in feature_dims)


def contrastive_log_prob(logits: Tensor, denominator_mask: Optional[Tensor] = None) -> Tensor:
    """log p_ij = logits_ij - log sum_k [mask_ik] exp(logits_ik); (B, K) -> (B, K).

    denominator_mask: bool, broadcastable to (B, K); None means every column. Uses a
    log-sum-exp over the kept columns (others filled with -inf), never log(sum(exp)).
    """
    if denominator_mask is None:
        return logits - torch.logsumexp(logits, dim=1, keepdim=True)
    keep = denominator_mask.expand_as(logits)
    # A row with nothing to contrast (B = 1) cannot have a positive either; giving it every
    # column keeps its unused value finite, so its zero weight never meets an inf or NaN.
    keep = keep | ~keep.any(dim=1, keepdim=True)
    masked = logits.masked_fill(~keep, float("-inf"))
    return logits - torch.logsumexp(masked, dim=1, keepdim=True)


def supervised_contrastive_loss(logits: Tensor, positive_mask: Tensor,
                                denominator_mask: Optional[Tensor] = None) -> Tensor:
    """-mean_i ( mean_{j: P_ij} log p_ij ) over the rows i that have a positive -> scalar.

    logits (B, K); positive_mask bool broadcastable to (B, K), a subset of the denominator.
    Rows without a positive are left out of the mean; if no row has one the result is 0,
    still in the autograd graph. No data-dependent Python branch (no host sync on GPU).
    """
    log_prob = contrastive_log_prob(logits, denominator_mask)
    positive = positive_mask.expand_as(logits)
    num_positive = positive.sum(dim=1)
    # torch.where rather than a product: 0 * (huge or inf) would give NaN.
    row_mean = torch.where(positive, log_prob, 0.0).sum(dim=1) / num_positive.clamp(min=1)
    has_positive = num_positive > 0
    return -(row_mean * has_positive).sum() / has_positive.sum().clamp(min=1)


def in_batch_masks(labels: Tensor) -> Tuple[Tensor, Tensor]:
    """labels (B,) -> (positive, denominator), bool (B, B): same class minus self; not self."""
    not_self = ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    same_class = labels[:, None] == labels[None, :]
    return same_class & not_self, not_self


def similarity_blocks(embeddings: Sequence[Tensor], tau: float) -> List[List[Tensor]]:
    """S[a][b] = e_a e_b^T / tau for every ordered pair; N x (B, D) -> N x N x (B, B).

    One (N*B, D) x (D, N*B) matmul, then slicing: every block is needed (diagonal blocks
    for VCL, all others for ICL), the flops equal N^2 separate products, but it is a single
    kernel launch and the blocks are views. S[b][a] is S[a][b] transposed; computing both
    halves costs less than N(N+1)/2 small launches at these sizes (B ~ 128, N <= 4).
    """
    batch = embeddings[0].shape[0]
    stacked = torch.cat(list(embeddings), dim=0)
    full = at_least_float32(stacked @ stacked.T) / tau
    blocks = range(len(embeddings))
    return [[full[a * batch:(a + 1) * batch, b * batch:(b + 1) * batch] for b in blocks]
            for a in blocks]


def at_least_float32(logits: Tensor) -> Tensor:
    """Upcast half / bfloat16 logits (e.g. under autocast) so log-sum-exp and KL run in float32."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def assemble_mcl_losses(own_logits: Sequence[Tensor], cross_logits: Sequence[Sequence[Tensor]],
                        own_loss: Callable[[Tensor], Tensor],
                        cross_loss: Callable[[Tensor], Tensor], kd_T: float) -> MCLLosses:
    """Combine per-network logits into the four MCL terms (docs/method.md §2-§4).

    own_logits[a]: network a's own logits; cross_logits[a][b]: anchors of one network vs
    keys of the other, with the (a, b) convention of docs/method.md §2 (used only for a != b).
    VCL = sum_a own_loss(own_a); SoftVCL = sum_{a != b} KL_T(own_a, own_b.detach());
    ICL = sum_{a<b} cross_loss(X_ab) + cross_loss(X_ba);
    SoftICL = sum_{a<b} KL_T(X_ab, X_ba.detach()) + KL_T(X_ba, X_ab.detach()).
    With one network the three mutual terms are zero tensors (no gradient).
    """
    n = len(own_logits)
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    X = cross_logits
    vcl = [own_loss(own_logits[a]) for a in range(n)]
    soft_vcl = [kl_distill(own_logits[a], own_logits[b].detach(), kd_T)
                for a in range(n) for b in range(n) if a != b]
    icl = [cross_loss(X[a][b]) + cross_loss(X[b][a]) for a, b in pairs]
    soft_icl = [kl_distill(X[a][b], X[b][a].detach(), kd_T) + kl_distill(X[b][a], X[a][b].detach(), kd_T)
                for a, b in pairs]
    zero = own_logits[0].new_zeros(())
    return MCLLosses(*(_sum_or(terms, zero) for terms in (vcl, soft_vcl, icl, soft_icl)))


def _sum_or(terms: List[Tensor], zero: Tensor) -> Tensor:
    return torch.stack(terms).sum() if terms else zero


def sup_mcl_losses(embeddings: Sequence[Tensor], labels: Tensor, tau: float,
                   kd_T: float) -> MCLLosses:
    """In-batch supervised MCL terms (docs/method.md §2).

    embeddings: N tensors (B, D), L2-normalised; labels (B,). S_ab = e_a e_b^T / tau.
    Positives: same class, never the row's own column; the denominator leaves the own
    column out for cross-network matrices too (the same image in the other network is
    never a positive nor a negative). KL terms use full rows, diagonal included.
    """
    _check_in_batch_inputs(embeddings, labels)
    S = similarity_blocks(embeddings, tau)
    positive, denominator = in_batch_masks(labels.to(embeddings[0].device))

    def contrast(logits: Tensor) -> Tensor:
        return supervised_contrastive_loss(logits, positive, denominator)

    own = [S[a][a] for a in range(len(S))]
    return assemble_mcl_losses(own, S, contrast, contrast, kd_T)


def _check_in_batch_inputs(embeddings: Sequence[Tensor], labels: Tensor) -> None:
    if len(embeddings) == 0:
        raise ValueError("sup_mcl_losses needs at least one network's embeddings")
    shape = embeddings[0].shape
    if len(shape) != 2 or any(e.shape != shape for e in embeddings):
        raise ValueError(f"embeddings must all be (B, D); got {[tuple(e.shape) for e in embeddings]}")
    if labels.shape != (shape[0],):
        raise ValueError(f"labels must be ({shape[0]},) to match the embeddings; got {tuple(labels.shape)}")
