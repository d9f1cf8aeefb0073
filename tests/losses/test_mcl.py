"""sup_mcl_losses (docs/method.md §2) against explicit float64 loops, and the projection head.

The slow reference below is written term by term from docs/method.md §2 with Python loops over
networks a, b and rows/columns i, j. It is differentiable (0-d tensors), with the
teacher side of every KL built from detached embeddings, so comparing gradients checks
the detaches as well as the values.
"""
import math

import pytest
import torch

from losses.mcl import (
    MCLLosses,
    ProjectionHead,
    build_projection_heads,
    contrastive_log_prob,
    sup_mcl_losses,
    supervised_contrastive_loss,
)

TAU = 0.1
KD_T = 3.0
TERMS = ("vcl", "soft_vcl", "icl", "soft_icl")


# ----------------------------------------------------------------------------- slow reference
def slow_similarity(emb_a, emb_b, tau):
    """S[i][j] = e_a[i] . e_b[j] / tau, as a nested list of 0-d tensors."""
    batch = emb_a.shape[0]
    return [[torch.dot(emb_a[i], emb_b[j]) / tau for j in range(batch)] for i in range(batch)]


def slow_contrastive(S, labels):
    """L(S): mean over rows with a positive of -mean_{j in P_i} (S_ij - log sum_{k != i} exp S_ik)."""
    batch = len(S)
    row_losses = []
    for i in range(batch):
        positives = [j for j in range(batch) if j != i and labels[j] == labels[i]]
        if not positives:
            continue
        log_denominator = torch.log(sum(torch.exp(S[i][k]) for k in range(batch) if k != i))
        row_losses.append(-sum(S[i][j] - log_denominator for j in positives) / len(positives))
    if not row_losses:
        return torch.zeros((), dtype=torch.float64)
    return sum(row_losses) / len(row_losses)


def slow_kl(student, teacher, T):
    """T^2 / B * sum_i KL(softmax(teacher_i / T) || softmax(student_i / T)) on full rows."""
    batch = len(student)
    total = 0.0
    for i in range(batch):
        z_student = sum(torch.exp(s / T) for s in student[i])
        z_teacher = sum(torch.exp(t / T) for t in teacher[i])
        for j in range(batch):
            p = torch.exp(student[i][j] / T) / z_student
            q = torch.exp(teacher[i][j] / T) / z_teacher
            total = total + q * (torch.log(q) - torch.log(p))
    return T * T * total / batch


def slow_sup_mcl(embeddings, labels, tau, T):
    n = len(embeddings)
    labels = labels.tolist()
    S = [[slow_similarity(embeddings[a], embeddings[b], tau) for b in range(n)] for a in range(n)]
    const = [e.detach() for e in embeddings]
    S_const = [[slow_similarity(const[a], const[b], tau) for b in range(n)] for a in range(n)]
    zero = torch.zeros((), dtype=torch.float64)
    vcl, soft_vcl, icl, soft_icl = zero, zero, zero, zero
    for a in range(n):
        vcl = vcl + slow_contrastive(S[a][a], labels)
        for b in range(n):
            if a != b:
                soft_vcl = soft_vcl + slow_kl(S[a][a], S_const[b][b], T)
            if a < b:
                icl = icl + slow_contrastive(S[a][b], labels) + slow_contrastive(S[b][a], labels)
                soft_icl = (soft_icl + slow_kl(S[a][b], S_const[b][a], T)
                            + slow_kl(S[b][a], S_const[a][b], T))
    return {"vcl": vcl, "soft_vcl": soft_vcl, "icl": icl, "soft_icl": soft_icl}


# ----------------------------------------------------------------------------- helpers
def random_raw(n, batch=8, dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, batch, dim, generator=gen, dtype=torch.float64).requires_grad_(True)


def normalised(raw):
    return [torch.nn.functional.normalize(raw[a], dim=1) for a in range(raw.shape[0])]


def m_per_class_labels(batch=8, m=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    classes = torch.randperm(20, generator=gen)[: batch // m]
    return classes.repeat_interleave(m)[torch.randperm(batch, generator=gen)]


def grad_or_zero(value, inputs):
    if not value.requires_grad:
        return torch.zeros_like(inputs)
    (grad,) = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)
    return torch.zeros_like(inputs) if grad is None else grad


def assert_matches_slow(n, labels, seed=0, device=torch.device("cpu")):
    raw = random_raw(n, batch=len(labels), seed=seed)
    got = sup_mcl_losses([e.to(device) for e in normalised(raw)], labels.to(device), TAU, KD_T)
    want = slow_sup_mcl(normalised(raw), labels, TAU, KD_T)
    assert isinstance(got, MCLLosses)
    for term in TERMS:
        value = getattr(got, term).cpu()
        assert value.shape == () and torch.isfinite(value)
        assert abs(value.item() - want[term].item()) < 1e-6, term
        g_got, g_want = grad_or_zero(value, raw), grad_or_zero(want[term], raw)
        assert torch.isfinite(g_got).all(), term
        torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=0, msg=term)
    return got


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("n", [1, 2, 3])
def test_m_per_class_batch_matches_slow(n, device):
    assert_matches_slow(n, m_per_class_labels(seed=n), seed=n, device=device)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_random_labels_match_slow(n, device):
    gen = torch.Generator().manual_seed(10 + n)
    assert_matches_slow(n, torch.randint(0, 3, (8,), generator=gen), seed=10 + n, device=device)


