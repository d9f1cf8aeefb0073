"""L-MCL's classification and distillation terms against loop formulas and against the values
the authors' code computed in its training iteration (tests/fixtures/lmcl/reference_cases.pt)."""
import math

import torch

from losses.lmcl_objectives import (aggregate_distillation_terms, classification_terms,
                                    stage_classification_loss, stage_cross_entropies)
from tests.lmcl_fixtures import TRAIN_ITER, reference_cases


def slow_ce(logits, targets):
    """mean_b -log(exp z[b, y_b] / sum_c exp z[b, c])."""
    total = 0.0
    for b in range(logits.shape[0]):
        row = [v.item() for v in logits[b]]
        total += -(row[targets[b]] - math.log(sum(math.exp(v) for v in row)))
    return total / logits.shape[0]


def slow_kd(student, teacher, T):
    """T^2 / B sum_b sum_c q log(q / p), q = softmax(teacher / T), p = softmax(student / T)."""
    total = 0.0
    for b in range(student.shape[0]):
        s = [v.item() / T for v in student[b]]
        t = [v.item() / T for v in teacher[b]]
        zs, zt = sum(math.exp(v) for v in s), sum(math.exp(v) for v in t)
        total += sum(math.exp(tv) / zt * (tv - math.log(zt) - sv + math.log(zs)) for sv, tv in zip(s, t))
    return T * T * total / student.shape[0]


def random_case(n=2, S=3, B=4, C=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = [[torch.randn(B, C, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(S)]
              for _ in range(n)]
    aggregated = [torch.randn(B, C, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    targets = torch.randint(0, C, (B,), generator=gen)
    return logits, aggregated, targets


def test_classification_terms_match_loop_formula():
    logits, aggregated, targets = random_case(n=3)
    total, values = classification_terms(logits, aggregated, targets)
    want = [slow_ce(z, targets) for net in logits for z in net] + [slow_ce(z, targets) for z in aggregated]
    torch.testing.assert_close(values, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert abs(total.item() - sum(want)) < 1e-10
    assert abs(stage_classification_loss(logits, targets).item() - sum(want[:9])) < 1e-10


def test_distillation_terms_match_loop_formula_and_detach_the_aggregate():
    logits, aggregated, targets = random_case(n=3, seed=1)
    total, values = aggregate_distillation_terms(logits, aggregated, 3.0)
    want = [slow_kd(net[-1], agg, 3.0) for net in logits for agg in aggregated]
    torch.testing.assert_close(values, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    total.backward()
    assert all(a.grad is None for a in aggregated)
    assert all(net[s].grad is None for net in logits for s in range(2))  # only the final heads learn
    assert all(net[-1].grad is not None for net in logits)


def test_values_match_the_authors_training_iteration():
    case = reference_cases()[TRAIN_ITER]
    main = case["main_step"]
    logits = [list(net) for net in main["logits"]]
    aggregated = list(main["aggregated_logits"])
    targets = case["batch"]["targets"]
    _, ce = classification_terms(logits, aggregated, targets)
    torch.testing.assert_close(ce, main["ce_values"], rtol=1e-12, atol=0)
    torch.testing.assert_close(stage_cross_entropies(logits, targets), main["ce_values"][:6], rtol=1e-12, atol=0)
    _, kd = aggregate_distillation_terms(logits, aggregated, case["hparams"]["kd_T"])
    torch.testing.assert_close(kd, main["kd_values"], rtol=1e-12, atol=0)
