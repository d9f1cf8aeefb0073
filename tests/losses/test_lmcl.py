"""losses/lmcl.py: layer-wise MCL against slow row-by-row formulas and the authors' values.

The slow references are written from the definitions in losses/lmcl.py's docstring with a
Python loop over pairs and over anchor rows (columns vectorised), in float64; they are
differentiable with every KL teacher detached, so comparing gradients (w.r.t. the embeddings
and the pair weights) checks the detaches too. The fixture cases are the authors' code's
values (tests/fixtures/lmcl/README.md), compared to 1e-10.
"""
import pytest
import torch
import torch.nn.functional as F

from losses.lmcl import (
    StageProjectionHeads,
    authors_heads_to_ours,
    layer_mcl_losses,
    layer_mcl_pair_terms,
    memory_layer_mcl_losses,
    stage_pairs,
    update_layer_memories,
    weighted_mcl_sum,
)
from losses.mcl import MCLLosses
from tests.lmcl_fixtures import reference_cases

TERMS = ("vcl", "soft_vcl", "icl", "soft_icl")
TAU, KD_T = 0.1, 3.0
TIGHT = dict(rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- slow references

def slow_cw(M, positive_rows, w):
    """-(1/B) sum_r w_r mean_{c in pos(r)} (M_rc - log sum_{c' != r} exp M_rc'); rows without positive: 0."""
    batch = M.shape[0]
    total = M.new_zeros(())
    for r in range(batch):
        positives = positive_rows[r]
        if not positives:
            continue
        others = torch.cat([M[r, :r], M[r, r + 1:]])
        log_denominator = torch.logsumexp(others, 0)
        total = total + w[r] * sum(M[r, c] - log_denominator for c in positives) / len(positives)
    return -total / batch


def slow_memory_nce(L, num_positive, w):
    """-(1/B) sum_r w_r mean_{t < P} log_softmax(L_r)_t."""
    total = L.new_zeros(())
    for r in range(L.shape[0]):
        total = total + w[r] * torch.log_softmax(L[r], 0)[:num_positive].mean()
    return -total / L.shape[0]


def slow_kw(student, teacher, w, T):
    """(T^2/B) sum_r w_r KL(softmax(t_r/T) || softmax(s_r/T)), teacher detached."""
    teacher = teacher.detach()
    total = student.new_zeros(())
    for r in range(student.shape[0]):
        q = torch.softmax(teacher[r] / T, 0)
        total = total + w[r] * (q * (torch.log(q) - torch.log_softmax(student[r] / T, 0))).sum()
    return T * T * total / student.shape[0]


def slow_in_batch(emb, labels, weights, tau, T):
    """emb (N, S, B, D); -> (P, 4) per-pair terms."""
    n, s, batch = emb.shape[:3]
    positive_rows = [[c for c in range(batch) if c != r and labels[c] == labels[r]] for r in range(batch)]
    out = []
    for p, (i, k, j, z) in enumerate(stage_pairs(n, s)):
        a, b, w = emb[i, k], emb[j, z], weights[p]
        saa, sbb, sab, sba = a @ a.T / tau, b @ b.T / tau, a @ b.T / tau, b @ a.T / tau
        out.append(torch.stack([
            slow_cw(saa, positive_rows, w) + slow_cw(sbb, positive_rows, w),
            slow_kw(saa, sbb, w, T) + slow_kw(sbb, saa, w, T),
            slow_cw(sab, positive_rows, w) + slow_cw(sba, positive_rows, w),
            slow_kw(sab, sba, w, T) + slow_kw(sba, sab, w, T),
        ]))
    return torch.stack(out)


def slow_memory(emb, memories, pos_idx, neg_idx, weights, tau, T, partner=False):
    """emb (N, S, B, D), memories N x (n_data, D); -> (P, 4) per-pair terms."""
    n, s, batch = emb.shape[:3]
    pos_k = pos_idx.shape[1] - 1
    idx = torch.cat([pos_idx, neg_idx], 1)

    def logits(bank, e, columns):
        return torch.stack([memories[bank][columns[r]] @ e[r] for r in range(batch)]) / tau

    out = []
    for p, (i, k, j, z) in enumerate(stage_pairs(n, s)):
        a, b, w = emb[i, k], emb[j, z], weights[p]
        lij, lji = logits(i, b, idx), logits(j, a, idx)
        la, lb = logits(i, a, idx[:, 1:]), logits(j if partner else i, b, idx[:, 1:])
        out.append(torch.stack([
            slow_memory_nce(la, pos_k, w) + slow_memory_nce(lb, pos_k, w),
            slow_kw(la, lb, w, T) + slow_kw(lb, la, w, T),
            slow_memory_nce(lij, 1 + pos_k, w) + slow_memory_nce(lji, 1 + pos_k, w),
            slow_kw(lij, lji, w, T) + slow_kw(lji, lij, w, T),
        ]))
    return torch.stack(out)


# ----------------------------------------------------------------------------- inputs

def unit_embeddings(n, s, batch, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, s, batch, dim, generator=gen, dtype=torch.float64), dim=-1)


