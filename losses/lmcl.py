"""Layer-wise Mutual Contrastive Learning (L-MCL) losses.

Yang et al., "Online Knowledge Distillation via Mutual Contrastive Learning for Visual
Recognition" (TPAMI 2023). Each of N networks is read at S stages (models/lmcl.py); every
(net, stage) has its own projection head, and the four MCL terms (VCL, soft VCL, ICL, soft
ICL) are taken between every stage of every network and every stage of every *other*
network, each pair with a weight per anchor sample (from the meta-learned weight network).

Pair order, shared by the weights and every per-pair tensor (:func:`stage_pairs`): for net i,
for net j != i, for stage k, for stage z: ``(i, k, j, z)``; P = N (N-1) S^2. Both directions
of an unordered pair appear.

For pair p = (i, k, j, z) with a = e[i][k], b = e[j][z] (B, D unit rows) and weights w (B,):

- ``Cw(M)   = -(1/B) sum_r w_r * mean_{c in pos(r)} log p_rc`` (rows without a positive give 0);
- ``Kw(s, t) = (T^2/B) sum_r w_r * KL(softmax(t_r / T) || softmax(s_r / T))``, t detached;
- in-batch (CIFAR): ``S_xy = x y^T / tau``; positives are same-class columns other than the
  row itself, the denominator every column but the row's own (also across networks);
  ``vcl = Cw(S_aa) + Cw(S_bb)``, ``soft_vcl = Kw(S_aa, S_bb) + Kw(S_bb, S_aa)``,
  ``icl = Cw(S_ab) + Cw(S_ba)``, ``soft_icl = Kw(S_ab, S_ba) + Kw(S_ba, S_ab)``;
- memory banks (ImageNet): see :func:`memory_layer_mcl_pair_terms`.

The totals are plain sums over pairs; training uses
``alpha vcl + gamma soft_vcl + beta icl + lam soft_icl`` (:func:`weighted_mcl_sum`).
The weights receive gradient: that is how the weight network learns in the meta step.
"""
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from losses.mcl import MCLLosses, ProjectionHead, at_least_float32, in_batch_masks
from losses.memory import memory_cross_logits, update_memories

Embeddings = Union[Tensor, Sequence[Sequence[Tensor]]]  # (N, S, B, D) or N x S of (B, D)
PairWeights = Union[Tensor, Sequence[Tensor]]  # (P, B) or P of (B,)


def stage_pairs(number_net: int, number_stage: int) -> List[Tuple[int, int, int, int]]:
    """``[(i, k, j, z)]`` for i in nets, j != i, k and z in stages: the order of every per-pair tensor."""
    return [(i, k, j, z)
            for i in range(number_net) for j in range(number_net) if j != i
            for k in range(number_stage) for z in range(number_stage)]


def weighted_mcl_sum(terms: MCLLosses, alpha: float, gamma: float, beta: float, lam: float) -> Tensor:
    """``alpha vcl + gamma soft_vcl + beta icl + lam soft_icl`` (the L-MCL contrastive loss)."""
    return alpha * terms.vcl + gamma * terms.soft_vcl + beta * terms.icl + lam * terms.soft_icl


# ----------------------------------------------------------------------------- projection heads

class StageProjectionHeads(nn.Module):
    """One ProjectionHead per (network, stage): ``heads[n][s]`` maps network n's stage features.

    ``forward(features)``: N x S raw features (B, F_n) -> N x S unit embeddings (B, dim_out).
    The raw features are left as they are (the weight network and the aggregator read them).
    """

    def __init__(self, feature_dims: Sequence[int], number_stage: int, dim_out: int = 128):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.ModuleList(ProjectionHead(dim, dim_out) for _ in range(number_stage)) for dim in feature_dims)

    def forward(self, features: Sequence[Sequence[Tensor]]) -> List[List[Tensor]]:
        if len(features) != len(self.heads) or any(len(f) != len(h) for f, h in zip(features, self.heads)):
            raise ValueError(f"expected features of {len(self.heads)} networks x {len(self.heads[0])} stages, "
                             f"got {[len(f) for f in features]}")
        return [[head(f) for head, f in zip(heads, per_net)] for heads, per_net in zip(self.heads, features)]


