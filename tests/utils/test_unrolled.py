"""Hypergradients through virtual SGD steps (utils/unrolled.py) on a tiny model, float64.

The exact mode is checked against autograd through steps written out here (and against finite
differences); the authors' mode against a line-by-line transcription of their recursion; and
the gap between the two against the one missing term."""
import pytest
import torch
import torch.nn.functional as F

from utils.unrolled import VirtualSGD, authors_hypergradient, gradients, hypergradient, sgd_update, unroll

TOL = dict(rtol=1e-10, atol=1e-12)
SGD = VirtualSGD(lr=0.3, momentum=0.9, weight_decay=5e-3)
TIMES = 2  # step objectives 0 .. TIMES-1 are weighted, step TIMES is the outer CE (as in L-MCL)


def make_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    theta = {"w1": rand(5, 3) * 0.7, "b1": rand(5) * 0.1, "w2": rand(4, 5) * 0.7,
             "head": rand(2, 5) * 0.5, "idle": rand(3)}  # "idle" is reached by no objective
    phi = [rand(5, 2).requires_grad_(True), rand(2).requires_grad_(True)]
    x, y = rand(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    return theta, phi, x, y


def features(theta, x):
    return torch.tanh(x @ theta["w1"].T + theta["b1"])


def outer_objective(theta, x, y):
    return F.cross_entropy(features(theta, x) @ theta["w2"].T, y)


def sample_weights(phi, f):
    """A per-sample weight in (0, 1) from the features, as the weight network gives per pair."""
    return torch.sigmoid((torch.tanh(f @ phi[0]) * phi[1]).sum(1))


def weighted_objective(theta, phi, x, y):
    f = features(theta, x)
    per_sample = F.cross_entropy(f @ theta["w2"].T, y, reduction="none")
    embed = F.normalize(f @ theta["head"].T, dim=1)
    return (sample_weights(phi, f) * (per_sample + (embed[:, 0] - 0.5) ** 2)).mean()


def step_objective(phi, x, y):
    return lambda t, theta: weighted_objective(theta, phi, x, y) if t < TIMES else outer_objective(theta, x, y)


def brute_force_outer(theta0, phi, x, y, sgd):
    """J(phi) after TIMES + 1 virtual steps, every step spelt out; differentiable in phi."""
    theta = dict(theta0)
    velocity = None
    for t in range(TIMES + 1):
        value = weighted_objective(theta, phi, x, y) if t < TIMES else outer_objective(theta, x, y)
        keys = list(theta)
        grads = torch.autograd.grad(value, [theta[k] for k in keys], create_graph=True, allow_unused=True)
        new_theta, new_velocity = {}, {}
        for k, g in zip(keys, grads):
            d = (torch.zeros_like(theta[k]) if g is None else g) + sgd.weight_decay * theta[k]
            new_velocity[k] = d if velocity is None else sgd.momentum * velocity[k] + d
            new_theta[k] = theta[k] - sgd.lr * new_velocity[k]
        theta, velocity = new_theta, new_velocity
    return outer_objective(theta, x, y)


def leaves(theta):
    return {k: v.clone().requires_grad_(True) for k, v in theta.items()}


def transcribed_recursion(theta0, phi, x, y, sgd, times):
    """The authors' meta_backward as the fixtures' notes describe it, step by step, with the
    forward virtual steps done again here (no graph kept between steps)."""
    lr, mu, wd = sgd.lr, sgd.momentum, sgd.weight_decay
    thetas, velocity, theta = [], None, {k: v.detach().clone() for k, v in theta0.items()}
    for t in range(times + 1):
        thetas.append(theta)
        th = leaves(theta)
        value = weighted_objective(th, phi, x, y) if t < times else outer_objective(th, x, y)
        g = torch.autograd.grad(value, list(th.values()), allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(th.values(), g)]
        d = [gi + wd * p for gi, p in zip(g, theta.values())]
        velocity = d if velocity is None else [mu * b + di for b, di in zip(velocity, d)]
        theta = {k: p - lr * b for (k, p), b in zip(theta.items(), velocity)}
    th = leaves(theta)
    a0 = torch.autograd.grad(outer_objective(th, x, y), list(th.values()), allow_unused=True)
    a0 = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(th.values(), a0)]  # "head", "idle": None
    a1 = [torch.zeros_like(a) for a in a0]
    hyper = [torch.zeros_like(p) for p in phi]
    for t in (2, 1, 0):
        th = leaves(thetas[t])
        value = weighted_objective(th, phi, x, y) if t < times else outer_objective(th, x, y)
        g = torch.autograd.grad(value, list(th.values()), create_graph=True, allow_unused=True)
        X = 0.0
        for gi, a, b in zip(g, a0, a1):
            if gi is not None:
                X = X + (gi * (-lr * a + b)).sum()
        both = torch.autograd.grad(X, list(th.values()) + list(phi), allow_unused=True)
        H = [torch.zeros_like(a) if h is None else h for h, a in zip(both[:len(th)], a0)]
        hyper = [h if gp is None else h + gp for h, gp in zip(hyper, both[len(th):])]
        new_a0 = [a * (1 - lr * wd) + b + h for a, b, h in zip(a0, a1, H)]
        a1 = [mu * b - lr * mu * a for a, b in zip(a0, a1)]
        a0 = new_a0
    return hyper