def pair_weights(n, s, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    return 0.01 + 0.98 * torch.rand(n * (n - 1) * s * s, batch, generator=gen, dtype=torch.float64)


def leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def assert_terms_and_grads_match(fast, slow, inputs, rtol):
    """(P, 4) values, and the gradient w.r.t. every input of one random combination of all of them
    (one backward through the slow graph; a wrong gradient of any entry would show)."""
    torch.testing.assert_close(fast, slow, rtol=rtol, atol=rtol)
    mix = torch.rand(fast.shape, generator=torch.Generator().manual_seed(0), dtype=fast.dtype) + 0.5
    got = torch.autograd.grad((mix * fast).sum(), inputs)
    want = torch.autograd.grad((mix * slow).sum(), inputs)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=rtol, atol=rtol)


# ----------------------------------------------------------------------------- pairs

def test_pair_order():
    assert stage_pairs(2, 2) == [(0, 0, 1, 0), (0, 0, 1, 1), (0, 1, 1, 0), (0, 1, 1, 1),
                                 (1, 0, 0, 0), (1, 0, 0, 1), (1, 1, 0, 0), (1, 1, 0, 1)]
    assert len(stage_pairs(3, 3)) == 54 and len(stage_pairs(2, 4)) == 32
    for name in ("cifar_layer_mcl_n3_b16_d32", "imagenet_layer_mcl_memory_n2_b8"):
        case = reference_cases()[name]
        n, s = case["hparams"]["number_net"], case["hparams"]["number_stage"]
        assert [tuple(p) for p in case["pair_index"].tolist()] == stage_pairs(n, s)


# ----------------------------------------------------------------------------- in-batch, slow formula

@pytest.mark.parametrize("n, s, labels", [
    (2, 2, [0, 0, 1, 1, 2, 2]),
    (3, 2, [4, 4, 4, 1, 1, 7]),  # class 7 has one sample: its row has no positive
])
def test_in_batch_terms_match_the_slow_formula(n, s, labels):
    labels = torch.tensor(labels)
    emb, w = leaves(unit_embeddings(n, s, len(labels), 5, seed=n), pair_weights(n, s, len(labels), seed=n))
    fast = layer_mcl_pair_terms(emb, labels, w, TAU, KD_T)
    slow = slow_in_batch(emb, labels, w, TAU, KD_T)
    assert torch.isfinite(fast).all()
    assert_terms_and_grads_match(fast, slow, [emb, w], rtol=1e-9)