def authors_heads_to_ours(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The authors' head state (``embed_list.{n}.{s}.proj_head.*``) -> StageProjectionHeads keys."""
    prefix = "embed_list."
    if any(not k.startswith(prefix) for k in state):
        raise ValueError(f"expected keys starting with {prefix!r}")
    return {"heads." + k[len(prefix):]: v for k, v in state.items()}


# ----------------------------------------------------------------------------- row-wise pieces

def contrastive_rows(log_prob: Tensor, positive: Tensor) -> Tensor:
    """``-mean_{c: positive[r, c]} log_prob[r, c]`` per row; 0 for a row without a positive.

    log_prob (..., B, K); positive bool broadcastable to it -> (..., B).
    """
    positive = positive.expand_as(log_prob)
    count = positive.sum(-1)
    return -torch.where(positive, log_prob, 0.0).sum(-1) / count.clamp(min=1)


def kl_rows(student_log_prob: Tensor, teacher_log_prob: Tensor, T: float) -> Tensor:
    """``T^2 * KL(q_t || q_s)`` per row from temperature-scaled log-softmaxes (..., K) -> (...).

    The caller passes the teacher detached.
    """
    return (T * T) * (teacher_log_prob.exp() * (teacher_log_prob - student_log_prob)).sum(-1)


def weighted_row_mean(rows: Tensor, weights: Tensor) -> Tensor:
    """``(1/B) sum_r w_r rows_r`` per pair: rows, weights (P, B) -> (P,)."""
    return (weights * rows).sum(-1) / rows.shape[-1]


def _as_units(embeddings: Embeddings) -> Tensor:
    """N x S of (B, D) (or (N, S, B, D)) -> (N, S, B, D)."""
    if isinstance(embeddings, Tensor):
        return embeddings
    return torch.stack([torch.stack(list(per_net)) for per_net in embeddings])


def _as_pair_weights(weights: PairWeights, num_pairs: int, batch: int) -> Tensor:
    w = weights if isinstance(weights, Tensor) else torch.stack(list(weights))
    if w.shape != (num_pairs, batch):
        raise ValueError(f"weights must be ({num_pairs}, {batch}) (pairs x batch); got {tuple(w.shape)}")
    return w


def _pair_unit_indices(number_net: int, number_stage: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Flat (net, stage) unit index of both sides of every pair: (P,), (P,)."""
    pairs = torch.tensor(stage_pairs(number_net, number_stage), device=device)
    return pairs[:, 0] * number_stage + pairs[:, 1], pairs[:, 2] * number_stage + pairs[:, 3]


def _check_units(units: Tensor) -> None:
    if units.dim() != 4 or units.shape[0] < 2:
        raise ValueError(f"embeddings must be (N >= 2, S, B, D); got {tuple(units.shape)}")


# ----------------------------------------------------------------------------- in-batch (CIFAR)

def layer_mcl_pair_terms(embeddings: Embeddings, labels: Tensor, weights: PairWeights, tau: float,
                         kd_T: float) -> Tensor:
    """In-batch L-MCL terms of every pair: (P, 4) = (vcl, soft_vcl, icl, soft_icl).

    embeddings: N x S of (B, D) unit rows (or (N, S, B, D)); labels (B,); weights (P, B) in
    :func:`stage_pairs` order. All (net, stage) similarity blocks come from one matmul; each
    block's row terms are computed once and shared by the pairs that use it (an own block
    S_aa serves every pair of its unit).
    """
    units = _as_units(embeddings)
    _check_units(units)
    n, s, batch = units.shape[:3]
    w = _as_pair_weights(weights, n * (n - 1) * s * s, batch)
    flat = units.flatten(0, 2)  # (U B, D), U = N S (net, stage) units
    similarity = at_least_float32(flat @ flat.T) / tau
    blocks = similarity.view(n * s, batch, n * s, batch).transpose(1, 2)  # [u, v] = e_u e_v^T / tau
    positive, denominator = in_batch_masks(labels.to(units.device))
    log_prob = blocks - torch.logsumexp(blocks.masked_fill(~denominator, float("-inf")), dim=-1, keepdim=True)
    contrast = contrastive_rows(log_prob, positive)  # (U, U, B)
    soft = torch.log_softmax(blocks / kd_T, dim=-1)
    target = soft.detach()
    u, v = _pair_unit_indices(n, s, units.device)

    def cw(a: Tensor, b: Tensor) -> Tensor:
        return weighted_row_mean(contrast[a, b], w)

    def kw(student: Tuple[Tensor, Tensor], teacher: Tuple[Tensor, Tensor]) -> Tensor:
        return weighted_row_mean(kl_rows(soft[student], target[teacher], kd_T), w)

    vcl = cw(u, u) + cw(v, v)
    soft_vcl = kw((u, u), (v, v)) + kw((v, v), (u, u))
    icl = cw(u, v) + cw(v, u)
    soft_icl = kw((u, v), (v, u)) + kw((v, u), (u, v))
    return torch.stack([vcl, soft_vcl, icl, soft_icl], dim=1)


def layer_mcl_losses(embeddings: Embeddings, labels: Tensor, weights: PairWeights, tau: float,
                     kd_T: float) -> MCLLosses:
    """In-batch L-MCL: the four terms summed over all pairs (see :func:`layer_mcl_pair_terms`)."""
    return MCLLosses(*layer_mcl_pair_terms(embeddings, labels, weights, tau, kd_T).sum(0))


# ----------------------------------------------------------------------------- memory banks (ImageNet)

def memory_layer_mcl_pair_terms(embeddings: Embeddings, memories: Sequence[Tensor], pos_idx: Tensor,
                                neg_idx: Tensor, weights: PairWeights, tau: float, kd_T: float,
                                vcl_partner_memory: bool = False) -> Tensor:
    """Memory-bank L-MCL terms of every pair: (P, 4) = (vcl, soft_vcl, icl, soft_icl).

    embeddings: N x S of (B, D) unit rows; memories: N banks (n_data, D), read without gradient;
    pos_idx (B, 1 + pos_k), column 0 the sample's own index; neg_idx (B, neg_k); weights (P, B).
    With idx = [pos_idx | neg_idx] (K columns) and idx' = idx without column 0, for pair
    (i, k, j, z), a = e[i][k], b = e[j][z]:

    - ``Lij = M_i[idx] . b / tau``, ``Lji = M_j[idx] . a / tau``;
      ``icl = nce(Lij, 1 + pos_k) + nce(Lji, 1 + pos_k)``, ``soft_icl = Kw(Lij, Lji) + Kw(Lji, Lij)``;
    - ``La = M_i[idx'] . a / tau``, ``Lb = M_i[idx'] . b / tau``;
      ``vcl = nce(La, pos_k) + nce(Lb, pos_k)``, ``soft_vcl = Kw(La, Lb) + Kw(Lb, La)``;

    where ``nce(L, P) = -(1/B) sum_r w_r mean_{t < P} log_softmax(L_r)_t`` (softmax over all
    columns). ``Lb`` reads net i's bank, as the authors' code does (it defines their numbers);
    ``vcl_partner_memory=True`` reads net j's bank there instead (b against its own network's
    bank, which was presumably meant).
    """
    units = _as_units(embeddings)
    _check_units(units)
    n, s, batch = units.shape[:3]
    if len(memories) != n:
        raise ValueError(f"need one memory bank per network; got {n} networks and {len(memories)} banks")
    if pos_idx.dim() != 2 or pos_idx.shape[0] != batch or pos_idx.shape[1] < 2:
        raise ValueError(f"pos_idx must be (B={batch}, 1 + pos_k) with pos_k >= 1; got {tuple(pos_idx.shape)}")
    if neg_idx.dim() != 2 or neg_idx.shape[0] != batch:
        raise ValueError(f"neg_idx must be (B={batch}, neg_k); got {tuple(neg_idx.shape)}")
    pairs = stage_pairs(n, s)
    w = _as_pair_weights(weights, len(pairs), batch)
    pos_k = pos_idx.shape[1] - 1
    idx = torch.cat([pos_idx, neg_idx], dim=1)
    X = memory_cross_logits(memories, list(units.flatten(0, 1)), idx, tau)  # X[bank][unit] (B, K)
    cache: Dict[Tuple[int, int, bool], _MemoryRows] = {}

    def logit_rows(bank: int, unit: int, without_own_column: bool) -> _MemoryRows:
        key = (bank, unit, without_own_column)
        if key not in cache:
            x = X[bank][unit]
            cache[key] = (_MemoryRows(x[:, 1:], pos_k, kd_T) if without_own_column
                          else _MemoryRows(x, 1 + pos_k, kd_T))
        return cache[key]

    rows: List[List[Tensor]] = [[], [], [], []]  # vcl, soft_vcl, icl, soft_icl; each P x (B,)
    for i, k, j, z in pairs:
        a, b = i * s + k, j * s + z
        lij, lji = logit_rows(i, b, False), logit_rows(j, a, False)
        la, lb = logit_rows(i, a, True), logit_rows(j if vcl_partner_memory else i, b, True)
        rows[0].append(la.nce + lb.nce)
        rows[1].append(la.kl_toward(lb) + lb.kl_toward(la))
        rows[2].append(lij.nce + lji.nce)
        rows[3].append(lij.kl_toward(lji) + lji.kl_toward(lij))
    return torch.stack([weighted_row_mean(torch.stack(r), w) for r in rows], dim=1)


class _MemoryRows:
    """Row quantities of one (B, K) memory logit matrix, computed once and shared by its pairs."""

    def __init__(self, logits: Tensor, num_positive: int, T: float):
        self.nce = -torch.log_softmax(logits, dim=1)[:, :num_positive].mean(1)
        self.soft = torch.log_softmax(logits / T, dim=1)
        self.T = T

    def kl_toward(self, teacher: "_MemoryRows") -> Tensor:
        """T^2 KL(teacher || self) per row, teacher detached: (B,)."""
        return kl_rows(self.soft, teacher.soft.detach(), self.T)


def memory_layer_mcl_losses(embeddings: Embeddings, memories: Sequence[Tensor], pos_idx: Tensor,
                            neg_idx: Tensor, weights: PairWeights, tau: float, kd_T: float,
                            vcl_partner_memory: bool = False) -> MCLLosses:
    """Memory-bank L-MCL: the four terms summed over pairs (see :func:`memory_layer_mcl_pair_terms`)."""
    return MCLLosses(*memory_layer_mcl_pair_terms(embeddings, memories, pos_idx, neg_idx, weights, tau, kd_T,
                                                  vcl_partner_memory).sum(0))


@torch.no_grad()
def update_layer_memories(memories: Sequence[Tensor], embeddings: Embeddings, pos_idx: Tensor,
                          momentum: float) -> None:
    """In place: ``M_n[a_r] <- normalize(m M_n[a_r] + (1 - m) e[n][S-1][r])`` with a_r = pos_idx[r, 0].

    Only the last stage (the network itself) updates its network's bank. Under DDP pass the
    embeddings and pos_idx gathered over ranks, so every rank applies the same update.
    """
    last = [per_net[-1] for per_net in embeddings]
    update_memories(memories, last, pos_idx[:, 0], momentum)
