"""The contrast runs in float32 under autocast: heads, embeddings, similarity logits, banks, MoCo logits.

The backbones run in the autocast precision (bfloat16 here, on CPU); everything from the
projection head on must be float32, because the similarity logits are divided by a small
temperature (0.1, 0.07) where bfloat16 rounding would blur the contrastive distributions.
"""
import torch
import torch.nn as nn

from losses.mcl import ProjectionHead, build_projection_heads, similarity_blocks, sup_mcl_losses
from losses.memory import memory_mcl_losses
from losses.moco import all_pair_logits, moco_mcl_losses
from models.cohort import build_cohort
from models.moco import Float32Linear, Float32Sequential, MoCoMCL, build_encoder, float32_linear
from utils.contrast import MemoryContrast
from utils.supervised import CohortWithHeads

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def test_projection_head_is_float32_under_autocast_and_equals_the_float32_head():
    torch.manual_seed(0)
    head = ProjectionHead(64, 128)
    features = torch.randn(8, 64)
    with torch.autocast(**BF16):
        out = head(features.to(torch.bfloat16))
        plain_linear = nn.Linear(64, 4)(features)  # autocast is really on
    assert plain_linear.dtype == torch.bfloat16
    assert out.dtype == torch.float32
    expected = head(features.to(torch.bfloat16).float())  # outside autocast, same rounded input
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)
    assert torch.allclose(out.norm(dim=1), torch.ones(8), atol=1e-6)


def test_cohort_backbones_in_bf16_embeddings_and_mcl_logits_in_float32(device):
    torch.manual_seed(0)
    cohort = build_cohort("resnet32", 2, num_classes=4)
    model = CohortWithHeads(cohort, build_projection_heads(cohort.feature_dims, 16)).to(device)
    x = torch.randn(8, 3, 32, 32, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits, features, embeddings = model(x)
    assert all(z.dtype == torch.bfloat16 for z in logits)
    assert all(f.dtype == torch.bfloat16 for f in features)
    assert all(e.dtype == torch.float32 for e in embeddings)
    blocks = similarity_blocks(embeddings, 0.1)
    assert all(b.dtype == torch.float32 for row in blocks for b in row)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3], device=device)
    terms = sup_mcl_losses(embeddings, labels, 0.1, 3.0)
    assert all(t.dtype == torch.float32 for t in terms)
    sum(terms).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.heads.parameters())


def test_memory_bank_rows_and_logits_in_float32():
    torch.manual_seed(0)
    heads = build_projection_heads([32, 32], 16)
    with torch.autocast(**BF16):
        embeddings = [head(torch.randn(4, 32).to(torch.bfloat16)) for head in heads]
    contrast = MemoryContrast(2, n_data=50, feat_dim=16, tau=0.07, kd_T=3.0, momentum=0.5)
    assert all(m.dtype == torch.float32 for m in contrast.memories)
    pos = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
    neg = torch.randint(4, 50, (4, 10))
    terms = memory_mcl_losses(embeddings, contrast.memories, pos, neg, 0.07, 3.0)
    assert all(t.dtype == torch.float32 for t in terms)


def test_moco_heads_queries_keys_and_logits_in_float32():
    torch.manual_seed(0)
    for mlp, head_type in ((False, Float32Linear), (True, Float32Sequential)):
        encoder = build_encoder("resnet18", 16, mlp)
        assert type(encoder.fc) is head_type
        assert set(encoder.fc.state_dict()) == ({"weight", "bias"} if not mlp else
                                                {"0.weight", "0.bias", "2.weight", "2.bias"})
    model = MoCoMCL("resnet18", number_net=2, dim=16, queue_size=32, mlp=True)
    x_q, x_k = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.autocast(**BF16):
        queries, keys = model(x_q, x_k)
    assert all(t.dtype == torch.float32 for t in queries + keys)
    assert all(a.dtype == torch.float32 for row in all_pair_logits(queries, keys, model.queue, 0.07) for a in row)
    assert all(t.dtype == torch.float32 for t in moco_mcl_losses(queries, keys, model.queue, 0.07, 3.0))


def test_float32_linear_keeps_the_weights_and_draws_no_random_numbers():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    state = torch.get_rng_state()
    converted = float32_linear(linear)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(converted.weight, linear.weight) and torch.equal(converted.bias, linear.bias)
