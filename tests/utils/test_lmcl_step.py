"""The L-MCL step pieces (utils/lmcl_step.py) on a tiny two-network model, float64: the meta
step's wiring against autograd through virtual steps written out here, BatchNorm statistics,
and that nothing else changes; the normal update's loss."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from losses.mcl import MCLLosses
from models.lmcl_modules import Aggregator, LossWeightNetwork, stage_pairs
from utils.lmcl_step import (LMCLObjective, apply_hypergradient, functional_forward, main_losses, meta_step,
                             nesterov_sgd)

TOL = dict(rtol=1e-10, atol=1e-12)
WEIGHTS = LMCLObjective(tau=0.5, kd_T=2.0, alpha=0.3, gamma=0.7, beta=0.2, lam=1.1)
LR, MU, WD, TIMES = 0.2, 0.9, 5e-3, 2


class TinyNet(nn.Module):
    """Two stages: features (B, 4) after a BatchNorm, and after one more layer; one classifier each."""

    def __init__(self, classes=3):
        super().__init__()
        self.lin0, self.bn, self.lin1 = nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 4)
        self.fc = nn.ModuleList(nn.Linear(4, classes) for _ in range(2))

    def forward(self, x):
        h0 = torch.tanh(self.bn(self.lin0(x)))
        features = [h0, torch.tanh(self.lin1(h0))]
        return [fc(f) for fc, f in zip(self.fc, features)], features


class TinyModel(nn.Module):
    """Two TinyNets and one projection head per (network, stage): (logits, features, embeddings)."""

    def __init__(self):
        super().__init__()
        self.nets = nn.ModuleList(TinyNet() for _ in range(2))
        self.heads = nn.ModuleList(nn.ModuleList(nn.Linear(4, 3) for _ in range(2)) for _ in range(2))

    def forward(self, x):
        outputs = [net(x) for net in self.nets]
        logits, features = [o[0] for o in outputs], [o[1] for o in outputs]
        embeddings = [[F.normalize(h(f), dim=1) for h, f in zip(heads, net)] for heads, net in zip(self.heads, features)]
        return logits, features, embeddings


def toy_contrast(embeddings, targets, pair_weights):
    """Four weighted, differentiable stand-ins for the MCL terms (the meta step does not care which)."""
    terms = [0.0] * 4
    for p, (i, k, j, z) in enumerate(stage_pairs(2, 2)):
        a, b, w = embeddings[i][k], embeddings[j][z], pair_weights[p]
        terms[0] = terms[0] + (w * (1 - (a * a.roll(1, 0)).sum(1))).mean()
        terms[1] = terms[1] + (w * (a - b.detach()).pow(2).sum(1)).mean()
        terms[2] = terms[2] + (w * (1 - (a * b).sum(1))).mean()
        terms[3] = terms[3] + (w * (a[:, 0] * b[:, 1] - targets.double() * 0.1).pow(2)).mean()
    return MCLLosses(*terms)


def make_setup(seed=0):
    torch.manual_seed(seed)
    model = TinyModel().double().train()
    weight_net = LossWeightNetwork([[4, 4], [4, 4]], hidden=6).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    return model, weight_net, x, y


def stage_ce(logits, y):
    return sum(F.cross_entropy(z, y) for net in logits for z in net)


def brute_force_hypergradient(model, weight_net, x, y):
    """dJ/dphi by autograd through the virtual steps, written out on the model's parameter dict."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    velocity = None
    for t in range(TIMES + 1):
        logits, features, embeddings = functional_call(model, (theta, buffers), (x,))
        if t < TIMES:
            value = WEIGHTS.mcl_objective(toy_contrast(embeddings, y, weight_net(features)))
        else:
            value = stage_ce(logits, y)
        grads = torch.autograd.grad(value, list(theta.values()), create_graph=True, allow_unused=True)
        d = {k: (torch.zeros_like(p) if g is None else g) + WD * p for (k, p), g in zip(theta.items(), grads)}
        velocity = d if velocity is None else {k: MU * velocity[k] + d[k] for k in d}
        theta = {k: p - LR * velocity[k] for k, p in theta.items()}
    J = stage_ce(functional_call(model, (theta, buffers), (x,))[0], y)
    return torch.autograd.grad(J, list(weight_net.parameters()))


def run_meta(model, weight_net, x, y, **flags):
    return meta_step(functional_forward(model), dict(model.named_parameters()), dict(model.named_buffers()), x, y,
                     weight_net, WEIGHTS, LR, times=TIMES, momentum=MU, weight_decay=WD, contrast=toy_contrast,
                     **flags)