@pytest.mark.parametrize("n", [2, 3])
def test_rows_without_positive_are_skipped(n):
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4])  # classes 3 and 4 are singletons
    got = assert_matches_slow(n, labels, seed=20 + n)
    assert got.vcl.item() > 0 and got.icl.item() > 0


def test_single_network_has_only_vcl():
    got = assert_matches_slow(1, m_per_class_labels(), seed=3)
    assert got.vcl.item() > 0
    for term in ("soft_vcl", "icl", "soft_icl"):
        assert getattr(got, term).item() == 0.0


@pytest.mark.parametrize("batch", [1, 8])
def test_no_row_has_a_positive(batch):
    raw = random_raw(2, batch=batch, seed=4)
    got = sup_mcl_losses(normalised(raw), torch.arange(batch), TAU, KD_T)
    for term in ("vcl", "icl"):
        value = getattr(got, term)
        assert value.item() == 0.0 and value.requires_grad
    total = sum(got)
    total.backward()
    assert torch.isfinite(raw.grad).all()


def test_no_positive_gradient_is_zero():
    raw = random_raw(2, seed=5)
    got = sup_mcl_losses(normalised(raw), torch.arange(8), TAU, KD_T)
    (grad,) = torch.autograd.grad(got.vcl + got.icl, raw)
    assert torch.isfinite(grad).all() and grad.abs().max().item() == 0.0


def test_soft_vcl_teacher_side_is_detached():
    """d soft_vcl / d e_1 must equal the gradient of e_1's own student term KL(S_11, S_00) alone."""
    raw = random_raw(2, seed=6)
    labels = m_per_class_labels(seed=6)
    got = sup_mcl_losses(normalised(raw), labels, TAU, KD_T)
    (grad,) = torch.autograd.grad(got.soft_vcl, raw)
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0  # each net learns as a student

    e0, e1 = normalised(raw)
    student_1_only = slow_kl(slow_similarity(e1, e1, TAU),
                             slow_similarity(e0.detach(), e0.detach(), TAU), KD_T)
    (grad_student_1,) = torch.autograd.grad(student_1_only, raw)
    torch.testing.assert_close(grad[1], grad_student_1[1], atol=1e-9, rtol=0)


def test_soft_icl_targets_are_detached():
    raw = random_raw(2, seed=7)
    e0, e1 = normalised(raw)
    got = sup_mcl_losses([e0, e1], m_per_class_labels(seed=7), TAU, KD_T)
    (grad,) = torch.autograd.grad(got.soft_icl, raw, retain_graph=True)
    c0, c1 = e0.detach(), e1.detach()
    # Without detaches the gradient would differ from this student-side-only reference.
    ref = (slow_kl(slow_similarity(e0, e1, TAU), slow_similarity(c1, c0, TAU), KD_T)
           + slow_kl(slow_similarity(e1, e0, TAU), slow_similarity(c0, c1, TAU), KD_T))
    (grad_ref,) = torch.autograd.grad(ref, raw)
    torch.testing.assert_close(grad, grad_ref, atol=1e-9, rtol=0)


def test_float32_and_label_checks():
    raw = torch.randn(2, 6, 4)
    got = sup_mcl_losses(normalised(raw), torch.tensor([0, 0, 1, 1, 2, 2]), TAU, KD_T)
    assert all(t.dtype == torch.float32 for t in got)
    with pytest.raises(ValueError):
        sup_mcl_losses(normalised(raw), torch.tensor([0, 0, 1]), TAU, KD_T)
    with pytest.raises(ValueError):
        sup_mcl_losses([], torch.tensor([0]), TAU, KD_T)


def test_half_precision_embeddings_give_float32_terms():
    raw = torch.randn(2, 6, 4)
    embeddings = [e.bfloat16() for e in normalised(raw)]
    got = sup_mcl_losses(embeddings, torch.tensor([0, 0, 1, 1, 2, 2]), TAU, KD_T)
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in got)


def test_contrastive_helpers_on_a_small_case():
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, -1.0]], dtype=torch.float64)
    keep = torch.tensor([[False, True, True], [True, False, True]])
    log_prob = contrastive_log_prob(logits, keep)
    assert abs(log_prob[0, 1].item() - (1.0 - math.log(math.e ** 1 + math.e ** 2))) < 1e-12
    positives = torch.tensor([[False, True, False], [False, False, False]])
    loss = supervised_contrastive_loss(logits, positives, keep)
    assert abs(loss.item() + log_prob[0, 1].item()) < 1e-12  # row 1 has no positive: skipped


def test_projection_head_is_unit_norm():
    head = ProjectionHead(64)
    out = head(torch.randn(5, 64))
    assert out.shape == (5, 128)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    assert sum(p.numel() for p in head.parameters()) == 24832  # docs/method.md §6.4


def test_projection_head_runs_in_at_least_float32():
    head = ProjectionHead(8, 4)
    assert head(torch.randn(3, 8, dtype=torch.bfloat16)).dtype == torch.float32
    assert head.double()(torch.randn(3, 8, dtype=torch.float64)).dtype == torch.float64


def test_build_projection_heads():
    heads = build_projection_heads([64, 256], dim_out=32)
    assert isinstance(heads, torch.nn.ModuleList) and len(heads) == 2
    assert heads[1](torch.randn(3, 256)).shape == (3, 32)
