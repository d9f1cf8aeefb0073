"""memory_mcl_losses / update_memories / init_memory (docs/method.md §3) against float64 loops.

The slow reference is written from docs/method.md §3 with loops over networks a, b, samples i and
columns k; it is differentiable with the KL teachers built from detached embeddings and
the memories read as constants, so gradient comparison checks the detaches too.
"""
import math

import pytest
import torch

from losses.mcl import MCLLosses
from losses.memory import init_memory, memory_mcl_losses, update_memories

TAU = 0.07
KD_T = 3.0
TERMS = ("vcl", "soft_vcl", "icl", "soft_icl")
N_DATA, DIM, BATCH, NEG_K = 24, 6, 4, 5


# ----------------------------------------------------------------------------- slow reference
def slow_logits(memory, embedding, idx, tau, skip_first):
    """X[i][k] = memory[idx[i][k]] . embedding[i] / tau over idx (without column 0 if skip_first)."""
    start = 1 if skip_first else 0
    return [[torch.dot(memory[idx[i][k]], embedding[i]) / tau for k in range(start, len(idx[i]))]
            for i in range(len(idx))]


def slow_positive_loss(X, num_positive):
    """-mean_i mean_{k < num_positive} log softmax(X_i)_k (denominator: every column)."""
    total = 0.0
    for row in X:
        log_denominator = torch.log(sum(torch.exp(x) for x in row))
        total = total + sum(row[k] - log_denominator for k in range(num_positive)) / num_positive
    return -total / len(X)


def slow_kl(student, teacher, T):
    batch = len(student)
    total = 0.0
    for i in range(batch):
        z_student = sum(torch.exp(s / T) for s in student[i])
        z_teacher = sum(torch.exp(t / T) for t in teacher[i])
        for k in range(len(student[i])):
            p = torch.exp(student[i][k] / T) / z_student
            q = torch.exp(teacher[i][k] / T) / z_teacher
            total = total + q * (torch.log(q) - torch.log(p))
    return T * T * total / batch


def slow_memory_mcl(embeddings, memories, pos_idx, neg_idx, tau, T):
    n = len(embeddings)
    pos_k = pos_idx.shape[1] - 1
    idx = torch.cat([pos_idx, neg_idx], dim=1).tolist()
    mems = [m.detach() for m in memories]
    const = [e.detach() for e in embeddings]
    X = [[slow_logits(mems[a], embeddings[b], idx, tau, False) for b in range(n)] for a in range(n)]
    Xc = [[slow_logits(mems[a], const[b], idx, tau, False) for b in range(n)] for a in range(n)]
    V = [slow_logits(mems[a], embeddings[a], idx, tau, True) for a in range(n)]
    Vc = [slow_logits(mems[a], const[a], idx, tau, True) for a in range(n)]
    zero = torch.zeros((), dtype=torch.float64)
    vcl, soft_vcl, icl, soft_icl = zero, zero, zero, zero
    for a in range(n):
        vcl = vcl + slow_positive_loss(V[a], pos_k)
        for b in range(n):
            if a != b:
                soft_vcl = soft_vcl + slow_kl(V[a], Vc[b], T)
            if a < b:
                icl = (icl + slow_positive_loss(X[a][b], 1 + pos_k)
                       + slow_positive_loss(X[b][a], 1 + pos_k))
                soft_icl = soft_icl + slow_kl(X[a][b], Xc[b][a], T) + slow_kl(X[b][a], Xc[a][b], T)
    return {"vcl": vcl, "soft_vcl": soft_vcl, "icl": icl, "soft_icl": soft_icl}


# ----------------------------------------------------------------------------- inputs
def make_inputs(n, pos_k, seed):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, BATCH, DIM, generator=gen, dtype=torch.float64).requires_grad_(True)
    memories = [torch.nn.functional.normalize(
        torch.randn(N_DATA, DIM, generator=gen, dtype=torch.float64), dim=1).requires_grad_(True)
        for _ in range(n)]
    own = torch.randperm(N_DATA, generator=gen)[:BATCH]
    others = torch.randint(0, N_DATA, (BATCH, pos_k), generator=gen)
    pos_idx = torch.cat([own[:, None], others], dim=1)
    neg_idx = torch.randint(0, N_DATA, (BATCH, NEG_K), generator=gen)
    return raw, memories, pos_idx, neg_idx


def normalised(raw):
    return [torch.nn.functional.normalize(raw[a], dim=1) for a in range(raw.shape[0])]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("pos_k", [1, 2])
def test_every_term_matches_slow(n, pos_k, device):
    raw, memories, pos_idx, neg_idx = make_inputs(n, pos_k, seed=10 * n + pos_k)
    got = memory_mcl_losses([e.to(device) for e in normalised(raw)], [m.to(device) for m in memories],
                            pos_idx.to(device), neg_idx.to(device), TAU, KD_T)
    want = slow_memory_mcl(normalised(raw), memories, pos_idx, neg_idx, TAU, KD_T)
    assert isinstance(got, MCLLosses)
    for term in TERMS:
        value = getattr(got, term)
        assert value.shape == ()
        assert abs(value.item() - want[term].item()) < 1e-6, term
        (g_got,) = torch.autograd.grad(value, raw, retain_graph=True)
        (g_want,) = torch.autograd.grad(want[term], raw, retain_graph=True)
        torch.testing.assert_close(g_got, g_want, atol=1e-6, rtol=0, msg=term)