def test_in_batch_second_order_matches_the_slow_formula():
    """The meta step differentiates the embedding gradient again (w.r.t. the weights and embeddings)."""
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    emb, w = leaves(unit_embeddings(2, 2, 6, 5, seed=2), pair_weights(2, 2, 6, seed=2))
    direction = torch.randn(emb.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    second = []
    for terms in (layer_mcl_pair_terms, slow_in_batch):
        g_emb, = torch.autograd.grad(terms(emb, labels, w, TAU, KD_T).sum(), emb, create_graph=True)
        second.append(torch.autograd.grad((g_emb * direction).sum(), [w, emb]))
    for got, want in zip(*second):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_in_batch_accepts_nested_lists_and_weight_lists():
    labels = torch.tensor([0, 0, 1, 1])
    emb, w = unit_embeddings(2, 3, 4, 6, seed=1), pair_weights(2, 3, 4, seed=1)
    as_tensor = layer_mcl_losses(emb, labels, w, TAU, KD_T)
    as_lists = layer_mcl_losses([list(e) for e in emb], labels, list(w), TAU, KD_T)
    assert isinstance(as_lists, MCLLosses)
    torch.testing.assert_close(torch.stack(as_tensor), torch.stack(as_lists), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"weights must be \(18, 4\)"):
        layer_mcl_losses(emb, labels, w[:-1], TAU, KD_T)
    with pytest.raises(ValueError, match="N >= 2"):
        layer_mcl_losses(emb[:1], labels, w, TAU, KD_T)


def test_weighted_sum():
    terms = MCLLosses(*torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert weighted_mcl_sum(terms, 0.1, 1.0, 0.1, 1.0).item() == pytest.approx(0.1 + 2.0 + 0.3 + 4.0)


# ----------------------------------------------------------------------------- memory banks, slow formula

def memory_inputs(n, s, batch, dim, n_data, pos_k, neg_k, seed):
    gen = torch.Generator().manual_seed(seed)
    memories = [F.normalize(torch.randn(n_data, dim, generator=gen, dtype=torch.float64), dim=1) for _ in range(n)]
    anchors = torch.randperm(n_data, generator=gen)[:batch]
    pos_idx = torch.cat([anchors[:, None], torch.randint(0, n_data, (batch, pos_k), generator=gen)], 1)
    neg_idx = torch.randint(0, n_data, (batch, neg_k), generator=gen)
    return memories, pos_idx, neg_idx


@pytest.mark.parametrize("partner", [False, True])
def test_memory_terms_match_the_slow_formula(partner):
    n, s, batch = 2, 2, 4
    memories, pos_idx, neg_idx = memory_inputs(n, s, batch, 5, n_data=20, pos_k=2, neg_k=6, seed=3)
    emb, w = leaves(unit_embeddings(n, s, batch, 5, seed=4), pair_weights(n, s, batch, seed=5))
    fast = torch.stack(list(memory_layer_mcl_losses(emb, memories, pos_idx, neg_idx, w, 0.07, KD_T,
                                                    vcl_partner_memory=partner)))
    slow = slow_memory(emb, memories, pos_idx, neg_idx, w, 0.07, KD_T, partner).sum(0)
    assert_terms_and_grads_match(fast[None], slow[None], [emb, w], rtol=1e-9)


def test_the_partner_memory_flag_changes_only_the_vcl_terms():
    memories, pos_idx, neg_idx = memory_inputs(2, 2, 4, 5, n_data=20, pos_k=1, neg_k=6, seed=6)
    emb, w = unit_embeddings(2, 2, 4, 5, seed=7), pair_weights(2, 2, 4, seed=8)
    quirk, partner = (memory_layer_mcl_losses(emb, memories, pos_idx, neg_idx, w, 0.07, KD_T, vcl_partner_memory=f)
                      for f in (False, True))
    assert quirk.icl == partner.icl and quirk.soft_icl == partner.soft_icl
    assert quirk.vcl != partner.vcl and quirk.soft_vcl != partner.soft_vcl


def test_memory_update_uses_the_last_stage_of_each_network():
    memories, pos_idx, _ = memory_inputs(2, 3, 4, 5, n_data=12, pos_k=1, neg_k=1, seed=9)
    emb = unit_embeddings(2, 3, 4, 5, seed=10)
    expected = [m.clone() for m in memories]
    for net in range(2):
        for r, anchor in enumerate(pos_idx[:, 0].tolist()):
            v = 0.5 * expected[net][anchor] + 0.5 * emb[net, 2, r]
            expected[net][anchor] = v / v.norm()
    update_layer_memories(memories, emb, pos_idx, momentum=0.5)
    for got, want in zip(memories, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- the authors' values

@pytest.mark.parametrize("name", ["cifar_layer_mcl_n2_b32_d32", "cifar_layer_mcl_n3_b16_d32",
                                  "cifar_layer_mcl_n2_b16_d32_m4"])
def test_in_batch_matches_the_authors(name):
    case = reference_cases()[name]
    hp, inputs = case["hparams"], case["inputs"]
    emb, w = leaves(inputs["embeddings"], inputs["weights"])
    per_pair = layer_mcl_pair_terms(emb, inputs["labels"], w, hp["tau"], hp["kd_T"])
    torch.testing.assert_close(per_pair, case["expected_per_pair"], **TIGHT)
    terms = MCLLosses(*per_pair.sum(0))
    total = weighted_mcl_sum(terms, hp["alpha"], hp["gamma"], hp["beta"], hp["lam"])
    torch.testing.assert_close(total, case["expected"]["loss_mcl"], **TIGHT)
    for term, value in zip(TERMS, terms):
        torch.testing.assert_close(value, case["expected"][term], **TIGHT)
        g_emb, g_w = torch.autograd.grad(value, [emb, w], retain_graph=True)
        torch.testing.assert_close(g_emb, case["expected_grads_wrt_embeddings"][term], **TIGHT)
        torch.testing.assert_close(g_w, case["expected_grads_wrt_weights"][term], **TIGHT)


def test_projection_heads_and_loss_match_the_authors():
    case = reference_cases()["cifar_layer_mcl_heads_n2_b16"]
    hp, inputs = case["hparams"], case["inputs"]
    heads = StageProjectionHeads(hp["rep_dim"].tolist(), hp["number_stage"], hp["feat_dim"]).double()
    heads.load_state_dict(authors_heads_to_ours(inputs["heads"]))
    rep = [leaves(*inputs["rep"][str(i)]) for i in range(hp["number_net"])]
    w = inputs["weights"].clone().requires_grad_(True)
    projected = heads(rep)
    for i in range(hp["number_net"]):
        torch.testing.assert_close(torch.stack(projected[i]), case["expected_projected"][str(i)], **TIGHT)
    terms = layer_mcl_losses(projected, inputs["labels"], w, hp["tau"], hp["kd_T"])
    flat_rep = [r for per_net in rep for r in per_net]
    for term, value in zip(TERMS, terms):
        torch.testing.assert_close(value, case["expected"][term], **TIGHT)
        grads = torch.autograd.grad(value, flat_rep + [w], retain_graph=True)
        for i in range(hp["number_net"]):
            got = torch.stack(grads[i * hp["number_stage"]:(i + 1) * hp["number_stage"]])
            torch.testing.assert_close(got, case["expected_grads_wrt_rep"][term][str(i)], **TIGHT)
        torch.testing.assert_close(grads[-1], case["expected_grads_wrt_weights"][term], **TIGHT)
    total = weighted_mcl_sum(terms, hp["alpha"], hp["gamma"], hp["beta"], hp["lam"])
    torch.testing.assert_close(total, case["expected"]["loss_mcl"], **TIGHT)
    names = [k for k, _ in heads.named_parameters()]
    grads = torch.autograd.grad(total, list(heads.parameters()))
    expected = authors_heads_to_ours(case["expected_grads_loss_mcl_wrt_heads"])
    for name, grad in zip(names, grads):
        torch.testing.assert_close(grad, expected[name], **TIGHT)


def test_memory_loss_and_update_match_the_authors():
    case = reference_cases()["imagenet_layer_mcl_memory_n2_b8"]
    hp, inputs = case["hparams"], case["inputs"]
    emb, w = leaves(inputs["embeddings"], inputs["weights"])
    memories = [m.clone() for m in inputs["memory"]]
    terms = memory_layer_mcl_losses(emb, memories, inputs["pos_idx"], inputs["neg_idx"], w, hp["tau"], hp["kd_T"])
    for term, value in zip(TERMS, terms):
        torch.testing.assert_close(value, case["expected"][term], **TIGHT)
        g_emb, g_w = torch.autograd.grad(value, [emb, w], retain_graph=True)
        torch.testing.assert_close(g_emb, case["expected_grads_wrt_embeddings"][term], **TIGHT)
        torch.testing.assert_close(g_w, case["expected_grads_wrt_weights"][term], **TIGHT)
    total = weighted_mcl_sum(terms, hp["alpha"], hp["gamma"], hp["beta"], hp["lam"])
    torch.testing.assert_close(total, case["expected"]["loss_mcl"], **TIGHT)
    update_layer_memories(memories, emb.detach(), inputs["pos_idx"], hp["nce_m"])
    torch.testing.assert_close(torch.stack(memories), case["expected"]["memory_after"], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- heads

# Parameters of the authors' projection heads (feat_dim 128) for a two-network model, counted
# from their code (winycg/L-MCL @ 2c0901e): (feature size of each network, stages) -> count.
AUTHORS_HEAD_SIZES = [
    (([64, 64], 3), 148_992),  # lmcl_resnet32_cifar
    (([64, 256], 3), 222_720),  # lmcl_res32_res110_cifar
    (([414, 414], 3), 417_792),  # lmcl_hcgnet_A1_cifar
    (([512, 1024], 4), 919_552),  # lmcl_res18_shufflenetv2_1x_imagenet
    (([2048, 2048], 4), 2_230_272),  # lmcl_resnet50_imagenet
]


@pytest.mark.parametrize("dims_stages, size", AUTHORS_HEAD_SIZES)
def test_head_sizes_equal_the_authors(dims_stages, size):
    dims, stages = dims_stages
    heads = StageProjectionHeads(dims, stages)
    assert sum(p.numel() for p in heads.parameters()) == size


def test_heads_give_unit_rows_per_net_and_stage():
    heads = StageProjectionHeads([8, 12], 3, dim_out=16)
    features = [[torch.randn(5, 8) for _ in range(3)], [torch.randn(5, 12) for _ in range(3)]]
    out = heads(features)
    assert [[tuple(e.shape) for e in per_net] for per_net in out] == [[(5, 16)] * 3] * 2
    torch.testing.assert_close(torch.stack([torch.stack(p) for p in out]).norm(dim=-1), torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match="2 networks x 3 stages"):
        heads(features[:1])