def test_exact_meta_step_equals_autograd_through_written_out_steps():
    model, weight_net, x, y = make_setup()
    want = brute_force_hypergradient(model, weight_net, x, y)
    got = run_meta(model, weight_net, x, y, exact_hypergradient=True)
    assert len(got.grads) == len(want)
    for g, w in zip(got.grads, want):
        torch.testing.assert_close(g, w, **TOL)
    assert len(got.step_values) == TIMES + 1


def test_authors_meta_step_is_close_to_exact_but_not_equal():
    model, weight_net, x, y = make_setup(1)
    exact = run_meta(model, weight_net, x, y, exact_hypergradient=True)
    authors = run_meta(model, weight_net, x, y)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    gap = ((flat(authors.grads) - flat(exact.grads)).norm() / flat(exact.grads).norm()).item()
    assert 1e-4 < gap < 0.3
    assert authors.step_values == pytest.approx(exact.step_values, rel=1e-12)
    assert len(authors.recursion_values) == TIMES + 1


def one_forward_statistics(model, x):
    """The BatchNorm statistics after one more train-mode forward of ``model`` (on a copy)."""
    twin = copy.deepcopy(model)
    twin(x)
    return {k: v for k, v in twin.named_buffers()}


@pytest.mark.parametrize("exact", [False, True])
def test_bn_statistics_move_once_at_theta0_by_default(exact):
    model, weight_net, x, y = make_setup(2)
    want = one_forward_statistics(model, x)
    run_meta(model, weight_net, x, y, exact_hypergradient=exact)
    for k, v in model.named_buffers():
        torch.testing.assert_close(v, want[k], rtol=1e-13, atol=1e-15)
    assert model.nets[0].bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("exact", [False, True])
def test_restore_bn_stats_leaves_them_and_everything_else_alone(exact):
    model, weight_net, x, y = make_setup(3)
    state = copy.deepcopy(model.state_dict())
    phi = copy.deepcopy(weight_net.state_dict())
    run_meta(model, weight_net, x, y, exact_hypergradient=exact, restore_bn_stats=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for k, v in weight_net.state_dict().items():
        assert torch.equal(v, phi[k]), k
    assert all(p.grad is None for p in list(model.parameters()) + list(weight_net.parameters()))


def test_hypergradient_does_not_depend_on_the_bn_choice():
    model, weight_net, x, y = make_setup(4)
    twin = copy.deepcopy(model)
    a = run_meta(model, weight_net, x, y)
    b = run_meta(twin, weight_net, x, y, restore_bn_stats=True)
    for g, h in zip(a.grads, b.grads):
        assert torch.equal(g, h)


def test_apply_hypergradient_takes_one_nesterov_step():
    model, weight_net, x, y = make_setup(5)
    result = run_meta(model, weight_net, x, y)
    before = [p.detach().clone() for p in weight_net.parameters()]
    optimizer = nesterov_sgd(weight_net.parameters(), lr=LR, momentum=MU, weight_decay=WD)
    apply_hypergradient(weight_net, optimizer, result)
    for p, p0, g in zip(weight_net.parameters(), before, result.grads):
        torch.testing.assert_close(p.detach(), p0 - LR * (1 + MU) * (g + WD * p0), **TOL)


def test_main_losses_terms_and_gradients():
    model, weight_net, x, y = make_setup(6)
    aggregator = Aggregator([4, 4], number_stage=2).double()
    logits, features, embeddings = model(x)
    out = main_losses(logits, features, embeddings, y, weight_net, aggregator, WEIGHTS, toy_contrast)
    assert not out.pair_weights.requires_grad
    torch.testing.assert_close(out.pair_weights, weight_net(features).detach(), rtol=0, atol=0)
    parts = out.terms
    total = parts["loss_cls"] + parts["loss_kd"] + parts["vcl"] + parts["soft_vcl"] + parts["icl"] + parts["soft_icl"]
    torch.testing.assert_close(out.loss, total, **TOL)
    assert out.ce_values.shape == (2 * 2 + 2,) and out.kd_values.shape == (4,)
    torch.testing.assert_close(parts["soft_icl"], WEIGHTS.lam * out.mcl_terms.soft_icl, **TOL)
    out.loss.backward()
    assert all(p.grad is None for p in weight_net.parameters())
    assert all(p.grad is not None for p in aggregator.parameters())
    assert all(p.grad is not None for p in model.heads.parameters())
