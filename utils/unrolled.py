"""Hypergradients through a few virtual SGD steps (the meta step of L-MCL, Yang et al., TPAMI 2023).

Parameters theta are trained by ``num_steps`` virtual steps of plain SGD with momentum and
weight decay on step objectives L_t(theta, phi); the outer objective J = L_out(theta_T) is then
differentiated with respect to phi (the loss-weight network). Nothing here touches a module:
theta is a dict of tensors, and the objectives are closures (normally around
``torch.func.functional_call``), so the live parameters never change and nothing has to be
rolled back.

Virtual SGD (momentum mu, weight decay wd, no nesterov, no dampening; the velocity starts empty):
    d_t = grad L_t(theta_t) + wd * theta_t
    b_{t+1} = d_t if t == 0 else mu * b_t + d_t
    theta_{t+1} = theta_t - lr * b_{t+1}
Every entry of theta is decayed and carries momentum in every step, also where L_t does not
reach it (its gradient is then zero).

Two ways to get dJ/dphi:
- ``authors_hypergradient``: the reverse recursion of the authors' code (their
  ``MetaSGD.meta_backward``). Starting from a0 = dJ/dtheta_T, a1 = 0, for t = T-1 .. 0:
      gamma = -lr * a0 + a1;  X_t = sum(grad L_t(theta_t) * gamma)
      hyper += dX_t/dphi;     H = dX_t/dtheta_t
      a0, a1 = a0 (1 - lr wd) + a1 + H, mu a1 - lr mu a0
  Exact reverse mode has ``wd * a1`` where this has ``a1``: the velocity's adjoint reaches
  theta_t only through d_t, its Hessian part is in H and its weight-decay part is wd * a1. The
  authors' code leaves out the factor. It gives their numbers (the paper's), so it is the
  default; on the authors' ResNet-32 iteration it moves the hypergradient by about 1.5 %
  (``exact_velocity_term=True`` puts the factor back).
- ``hypergradient(..., exact=True)``: autograd through the unrolled steps (create_graph), the
  true dJ/dphi. It keeps every step's graph (more memory) but recomputes nothing, so it is
  not slower than the recursion.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

Params = Dict[str, Tensor]
StepObjective = Callable[[int, Params], Tensor]  # (t, theta_t) -> scalar L_t; phi enters by closure
OuterObjective = Callable[[Params], Tensor]  # theta_T -> scalar J


@dataclass(frozen=True)
class VirtualSGD:
    """Hyper-parameters of the virtual steps (the authors' MetaSGD: momentum 0.9, wd 5e-4)."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class Hypergradient:
    """dJ/dphi and what the computation saw along the way (floats for logging and tests).

    step_values[t] = L_t(theta_t); step_grad_sqnorms[t] = sum ||grad L_t(theta_t)||^2;
    outer_value = J = L_out(theta_T); recursion_values = (X_{T-1}, ..., X_0) of the authors'
    recursion (empty for the exact computation).
    """

    grads: List[Tensor]
    step_values: List[float]
    step_grad_sqnorms: List[float]
    outer_value: float
    recursion_values: List[float] = field(default_factory=list)


def gradients(value: Tensor, theta: Params, create_graph: bool = False) -> Params:
    """d value / d theta for every entry; zeros where value does not depend on it."""
    grads = torch.autograd.grad(value, list(theta.values()), create_graph=create_graph, allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(theta.items(), grads)}


def sgd_update(theta: Params, grads: Params, velocity: Optional[Params],
               sgd: VirtualSGD) -> Tuple[Params, Params]:
    """One virtual step -> (theta_{t+1}, b_{t+1}); ``velocity`` None on the first step."""
    decayed = {k: grads[k] + sgd.weight_decay * p for k, p in theta.items()}
    if velocity is None:
        new_velocity = decayed
    else:
        new_velocity = {k: sgd.momentum * velocity[k] + decayed[k] for k in theta}
    return {k: p - sgd.lr * new_velocity[k] for k, p in theta.items()}, new_velocity


def squared_norm(tensors: Params) -> float:
    return float(sum((g.detach() ** 2).sum() for g in tensors.values()))


def detached_leaves(theta: Params) -> Params:
    """Fresh leaves sharing storage with theta, so gradients w.r.t. them can be taken."""
    return {k: p.detach().requires_grad_(True) for k, p in theta.items()}


def unroll(theta0: Params, objective: StepObjective, num_steps: int, sgd: VirtualSGD,
           create_graph: bool) -> Tuple[List[Params], List[float], List[float]]:
    """The virtual steps -> (theta_0 .. theta_T, step values, step gradient squared norms).

    theta_0 is a detached leaf; with create_graph the later thetas stay functions of it and of
    phi (for the exact hypergradient), without it each theta_t is a detached leaf.
    """
    thetas = [detached_leaves(theta0)]
    values, sqnorms = [], []
    velocity = None
    for t in range(num_steps):
        value = objective(t, thetas[t])
        grads = gradients(value, thetas[t], create_graph=create_graph)
        values.append(float(value.detach()))
        sqnorms.append(squared_norm(grads))
        theta_next, velocity = sgd_update(thetas[t], grads, velocity, sgd)
        if not create_graph:
            theta_next = detached_leaves(theta_next)
            velocity = {k: v.detach() for k, v in velocity.items()}
        thetas.append(theta_next)
    return thetas, values, sqnorms


def authors_hypergradient(thetas: Sequence[Params], objective: StepObjective, outer_grads: Params,
                          phi: Sequence[Tensor], sgd: VirtualSGD,
                          exact_velocity_term: bool = False) -> Tuple[List[Tensor], List[float]]:
    """The reverse recursion (module docstring) -> (dJ/dphi, [X_{T-1}, ..., X_0]).

    thetas: theta_0 .. theta_T (leaves); outer_grads: dJ/dtheta_T. Each step objective is
    evaluated again at theta_t with a graph, from the last step back to the first.
    """
    a0 = {k: g.detach() for k, g in outer_grads.items()}
    a1 = {k: torch.zeros_like(g) for k, g in a0.items()}
    hyper = [torch.zeros_like(p) for p in phi]
    recursion_values = []
    lr, mu, wd = sgd.lr, sgd.momentum, sgd.weight_decay
    for t in reversed(range(len(thetas) - 1)):
        theta = detached_leaves(thetas[t])
        grads = gradients(objective(t, theta), theta, create_graph=True)
        gamma = {k: -lr * a0[k] + a1[k] for k in a0}
        X = sum((grads[k] * gamma[k]).sum() for k in grads)
        recursion_values.append(float(X.detach()))
        hessian_gamma, phi_grads = _split_grads(X, theta, phi)
        hyper = [h + g for h, g in zip(hyper, phi_grads)]
        velocity_factor = wd if exact_velocity_term else 1.0
        new_a0 = {k: a0[k] * (1 - lr * wd) + velocity_factor * a1[k] + hessian_gamma[k] for k in a0}
        a0, a1 = new_a0, {k: mu * a1[k] - lr * mu * a0[k] for k in a0}
    return hyper, recursion_values


def _split_grads(X: Tensor, theta: Params, phi: Sequence[Tensor]) -> Tuple[Params, List[Tensor]]:
    """dX/dtheta and dX/dphi in one backward; zeros where X does not reach."""
    inputs = list(theta.values()) + list(phi)
    if X.requires_grad:
        grads = torch.autograd.grad(X, inputs, allow_unused=True)
    else:
        grads = [None] * len(inputs)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(inputs, grads)]
    return dict(zip(theta, grads[:len(theta)])), grads[len(theta):]


def hypergradient(theta0: Params, phi: Sequence[Tensor], objective: StepObjective,
                  outer_objective: OuterObjective, num_steps: int, sgd: VirtualSGD,
                  exact: bool = False) -> Hypergradient:
    """dJ/dphi for J = outer_objective(theta_T) after ``num_steps`` virtual steps from theta0.

    exact=False: the authors' recursion (their numbers); exact=True: autograd through the steps.
    theta0 and the parameters phi are never modified and no ``.grad`` is written.
    """
    thetas, values, sqnorms = unroll(theta0, objective, num_steps, sgd, create_graph=exact)
    outer = outer_objective(thetas[-1])
    if exact:
        phi_grads = torch.autograd.grad(outer, list(phi), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(phi, phi_grads)]
        return Hypergradient(grads, values, sqnorms, float(outer.detach()))
    outer_grads = gradients(outer, thetas[-1])
    grads, recursion_values = authors_hypergradient(thetas, objective, outer_grads, phi, sgd)
    return Hypergradient(grads, values, sqnorms, float(outer.detach()), recursion_values)