def test_memories_receive_no_gradient():
    raw, memories, pos_idx, neg_idx = make_inputs(2, 1, seed=1)
    got = memory_mcl_losses(normalised(raw), memories, pos_idx, neg_idx, TAU, KD_T)
    sum(got).backward()
    assert all(m.grad is None for m in memories)
    assert raw.grad is not None and torch.isfinite(raw.grad).all()


def test_single_network_has_only_vcl():
    raw, memories, pos_idx, neg_idx = make_inputs(1, 1, seed=2)
    got = memory_mcl_losses(normalised(raw), memories, pos_idx, neg_idx, TAU, KD_T)
    want = slow_memory_mcl(normalised(raw), memories, pos_idx, neg_idx, TAU, KD_T)
    assert abs(got.vcl.item() - want["vcl"].item()) < 1e-6
    assert got.soft_vcl.item() == got.icl.item() == got.soft_icl.item() == 0.0


def test_update_after_loss_does_not_change_gradients():
    raw, memories, pos_idx, neg_idx = make_inputs(2, 1, seed=3)
    plain = [m.detach().clone() for m in memories]
    got = memory_mcl_losses(normalised(raw), plain, pos_idx, neg_idx, TAU, KD_T)
    (before,) = torch.autograd.grad(sum(got), raw, retain_graph=True)
    update_memories(plain, [e.detach() for e in normalised(raw)], pos_idx[:, 0], 0.5)
    (after,) = torch.autograd.grad(sum(got), raw)
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_pos_idx_without_positive_column_is_rejected():
    raw, memories, pos_idx, neg_idx = make_inputs(2, 1, seed=4)
    with pytest.raises(ValueError):
        memory_mcl_losses(normalised(raw), memories, pos_idx[:, :1], neg_idx, TAU, KD_T)


def test_half_precision_embeddings_with_float32_banks():
    raw, memories, pos_idx, neg_idx = make_inputs(2, 1, seed=8)
    banks = [m.detach().float() for m in memories]
    embeddings = [e.detach().bfloat16().requires_grad_(True) for e in normalised(raw)]
    got = memory_mcl_losses(embeddings, banks, pos_idx, neg_idx, TAU, KD_T)
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in got)
    sum(got).backward()
    assert embeddings[0].grad.dtype == torch.bfloat16
    update_memories(banks, embeddings, pos_idx[:, 0], 0.5)
    assert banks[0].dtype == torch.float32
    torch.testing.assert_close(banks[0][pos_idx[:, 0]].norm(dim=1), torch.ones(BATCH))


def test_update_memories_matches_formula():
    gen = torch.Generator().manual_seed(5)
    memories = [init_memory(N_DATA, DIM, generator=gen).double() for _ in range(2)]
    original = [m.clone() for m in memories]
    embeddings = [torch.nn.functional.normalize(
        torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64), dim=1).requires_grad_(True)
        for _ in range(2)]
    indices = torch.tensor([7, 0, 23, 12])
    update_memories(memories, embeddings, indices, momentum=0.5)
    for n in range(2):
        expected = original[n].clone()
        for i, row in enumerate(indices.tolist()):
            mixed = [0.5 * original[n][row, d].item() + 0.5 * embeddings[n][i, d].item()
                     for d in range(DIM)]
            norm = math.sqrt(sum(x * x for x in mixed))
            expected[row] = torch.tensor([x / norm for x in mixed], dtype=torch.float64)
        torch.testing.assert_close(memories[n], expected, atol=1e-12, rtol=0)
        assert not memories[n].requires_grad


def test_duplicate_indices_last_occurrence_wins():
    gen = torch.Generator().manual_seed(6)
    memory = init_memory(N_DATA, DIM, generator=gen)
    original = memory.clone()
    embedding = torch.nn.functional.normalize(torch.randn(3, DIM, generator=gen), dim=1)
    update_memories([memory], [embedding], torch.tensor([4, 9, 4]), momentum=0.3)
    expected = torch.nn.functional.normalize(0.3 * original[4] + 0.7 * embedding[2], dim=0)
    torch.testing.assert_close(memory[4], expected)
    # The first occurrence is not applied on top of the last one.
    torch.testing.assert_close(memory[9], torch.nn.functional.normalize(
        0.3 * original[9] + 0.7 * embedding[1], dim=0))


def test_init_memory_range_and_determinism():
    bound = 1.0 / math.sqrt(128 / 3)
    memory = init_memory(500, 128, generator=torch.Generator().manual_seed(0))
    assert memory.shape == (500, 128) and memory.dtype == torch.float32
    assert memory.min().item() >= -bound and memory.max().item() <= bound
    assert memory.min().item() < -0.99 * bound and memory.max().item() > 0.99 * bound
    again = init_memory(500, 128, generator=torch.Generator().manual_seed(0))
    assert torch.equal(memory, again)
