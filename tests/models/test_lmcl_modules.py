"""LossWeightNetwork and Aggregator: against loop formulas written here and against the authors'
code (tests/fixtures/lmcl/reference_cases.pt), values and gradients in float64."""
import math

import pytest
import torch

from losses.lmcl import stage_pairs
from models.lmcl_modules import Aggregator, LossWeightNetwork, authors_aggregator_state
from tests.lmcl_fixtures import reference_cases

TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def cases():
    return reference_cases()


def nested(per_net, number_net):
    """{'i': (S, B, d)} -> [[(B, d) leaf with grad]] per network and stage."""
    return [[f.clone().requires_grad_(True) for f in per_net[str(i)]] for i in range(number_net)]


def stacked_grads(features):
    return [torch.stack([f.grad for f in net]) for net in features]


def assert_close_scaled(got, expected):
    """Entrywise within 1e-10 of the largest expected entry (gradients span many magnitudes)."""
    scale = max(expected.abs().max().item(), 1e-300)
    torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=1e-10)


def slow_pair_weights(net, features):
    """One loop per pair and sample: sigmoid(cos(h_ik[b], h_jz[b])), cos = u.v / (|u| |v|)."""
    n, S = len(features), len(features[0])
    hidden = [[net.proj[i][s](features[i][s]) for s in range(S)] for i in range(n)]
    rows = []
    for i, k, j, z in stage_pairs(n, S):
        row = []
        for b in range(features[0][0].shape[0]):
            u, v = hidden[i][k][b], hidden[j][z][b]
            cos = (u * v).sum() / (u.pow(2).sum().sqrt() * v.pow(2).sum().sqrt())
            row.append(1.0 / (1.0 + torch.exp(-cos)))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def test_loss_weight_network_matches_loop_formula():
    torch.manual_seed(0)
    net = LossWeightNetwork([[3, 3], [5, 5], [2, 2]], hidden=7).double()
    feats = [[torch.randn(4, d, dtype=torch.float64) for d in dims] for dims in ([3, 3], [5, 5], [2, 2])]
    weights = net(feats)
    assert weights.shape == (3 * 2 * 2 * 2, 4)
    torch.testing.assert_close(weights, slow_pair_weights(net, feats), **TOL)
    assert weights.min() > 1 / (1 + math.e) and weights.max() < 1 / (1 + 1 / math.e)
    # both directions of a pair get one weight
    pairs = stage_pairs(3, 2)
    for p, (i, k, j, z) in enumerate(pairs):
        torch.testing.assert_close(weights[p], weights[pairs.index((j, z, i, k))], rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["loss_weight_net_n2_b16", "loss_weight_net_n3_b8"])
def test_loss_weight_network_matches_authors(cases, name):
    case = cases[name]
    n = case["hparams"]["number_net"]
    net = LossWeightNetwork(case["hparams"]["feat_dims"].tolist(), case["hparams"]["hidden"]).double()
    net.load_state_dict(case["inputs"]["state_dict"])
    assert torch.equal(torch.tensor(stage_pairs(n, case["hparams"]["number_stage"])), case["pair_index"])
    feats = nested(case["inputs"]["features"], n)
    weights = net(feats)
    torch.testing.assert_close(weights, case["expected"]["weights"], **TOL)
    L = (weights * case["inputs"]["R"]).sum()
    torch.testing.assert_close(L, case["expected"]["L"], **TOL)
    L.backward()
    for key, param in net.named_parameters():
        assert_close_scaled(param.grad, case["expected_grads_L_wrt_params"][key])
    for i, grad in enumerate(stacked_grads(feats)):
        assert_close_scaled(grad, case["expected_grads_L_wrt_features"][str(i)])


def slow_aggregate(agg, features, logits):
    """Per net and sample: a = softmax(W2 relu(W1 [f_0; ...; f_S-1] + b1) + b2); sum_s a_s z_s."""
    out, attention = [], []
    for i, net in enumerate(features):
        lin1, lin2 = agg.attention[i][0], agg.attention[i][2]
        rows, atts = [], []
        for b in range(net[0].shape[0]):
            x = torch.cat([f[b] for f in net])
            hidden = torch.clamp(lin1.weight @ x + lin1.bias, min=0)
            scores = lin2.weight @ hidden + lin2.bias
            a = torch.exp(scores) / torch.exp(scores).sum()
            rows.append(sum(a[s] * logits[i][s][b] for s in range(len(net))))
            atts.append(a)
        out.append(torch.stack(rows))
        attention.append(torch.stack(atts))
    return out, attention


def test_aggregator_matches_loop_formula():
    torch.manual_seed(1)
    agg = Aggregator([4, 6], number_stage=3).double()
    feats = [[torch.randn(5, d, dtype=torch.float64) for _ in range(3)] for d in (4, 6)]
    logits = [[torch.randn(5, 7, dtype=torch.float64) for _ in range(3)] for _ in range(2)]
    got, att = agg(feats, logits)
    want, want_att = slow_aggregate(agg, feats, logits)
    for g, w in zip(got + att, want + want_att):
        torch.testing.assert_close(g, w, **TOL)
    torch.testing.assert_close(att[0].sum(1), torch.ones(5, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("name", ["aggregator_n2_b16", "aggregator_n3_b8"])
def test_aggregator_matches_authors(cases, name):
    case = cases[name]
    n, S = case["hparams"]["number_net"], case["hparams"]["number_stage"]
    agg = Aggregator(case["hparams"]["dim_in"].tolist(), S).double()
    agg.load_state_dict(authors_aggregator_state(case["inputs"]["state_dict"]))
    feats = nested(case["inputs"]["embeddings"], n)
    logits = case["inputs"]["logits"].clone().requires_grad_(True)
    out, att = agg(feats, [list(net) for net in logits])
    out, att = torch.stack(out), torch.stack(att)
    torch.testing.assert_close(out, case["expected"]["aggregated_logits"], **TOL)
    torch.testing.assert_close(att, case["expected"]["attention"], **TOL)
    L = (out * case["inputs"]["R"]).sum()
    torch.testing.assert_close(L, case["expected"]["L"], **TOL)
    L.backward()
    for key, param in agg.named_parameters():
        authors_key = "proj_head_" + key[len("attention."):]
        assert_close_scaled(param.grad, case["expected_grads_L_wrt_params"][authors_key])
    assert_close_scaled(logits.grad, case["expected_grads_L_wrt_logits"])
    for i, grad in enumerate(stacked_grads(feats)):
        assert_close_scaled(grad, case["expected_grads_L_wrt_embeddings"][str(i)])


def test_authors_aggregator_state_rejects_other_keys():
    with pytest.raises(KeyError, match="not an Aggregator key"):
        authors_aggregator_state({"attention.0.0.weight": torch.zeros(1)})


def test_sizes_equal_the_authors():
    """lmcl_resnet32_cifar x2 (3 stages of 64): weight net 49,920, aggregator 25,094 parameters."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(LossWeightNetwork([[64] * 3] * 2)) == 49920
    assert count(Aggregator([64, 64], 3)) == 25094
    assert count(LossWeightNetwork([[1024] * 3] * 2)) == 787200
    assert count(Aggregator([2048, 2048], 4)) == 33574920
