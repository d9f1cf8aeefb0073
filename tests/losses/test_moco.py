"""moco_mcl_losses against slow per-sample formulas written from docs/method.md §4."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses.moco import moco_mcl_losses


def slow_logits(q, k, queue, T):
    """Row by row: [q_i . k_i, q_i . queue[:, j] for j] / T."""
    rows = []
    for i in range(q.size(0)):
        row = [float(q[i] @ k[i])] + [float(q[i] @ queue[:, j]) for j in range(queue.size(1))]
        rows.append([v / T for v in row])
    return rows


def slow_ce0(rows):
    """mean_i -log softmax(row_i)[0]."""
    total = 0.0
    for row in rows:
        m = max(row)
        log_z = m + math.log(sum(math.exp(v - m) for v in row))
        total += log_z - row[0]
    return total / len(rows)


def slow_kl(student_rows, teacher_rows, t):
    """kd_T^2 * mean_i sum_c p_t log(p_t / p_s) with softmax at temperature kd_T."""

    def softmax(row):
        m = max(v / t for v in row)
        e = [math.exp(v / t - m) for v in row]
        s = sum(e)
        return [x / s for x in e]

    total = 0.0
    for s_row, t_row in zip(student_rows, teacher_rows):
        p_s, p_t = softmax(s_row), softmax(t_row)
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    return t * t * total / len(student_rows)


def random_inputs(n, b, d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    queries = [F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1) for _ in range(n)]
    keys = [F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1) for _ in range(n)]
    queues = F.normalize(torch.randn(n, d, k, generator=g, dtype=torch.float64), dim=1)
    return queries, keys, queues


@pytest.mark.parametrize("n", [1, 2, 3])
def test_losses_match_slow_formulas(n, device):
    T, kd_T = 0.2, 3.0
    queries, keys, queues = random_inputs(n, b=5, d=4, k=7, seed=n)
    got = moco_mcl_losses([q.to(device) for q in queries], [k.to(device) for k in keys], queues.to(device), T, kd_T)

    A = [[slow_logits(queries[a], keys[b], queues[b], T) for b in range(n)] for a in range(n)]
    vcl = sum(slow_ce0(A[i][i]) for i in range(n))
    soft_vcl = sum(slow_kl(A[a][a], A[b][b], kd_T) for a in range(n) for b in range(n) if a != b)
    icl = sum(slow_ce0(A[a][b]) + slow_ce0(A[b][a]) for a in range(n) for b in range(a + 1, n))
    soft_icl = sum(
        slow_kl(A[a][b], A[b][a], kd_T) + slow_kl(A[b][a], A[a][b], kd_T) for a in range(n) for b in range(a + 1, n)
    )
    assert got.vcl.item() == pytest.approx(vcl, rel=1e-9)
    assert got.soft_vcl.item() == pytest.approx(soft_vcl, rel=1e-9, abs=1e-12)
    assert got.icl.item() == pytest.approx(icl, rel=1e-9, abs=1e-12)
    assert got.soft_icl.item() == pytest.approx(soft_icl, rel=1e-9, abs=1e-12)
    assert got._fields == ("vcl", "soft_vcl", "icl", "soft_icl")


def test_gradient_reaches_queries_only_through_students():
    queries, keys, queues = random_inputs(2, b=4, d=3, k=5)
    queries = [q.clone().requires_grad_(True) for q in queries]
    keys = [k.clone().requires_grad_(True) for k in keys]
    queues = queues.clone().requires_grad_(True)
    losses = moco_mcl_losses(queries, keys, queues, T=0.07)
    sum(losses).backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in queries)
    assert all(k.grad is None for k in keys)
    assert queues.grad is None


def test_soft_terms_use_detached_teachers():
    """Soft VCL's gradient on q_0 comes only from A_00 as student: teacher side is detached."""
    queries, keys, queues = random_inputs(2, b=4, d=3, k=5, seed=3)
    q0 = queries[0].clone().requires_grad_(True)
    q1 = queries[1].clone().requires_grad_(True)
    soft_vcl = moco_mcl_losses([q0, q1], keys, queues, T=0.5).soft_vcl
    (g0,) = torch.autograd.grad(soft_vcl, [q0], retain_graph=True)
    from losses.kd import kl_distill
    from losses.moco import moco_logits

    student = moco_logits(q0, keys[0], queues[0], 0.5)
    teacher = moco_logits(q1, keys[1], queues[1], 0.5).detach()
    expected = kl_distill(student, teacher, 3.0)
    (g_ref,) = torch.autograd.grad(expected, [q0])
    assert torch.allclose(g0, g_ref)


def test_mismatched_lengths_raise():
    queries, keys, queues = random_inputs(2, b=2, d=3, k=4)
    with pytest.raises(ValueError):
        moco_mcl_losses(queries, keys[:1], queues, T=0.1)
