"""kl_distill against an explicit loop formula (float64)."""
import math

import torch

from losses.kd import kl_distill


def slow_kl_distill(student, teacher, T):
    """T^2 / B * sum_i sum_j q_ij log(q_ij / p_ij), with q = softmax(teacher/T), p = softmax(student/T)."""
    batch, classes = student.shape
    total = 0.0
    for i in range(batch):
        zs = sum(math.exp(student[i, k].item() / T) for k in range(classes))
        zt = sum(math.exp(teacher[i, k].item() / T) for k in range(classes))
        for j in range(classes):
            p = math.exp(student[i, j].item() / T) / zs
            q = math.exp(teacher[i, j].item() / T) / zt
            total += q * math.log(q / p)
    return T * T * total / batch


def test_matches_loop_formula():
    gen = torch.Generator().manual_seed(0)
    for T in (1.0, 3.0):
        student = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 4
        teacher = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 4
        got = kl_distill(student, teacher, T)
        assert got.shape == ()
        assert abs(got.item() - slow_kl_distill(student, teacher, T)) < 1e-6


def test_zero_when_equal():
    logits = torch.randn(4, 10, dtype=torch.float64)
    assert abs(kl_distill(logits, logits.clone(), 3.0).item()) < 1e-12


def test_gradient_reaches_teacher_when_not_detached():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    kl_distill(student, teacher, 3.0).backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0
    assert student.grad is not None and student.grad.abs().sum() > 0

    # Reference gradient from a differentiable textbook formula.
    s2 = student.detach().clone().requires_grad_(True)
    t2 = teacher.detach().clone().requires_grad_(True)
    q = torch.softmax(t2 / 3.0, dim=1)
    ref = 9.0 * (q * (q.log() - torch.log_softmax(s2 / 3.0, dim=1))).sum() / 3
    ref.backward()
    torch.testing.assert_close(student.grad, s2.grad, atol=1e-10, rtol=0)
    torch.testing.assert_close(teacher.grad, t2.grad, atol=1e-10, rtol=0)


def test_detached_teacher_gets_no_gradient():
    student = torch.randn(3, 6, requires_grad=True)
    teacher = torch.randn(3, 6, requires_grad=True)
    kl_distill(student, teacher.detach(), 3.0).backward()
    assert teacher.grad is None
