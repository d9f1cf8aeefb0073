"""One L-MCL training iteration (Yang et al., TPAMI 2023): the normal update's loss and the meta step.

Pieces, each with explicit inputs (no args object):

- ``main_losses``: the loss of the normal update. Cross-entropy of every stage of every network
  and of every network's aggregated logits; KL distillation of every network's final head
  towards every network's detached aggregated logits (i = j included); the layer-wise MCL
  terms, each pair and sample scaled by the weight network's output, which is computed
  without gradient here. The caller then steps one ``nesterov_sgd`` optimizer over the
  networks, the projection heads and the aggregator.
- ``meta_step``: every ``--meta-freq`` iterations, after the normal update, the weight
  network phi learns through ``times`` virtual SGD steps of the networks and heads theta on
  the weighted MCL objective, one more on the stage cross-entropies, and the outer objective
  J = stage cross-entropies at the end (utils/unrolled.py has the maths). The networks are
  run with ``torch.func.functional_call`` on dicts of tensors: the live parameters never
  change, so there is nothing to roll back. ``apply_hypergradient`` then steps the weight
  optimizer (nesterov SGD, lr of the schedule, momentum 0.9, wd 5e-4).

BatchNorm running statistics in the meta step: every forward there is in train mode and
would move them. By default they are moved exactly once, by the forward at theta_0 (the
parameters after the normal update), which is what the authors' code leaves behind (it
restores the networks and then runs that forward once more); it is part of the paper's
numbers. ``restore_bn_stats=True`` leaves them as the normal update left them.

The model seen by the meta step is one functional forward over theta:
``forward(params, buffers, inputs) -> (logits[i][s] (B, C), features[i][s] (B, d_i),
embeddings[i][s] (B, d))`` with the embeddings from the projection heads (unit rows);
``functional_forward(CohortWithStageHeads(cohort, heads))`` is that forward for an L-MCL
cohort (models/lmcl.py) and its heads (losses/lmcl.py).

The MCL terms come from a *contrast* ``(embeddings, targets, pair_weights) -> MCLLosses``:
by default the in-batch layer-wise loss (``LMCLObjective.in_batch_contrast``); a memory-bank
one (ImageNet) can be passed instead.

Precision: run the meta step in float32 or float64, outside autocast. It differentiates
through gradients (double backward), which the fused BatchNorm kernel of the bf16 fast path
does not provide, and the fixtures' notes show it is ill-conditioned at lr 0.1 (float32 and
float64 hypergradients already differ by tens of percent).
"""
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call

from losses.lmcl import StageProjectionHeads, layer_mcl_losses, weighted_mcl_sum
from losses.lmcl_objectives import aggregate_distillation_terms, classification_terms, stage_classification_loss
from losses.mcl import MCLLosses
from utils.unrolled import Hypergradient, Params, VirtualSGD, hypergradient

Nested = Sequence[Sequence[Tensor]]
Forward = Callable[[Params, Params, Tensor], Tuple[Nested, Nested, Nested]]
# (embeddings[i][s] unit rows, targets (B,), pair weights (P, B)) -> the four unscaled terms
Contrast = Callable[[Nested, Tensor, Tensor], MCLLosses]


@dataclass(frozen=True)
class LMCLObjective:
    """The loss hyper-parameters (the authors' CIFAR defaults): contrast temperature tau,
    distillation temperature kd_T (KD and the soft terms), weights of the four MCL terms."""

    tau: float = 0.1
    kd_T: float = 3.0
    alpha: float = 0.1  # VCL
    gamma: float = 1.0  # soft VCL
    beta: float = 0.1  # ICL
    lam: float = 1.0  # soft ICL

    def mcl_objective(self, terms: MCLLosses) -> Tensor:
        """alpha * vcl + gamma * soft_vcl + beta * icl + lam * soft_icl."""
        return weighted_mcl_sum(terms, self.alpha, self.gamma, self.beta, self.lam)

    def in_batch_contrast(self, embeddings: Nested, targets: Tensor, pair_weights: Tensor) -> MCLLosses:
        """The CIFAR contrast: layer-wise MCL within the batch (losses/lmcl.py), a ``Contrast``."""
        return layer_mcl_losses(embeddings, targets, pair_weights, self.tau, self.kd_T)


class MainLoss(NamedTuple):
    """The normal update's loss and its parts.

    terms: scalar tensors ``loss, loss_cls, loss_kd, vcl, soft_vcl, icl, soft_icl`` (the MCL
    ones scaled by their weights, as logged); ce_values (n*S + n,): stage CEs in (i, s) order
    then the aggregated ones; kd_values (n^2,) in (i, j) order; mcl_terms: the unscaled terms;
    pair_weights (P, B); aggregated n x (B, C); attention n x (B, S).
    """

    loss: Tensor
    terms: Dict[str, Tensor]
    ce_values: Tensor
    kd_values: Tensor
    mcl_terms: MCLLosses
    pair_weights: Tensor
    aggregated: List[Tensor]
    attention: List[Tensor]


