"""The L-MCL step pieces (utils/lmcl_step.py), float64.

On a tiny two-network model: the meta step's wiring against autograd through virtual steps
written out here, BatchNorm statistics, that nothing else changes, the normal update's loss.
On the authors' recorded ResNet-32 iteration (tests/fixtures/lmcl/): every recorded value."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from losses.lmcl import StageProjectionHeads, authors_heads_to_ours, stage_pairs
from losses.mcl import MCLLosses
from models.lmcl import authors_to_lmcl_keys, build_lmcl_cohort, load_authors_state_dict
from models.lmcl_modules import Aggregator, LossWeightNetwork, authors_aggregator_state
from tests.lmcl_fixtures import TRAIN_ITER, reference_cases, train_iter_inputs, unpack_init
from utils.lmcl_step import (CohortWithStageHeads, LMCLObjective, apply_hypergradient, functional_forward,
                             main_losses, meta_step, nesterov_sgd)

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


# ----------------------------------------------------------------------------- the authors' iteration
# One CIFAR training iteration of two L-MCL ResNet-32 as the authors' code ran it (float64, batch 16,
# lr 0.1, epoch 0 batch 0, so with the meta step): tests/fixtures/lmcl/README.md. The normal update
# (one forward and backward of the cohort) always runs; the meta step (four more, three of them
# double backwards: minutes on one core) and the exact hypergradient only with pytest --slow.


def authors_key_maps(rows):
    """Per module of the fixture: the authors' state-dict key -> ours."""
    def inverse(ours_to_authors):
        return {authors: ours for ours, authors in ours_to_authors.items()}

    identity = lambda keys: {k: k for k in keys}  # noqa: E731
    return {"net": inverse(authors_to_lmcl_keys(["resnet32", "resnet32"], identity(rows["net"]))),
            "criterion_mcl": inverse(authors_heads_to_ours(identity(rows["criterion_mcl"]))),
            "aggregator": inverse(authors_aggregator_state(identity(rows["aggregator"]))),
            "loss_weight_net": identity(rows["loss_weight_net"])}