def test_sgd_update_is_plain_momentum_sgd_with_decay():
    theta = {"p": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    grads = {"p": torch.tensor([0.5, 0.0], dtype=torch.float64)}
    step1, v1 = sgd_update(theta, grads, None, SGD)
    torch.testing.assert_close(v1["p"], grads["p"] + SGD.weight_decay * theta["p"], **TOL)
    torch.testing.assert_close(step1["p"], theta["p"] - SGD.lr * v1["p"], **TOL)
    step2, v2 = sgd_update(step1, grads, v1, SGD)
    torch.testing.assert_close(v2["p"], SGD.momentum * v1["p"] + grads["p"] + SGD.weight_decay * step1["p"], **TOL)


def test_exact_mode_equals_autograd_through_the_written_out_steps():
    theta, phi, x, y = make_problem()
    got = hypergradient(theta, phi, step_objective(phi, x, y), lambda th: outer_objective(th, x, y),
                        TIMES + 1, SGD, exact=True)
    want = torch.autograd.grad(brute_force_outer(leaves(theta), phi, x, y, SGD), phi)
    for g, w in zip(got.grads, want):
        torch.testing.assert_close(g, w, **TOL)
    assert got.recursion_values == []
    assert got.outer_value == pytest.approx(brute_force_outer(leaves(theta), phi, x, y, SGD).item(), rel=1e-12)


def test_exact_mode_agrees_with_finite_differences():
    theta, phi, x, y = make_problem(1)
    got = hypergradient(theta, phi, step_objective(phi, x, y), lambda th: outer_objective(th, x, y),
                        TIMES + 1, SGD, exact=True).grads[1]
    eps = 1e-6
    for i in range(phi[1].numel()):
        shifted = []
        for sign in (1, -1):
            moved = [phi[0].detach(), phi[1].detach().clone()]
            moved[1][i] += sign * eps
            th = leaves(theta)
            shifted.append(brute_force_outer(th, moved, x, y, SGD).item())
        assert got[i].item() == pytest.approx((shifted[0] - shifted[1]) / (2 * eps), rel=1e-6, abs=1e-9)


def test_authors_mode_equals_the_transcribed_recursion():
    theta, phi, x, y = make_problem(2)
    got = hypergradient(theta, phi, step_objective(phi, x, y), lambda th: outer_objective(th, x, y),
                        TIMES + 1, SGD)
    want = transcribed_recursion(theta, phi, x, y, SGD, TIMES)
    for g, w in zip(got.grads, want):
        torch.testing.assert_close(g, w, **TOL)
    assert len(got.recursion_values) == TIMES + 1


def test_gap_between_the_modes_is_the_missing_decay_term():
    """The recursion with wd * a1 in place of a1 is the exact gradient; the authors' is close but
    not equal."""
    theta, phi, x, y = make_problem(3)
    objective = step_objective(phi, x, y)
    exact = hypergradient(theta, phi, objective, lambda th: outer_objective(th, x, y), TIMES + 1, SGD, exact=True)
    thetas, _, _ = unroll(theta, objective, TIMES + 1, SGD, create_graph=False)
    a0 = gradients(outer_objective(thetas[-1], x, y), thetas[-1])
    fixed, _ = authors_hypergradient(thetas, objective, a0, phi, SGD, exact_velocity_term=True)
    authors, _ = authors_hypergradient(thetas, objective, a0, phi, SGD)
    for e, f, a in zip(exact.grads, fixed, authors):
        torch.testing.assert_close(f, e, **TOL)
        gap = ((a - e).norm() / e.norm()).item()
        assert 1e-3 < gap < 0.3  # 6-8 % here; 1.6-2.2 % for the ResNet-32 case


def test_without_momentum_the_modes_agree():
    """The velocity adjoint a1 stays zero without momentum, so the missing factor does not matter."""
    theta, phi, x, y = make_problem(4)
    sgd = VirtualSGD(lr=0.3, momentum=0.0, weight_decay=5e-3)
    args = (theta, phi, step_objective(phi, x, y), lambda th: outer_objective(th, x, y), TIMES + 1, sgd)
    for e, a in zip(hypergradient(*args, exact=True).grads, hypergradient(*args).grads):
        torch.testing.assert_close(a, e, **TOL)


@pytest.mark.parametrize("exact", [False, True])
def test_leaves_parameters_and_grads_alone(exact):
    theta, phi, x, y = make_problem(5)
    theta = {k: torch.nn.Parameter(v) for k, v in theta.items()}
    before = {k: v.detach().clone() for k, v in theta.items()}
    phi_before = [p.detach().clone() for p in phi]
    hypergradient(theta, phi, step_objective(phi, x, y), lambda th: outer_objective(th, x, y), TIMES + 1, SGD,
                  exact=exact)
    for k, v in theta.items():
        assert torch.equal(v, before[k]) and v.grad is None
    for p, b in zip(phi, phi_before):
        assert torch.equal(p, b) and p.grad is None


def test_step_records():
    theta, phi, x, y = make_problem(6)
    got = hypergradient(theta, phi, step_objective(phi, x, y), lambda th: outer_objective(th, x, y), TIMES + 1, SGD)
    th = leaves(theta)
    first = weighted_objective(th, phi, x, y)
    assert got.step_values[0] == pytest.approx(first.item(), rel=1e-12)
    sq = sum((g ** 2).sum() for g in torch.autograd.grad(first, list(th.values()), allow_unused=True)
             if g is not None)
    assert got.step_grad_sqnorms[0] == pytest.approx(sq.item(), rel=1e-12)