def main_losses(logits: Nested, features: Nested, embeddings: Nested, targets: Tensor,
                weight_net: nn.Module, aggregator: nn.Module, objective: LMCLObjective,
                contrast: Optional[Contrast] = None) -> MainLoss:
    """The loss of the normal update (module docstring); gradient reaches the networks, the
    heads and the aggregator, never the weight network. contrast: None for the in-batch one."""
    contrast = contrast or objective.in_batch_contrast
    with torch.no_grad():
        pair_weights = weight_net(features)
    aggregated, attention = aggregator(features, logits)
    loss_cls, ce_values = classification_terms(logits, aggregated, targets)
    loss_kd, kd_values = aggregate_distillation_terms(logits, aggregated, objective.kd_T)
    mcl = contrast(embeddings, targets, pair_weights)
    scaled = {"vcl": objective.alpha * mcl.vcl, "soft_vcl": objective.gamma * mcl.soft_vcl,
              "icl": objective.beta * mcl.icl, "soft_icl": objective.lam * mcl.soft_icl}
    loss = loss_cls + loss_kd + objective.mcl_objective(mcl)
    terms = {"loss": loss, "loss_cls": loss_cls, "loss_kd": loss_kd, **scaled}
    return MainLoss(loss, terms, ce_values, kd_values, mcl, pair_weights, aggregated, attention)


class CohortWithStageHeads(nn.Module):
    """An L-MCL cohort and its per-(network, stage) projection heads as one module, theta of
    the meta step. ``forward(x) -> (logits[i][s], features[i][s], embeddings[i][s])``."""

    def __init__(self, cohort: nn.Module, heads: StageProjectionHeads) -> None:
        super().__init__()
        self.cohort = cohort
        self.heads = heads

    def forward(self, x: Tensor) -> Tuple[List[List[Tensor]], List[List[Tensor]], List[List[Tensor]]]:
        logits, features = self.cohort(x)
        return logits, features, self.heads(features)


def functional_forward(module: nn.Module) -> Forward:
    """``(params, buffers, x) -> module(x)`` with the given tensors in place of the module's."""
    return lambda params, buffers, inputs: functional_call(module, (params, buffers), (inputs,))


class _BufferRouting:
    """Buffers for each forward of the meta step: the live ones for the first (at theta_0)
    unless they are to be left alone, scratch copies for every other."""

    def __init__(self, buffers: Params, update_live_once: bool) -> None:
        self.live = buffers
        self.scratch = {k: b.clone() for k, b in buffers.items()}
        self.live_pending = update_live_once

    def next(self) -> Params:
        if self.live_pending:
            self.live_pending = False
            return self.live
        return self.scratch


def meta_step(forward: Forward, params: Params, buffers: Params, inputs: Tensor, targets: Tensor,
              weight_net: nn.Module, objective: LMCLObjective, lr: float, times: int = 2,
              momentum: float = 0.9, weight_decay: float = 5e-4, contrast: Optional[Contrast] = None,
              exact_hypergradient: bool = False, restore_bn_stats: bool = False) -> Hypergradient:
    """The weight network's hypergradient from one batch (module docstring).

    params: theta, the networks' and heads' parameters (e.g. ``dict(model.named_parameters())``);
    buffers: the model's buffers. Virtual steps t < ``times`` descend the weighted MCL objective
    (weights from ``weight_net`` with gradient), step ``times`` the stage cross-entropies; plain
    SGD with ``momentum`` and ``weight_decay``, velocity starting empty. contrast: None for the
    in-batch one; it must not change any state (a memory bank is updated by the caller, once
    per iteration). exact_hypergradient: autograd through the steps instead of the authors'
    recursion. Returns dJ/dphi in the order of ``weight_net.parameters()`` (under DDP each rank
    gets its own batch's; average them before ``apply_hypergradient``). No parameter and no
    ``.grad`` is changed, the buffers only as the module docstring says.
    """
    contrast = contrast or objective.in_batch_contrast
    routing = _BufferRouting(buffers, update_live_once=not restore_bn_stats)

    def stage_ce(theta: Params) -> Tensor:
        logits, _, _ = forward(theta, routing.next(), inputs)
        return stage_classification_loss(logits, targets)

    def step_objective(t: int, theta: Params) -> Tensor:
        if t >= times:
            return stage_ce(theta)
        _, features, embeddings = forward(theta, routing.next(), inputs)
        return objective.mcl_objective(contrast(embeddings, targets, weight_net(features)))

    sgd = VirtualSGD(lr=lr, momentum=momentum, weight_decay=weight_decay)
    return hypergradient(params, list(weight_net.parameters()), step_objective, stage_ce, times + 1, sgd,
                         exact=exact_hypergradient)


def apply_hypergradient(weight_net: nn.Module, weight_optimizer: torch.optim.Optimizer,
                        result: Hypergradient) -> None:
    """Set the weight network's gradients to the hypergradient and step its optimizer."""
    for param, grad in zip(weight_net.parameters(), result.grads):
        param.grad = grad.detach().clone()
    weight_optimizer.step()


def nesterov_sgd(params: Iterable[Tensor], lr: float, momentum: float = 0.9,
                 weight_decay: float = 5e-4) -> torch.optim.SGD:
    """The optimizer of the normal update (networks, heads, aggregator) and of the weight network."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