class AuthorsIteration:
    """Our pieces, started from the authors' initial state, recording what the fixture recorded."""

    def __init__(self):
        self.case = case = reference_cases()[TRAIN_ITER]
        self.hp = hp = case["hparams"]
        init, n, S = case["init"], hp["number_net"], hp["number_stage"]
        cohort = build_lmcl_cohort("resnet32", n, hp["num_classes"]).double()
        load_authors_state_dict(cohort, unpack_init(init["net"]))
        heads = StageProjectionHeads([64] * n, S, hp["feat_dim"]).double()
        heads.load_state_dict(authors_heads_to_ours(unpack_init(init["criterion_mcl"])))
        self.model = CohortWithStageHeads(cohort, heads).train()
        self.weight_net = LossWeightNetwork([[64] * S] * n).double()
        self.weight_net.load_state_dict(unpack_init(init["loss_weight_net"]))
        self.aggregator = Aggregator([64] * n, S).double()
        self.aggregator.load_state_dict(authors_aggregator_state(unpack_init(init["aggregator"])))
        self.objective = LMCLObjective(tau=hp["tau"], kd_T=hp["kd_T"], alpha=hp["alpha"], gamma=hp["gamma"],
                                       beta=hp["beta"], lam=hp["lam"])
        self.optimizer = nesterov_sgd(list(self.model.parameters()) + list(self.aggregator.parameters()),
                                      lr=hp["lr_optimizer"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        self.weight_optimizer = nesterov_sgd(self.weight_net.parameters(), lr=hp["lr_weight_optimizer"],
                                             momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        self.inputs, self.targets = train_iter_inputs(), case["batch"]["targets"]
        self.modules = {"net": cohort, "criterion_mcl": heads, "aggregator": self.aggregator,
                        "loss_weight_net": self.weight_net}
        self.keys = authors_key_maps(case["state_rows"])

    def snapshot(self, value_of):
        """{module: {authors' key: value_of(module, our key)}}."""
        return {name: {authors: value_of(self.modules[name], ours) for authors, ours in self.keys[name].items()}
                for name in self.modules}

    @staticmethod
    def state(module, key):
        return module.state_dict()[key].detach().clone()

    @staticmethod
    def grad(module, key):
        param = dict(module.named_parameters()).get(key)
        return None if param is None or param.grad is None else param.grad.detach().clone()

    @staticmethod
    def momentum_of(optimizer):
        def value_of(module, key):
            param = dict(module.named_parameters()).get(key)
            return None if param is None else optimizer.state[param].get("momentum_buffer")
        return value_of

    def normal_update(self):
        logits, features, embeddings = self.model(self.inputs)
        self.main = main_losses(logits, features, embeddings, self.targets, self.weight_net, self.aggregator,
                                self.objective)
        self.optimizer.zero_grad()
        self.main.loss.backward()
        self.grads = self.snapshot(self.grad)
        self.optimizer.step()
        self.after_step = self.snapshot(self.state)
        self.momentum = self.snapshot(self.momentum_of(self.optimizer))

    def meta_update(self):
        hp = self.hp
        self.meta = meta_step(functional_forward(self.model), dict(self.model.named_parameters()),
                              dict(self.model.named_buffers()), self.inputs, self.targets, self.weight_net,
                              self.objective, hp["lr_meta_optimizer"], times=hp["times"], momentum=hp["momentum"],
                              weight_decay=hp["weight_decay"])
        # the true gradient of the same objective, leaving the BatchNorm statistics alone
        self.exact = meta_step(functional_forward(self.model), dict(self.model.named_parameters()),
                               dict(self.model.named_buffers()), self.inputs, self.targets, self.weight_net,
                               self.objective, hp["lr_meta_optimizer"], times=hp["times"], momentum=hp["momentum"],
                               weight_decay=hp["weight_decay"], exact_hypergradient=True, restore_bn_stats=True)
        apply_hypergradient(self.weight_net, self.weight_optimizer, self.meta)
        self.weight_momentum = self.snapshot(self.momentum_of(self.weight_optimizer))
        self.after = self.snapshot(self.state)


@pytest.fixture(scope="module")
def authors_normal_update():
    iteration = AuthorsIteration()
    iteration.normal_update()
    return iteration


@pytest.fixture(scope="module")
def authors_meta_update(authors_normal_update, request):
    if not request.config.getoption("--slow"):
        pytest.skip("the meta step of the authors' ResNet-32 iteration takes minutes on one core; "
                    "pytest --slow runs it")
    authors_normal_update.meta_update()
    return authors_normal_update


def assert_stats_match(stats, rows, tensors, rtol, what):
    """Our tensors (authors' key -> tensor or None) against recorded moments and leading values.

    moments = [sum x, sum |x|, sum x^2, numel]: sum x is compared to within rtol * sum |x| (it can
    cancel), the others relatively; the first 8 values within rtol * their largest magnitude.
    Returns how many entries were compared.
    """
    checked = 0
    for key, row in rows.items():
        expected, head = stats["moments"][row], stats["head"][row]
        if torch.isnan(expected).all():
            continue
        got = tensors.get(key)
        assert got is not None, f"{what}: {key} recorded, missing here"
        flat = got.double().flatten()
        moments = torch.stack([flat.sum(), flat.abs().sum(), (flat * flat).sum(),
                               torch.tensor(float(flat.numel()), dtype=torch.float64)])
        assert abs(moments[0].item() - expected[0].item()) <= rtol * expected[1].item(), (what, key)
        torch.testing.assert_close(moments[1:], expected[1:], rtol=rtol, atol=0, msg=f"{what}: {key}")
        count = min(8, flat.numel())
        want = head[:count]
        torch.testing.assert_close(flat[:count], want, rtol=0, atol=rtol * want.abs().max().item(),
                                   msg=f"{what}: {key}")
        checked += 1
    return checked


def test_authors_iteration_normal_update(authors_normal_update):
    it = authors_normal_update
    expected, main = it.case["main_step"], it.main
    close = dict(rtol=1e-12, atol=0)
    torch.testing.assert_close(main.loss, expected["total_loss"], **close)
    torch.testing.assert_close(main.ce_values, expected["ce_values"], **close)
    torch.testing.assert_close(main.kd_values, expected["kd_values"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(torch.stack(list(main.mcl_terms)), expected["mcl_terms"], **close)
    torch.testing.assert_close(main.pair_weights, expected["pair_weights"], **close)
    torch.testing.assert_close(torch.stack(main.aggregated), expected["aggregated_logits"], rtol=1e-12, atol=1e-13)
    rows = it.case["state_rows"]
    for name in ("net", "criterion_mcl", "aggregator"):
        assert assert_stats_match(expected["grad_stats"][name], rows[name], it.grads[name], 1e-10, "grad " + name)
        assert assert_stats_match(expected["optimizer_momentum_stats"][name], rows[name], it.momentum[name], 1e-10,
                                  "momentum " + name)
    for name in ("net", "criterion_mcl", "aggregator", "loss_weight_net"):
        assert assert_stats_match(expected["after_step_stats"][name], rows[name], it.after_step[name], 1e-12,
                                  "after step " + name)


def test_authors_iteration_meta_step(authors_meta_update):
    it = authors_meta_update
    expected, meta = it.case["meta_step"], it.meta
    step_values = torch.tensor(meta.step_values, dtype=torch.float64)
    torch.testing.assert_close(step_values[:2], expected["inner_objective_values"], rtol=1e-10, atol=0)
    torch.testing.assert_close(step_values[2], expected["outer_objective_step3_value"], rtol=1e-10, atol=0)
    assert meta.outer_value == pytest.approx(expected["outer_objective_final_value"].item(), rel=1e-10)
    torch.testing.assert_close(torch.tensor(meta.step_grad_sqnorms, dtype=torch.float64),
                               expected["virtual_step_grad_sqnorm"], rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.tensor(meta.recursion_values, dtype=torch.float64),
                               expected["meta_backward_X_values"], rtol=1e-9, atol=0)
    for (key, _), got in zip(it.weight_net.named_parameters(), meta.grads):
        want = expected["hypergrad_loss_weight_net"][key]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * want.abs().max().item(), msg=key)


def test_authors_iteration_exact_hypergradient_differs_by_a_few_percent(authors_meta_update):
    """The authors' recursion lacks one factor (utils/unrolled.py); here it moves the
    hypergradient by about 1.5 % (norm of the difference over the norm, per tensor 1.3-1.7 %)."""
    it = authors_meta_update
    assert it.exact.step_values == pytest.approx(it.meta.step_values, rel=1e-12)
    for authors, exact in zip(it.meta.grads, it.exact.grads):
        gap = ((authors - exact).norm() / exact.norm()).item()
        assert 0.005 < gap < 0.03


def test_authors_iteration_state_after_the_weight_step(authors_meta_update):
    """Networks and heads as after the normal update, BatchNorm statistics moved once more, the
    aggregator untouched, the weight network one nesterov step along the hypergradient."""
    it = authors_meta_update
    rows, expected = it.case["state_rows"], it.case["after_stats"]
    for name, rtol in (("net", 1e-12), ("criterion_mcl", 1e-12), ("aggregator", 1e-12), ("loss_weight_net", 1e-9)):
        assert assert_stats_match(expected[name], rows[name], it.after[name], rtol, "after " + name)
    assert assert_stats_match(it.case["meta_step"]["weight_optimizer_momentum_stats"]["loss_weight_net"],
                              rows["loss_weight_net"], it.weight_momentum["loss_weight_net"], 1e-9, "weight momentum")
    tracked = [v for k, v in it.after["net"].items() if k.endswith("num_batches_tracked")]
    assert tracked and all(v.item() == 2 for v in tracked)
