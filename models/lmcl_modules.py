"""The two small networks L-MCL trains next to the cohort (Yang et al., TPAMI 2023).

- ``LossWeightNetwork``: one weight in (0, 1) per (sample, ordered pair of stages of two
  different networks), from the raw stage features; it scales that pair's contrastive and
  KL terms and is meta-learned (utils/lmcl_step.py, utils/unrolled.py).
- ``Aggregator``: per network, an attention over its stages that mixes the stage logits.

Stage features come as a nested sequence ``features[i][s]`` of ``(B, d_i)`` tensors: network
``i``, stage ``s`` (on CIFAR: the auxiliary branches from stage 1 and 2, then the backbone).

Pair order, shared by the weight network, the layer-wise loss and every ``(P, B)`` tensor:
``losses.lmcl.stage_pairs`` (for i, for j != i, for k, for z -> ``(i, k, j, z)``,
``P = n (n - 1) S^2``). Each unordered pair of (network, stage) appears once per direction.
"""
from typing import List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from losses.lmcl import stage_pairs


def pair_weights_from_hidden(hidden: Sequence[Sequence[Tensor]]) -> Tensor:
    """w_p = sigmoid(cos(h[i][k], h[j][z])) for every pair p = (i, k, j, z).

    hidden[i][s]: (B, H) -> (P, B), pairs in ``stage_pairs`` order. The cosine normalises
    with F.normalize (eps 1e-12), so it is symmetric and both directions get one weight.
    """
    unit = [[F.normalize(h, dim=1) for h in net] for net in hidden]
    pairs = stage_pairs(len(hidden), len(hidden[0]))
    cosines = [(unit[i][k] * unit[j][z]).sum(dim=1) for i, k, j, z in pairs]
    return torch.sigmoid(torch.stack(cosines))


def attention_mix(attention: Tensor, stage_logits: Sequence[Tensor]) -> Tensor:
    """sum_s attention[:, s] * stage_logits[s]; attention (B, S), S x (B, C) -> (B, C)."""
    return sum(attention[:, s:s + 1] * z for s, z in enumerate(stage_logits))


class LossWeightNetwork(nn.Module):
    """One Linear(d_{i,s} -> hidden) per (network, stage); weights by cosine of the projections.

    State-dict keys ``proj.{i}.{s}.weight|bias``, as the authors' checkpoints name them.
    """

    def __init__(self, feature_dims: Sequence[Sequence[int]], hidden: int = 128) -> None:
        super().__init__()
        self.number_net = len(feature_dims)
        self.number_stage = len(feature_dims[0])
        if any(len(dims) != self.number_stage for dims in feature_dims):
            raise ValueError(f"every network needs the same number of stages, got {feature_dims}")
        self.proj = nn.ModuleList(
            nn.ModuleList(nn.Linear(d, hidden) for d in dims) for dims in feature_dims)

    def forward(self, features: Sequence[Sequence[Tensor]]) -> Tensor:
        """features[i][s] (B, d_{i,s}) raw stage features -> pair weights (P, B) in (0.269, 0.731)."""
        hidden = [[layer(f.flatten(1)) for layer, f in zip(layers, net)]
                  for layers, net in zip(self.proj, features)]
        return pair_weights_from_hidden(hidden)


class Aggregator(nn.Module):
    """Per network i: att = softmax_s(Linear(d_i -> S)(ReLU(Linear(S d_i -> d_i)(concat_s f_{i,s}))));
    aggregated logits = sum_s att_s * logits_{i,s}.

    State-dict keys ``attention.{i}.{0,2}.weight|bias``; ``authors_aggregator_state`` renames
    the authors' ``proj_head_{i}.*``.
    """

    def __init__(self, feature_dims: Sequence[int], number_stage: int) -> None:
        super().__init__()
        self.number_stage = number_stage
        self.attention = nn.ModuleList(
            nn.Sequential(nn.Linear(number_stage * d, d), nn.ReLU(), nn.Linear(d, number_stage))
            for d in feature_dims)

    def attention_weights(self, features: Sequence[Sequence[Tensor]]) -> List[Tensor]:
        """features[i][s] (B, d_i) -> per network the stage attention (B, S), rows summing to 1."""
        return [torch.softmax(head(torch.cat([f.flatten(1) for f in net], dim=1)), dim=1)
                for head, net in zip(self.attention, features)]

    def forward(self, features: Sequence[Sequence[Tensor]],
                logits: Sequence[Sequence[Tensor]]) -> Tuple[List[Tensor], List[Tensor]]:
        """features[i][s] (B, d_i), logits[i][s] (B, C) -> (aggregated logits n x (B, C),
        attention n x (B, S))."""
        attention = self.attention_weights(features)
        return [attention_mix(att, net) for att, net in zip(attention, logits)], attention


def authors_aggregator_state(state: Mapping[str, Tensor]) -> dict:
    """The authors' Aggregator state dict (``proj_head_{i}.{0,2}.*``) with our keys."""
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if not head.startswith("proj_head_"):
            raise KeyError(f"not an Aggregator key of the authors' code: {key}")
        renamed[f"attention.{head[len('proj_head_'):]}.{rest}"] = value
    return renamed
