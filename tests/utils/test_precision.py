"""The contrast runs in float32 under autocast: heads, embeddings, similarity logits, banks, MoCo logits.

The backbones run in the autocast precision (bfloat16 here, on CPU); everything from the
projection head on must be float32, because the similarity logits are divided by a small
temperature (0.1, 0.07) where bfloat16 rounding would blur the contrastive distributions.
"""
import os
import re

import pytest
import torch
import torch.nn as nn

import main_cifar

from losses.mcl import ProjectionHead, build_projection_heads, similarity_blocks, sup_mcl_losses
from losses.memory import memory_mcl_losses
from losses.moco import all_pair_logits, moco_mcl_losses
from models.cohort import build_cohort
from models.moco import Float32Linear, Float32Sequential, MoCoMCL, build_encoder, float32_linear
from tests import ROOT
from tests.fake_cuda import fake_gpus
from utils.contrast import MemoryContrast
from utils.errors import ConfigError, UserError
from utils.precision import validate_precision
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


@pytest.mark.parametrize("capability,native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_on_a_gpu_without_native_bf16_stops_and_suggests_fp16(monkeypatch, capability, native):
    fake_gpus(monkeypatch, count=1, capability=capability)
    gpu = torch.device("cuda", 0)
    validate_precision("fp16", gpu)
    validate_precision("none", gpu)
    if native:
        validate_precision("bf16", gpu)
        return
    with pytest.raises(ConfigError, match=rf"native bfloat16 .*Fake GPU \({capability[0]}\.{capability[1]}\).*"
                                          r"use --amp fp16 \(with --fast: --fast --amp fp16\)"):
        validate_precision("bf16", gpu)


def test_bf16_is_fine_on_cpu_and_rocm(monkeypatch):
    fake_gpus(monkeypatch, count=1, capability=(7, 0))
    validate_precision("bf16", torch.device("cpu"))
    monkeypatch.setattr(torch.version, "hip", "6.0")
    validate_precision("bf16", torch.device("cuda", 0))
    with pytest.raises(UserError, match="--amp fp16 needs CUDA"):
        validate_precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize("native", [False, True])
def test_emulated_bf16_on_a_cpu_is_said_once_by_the_main_rank(monkeypatch, capsys, native):
    import utils.precision

    monkeypatch.setattr(utils.precision, "cpu_has_native_bf16", lambda: native)
    validate_precision("bf16", torch.device("cpu"), warn=False)  # another rank of the run
    validate_precision("none", torch.device("cpu"))
    assert capsys.readouterr().err == ""
    validate_precision("bf16", torch.device("cpu"))
    err = capsys.readouterr().err
    assert (err == "") if native else (err.count("\n") == 1 and "no native bfloat16" in err
                                       and "--channels-last --data-path tensor" in err)


def test_fast_on_a_pre_ampere_gpu_stops_before_training(monkeypatch, tmp_path):
    fake_gpus(monkeypatch, count=1, capability=(7, 0))
    with pytest.raises(ConfigError, match="use --amp fp16"):
        main_cifar.main(["--fast", "--device", "cuda", "--dataset", "synthetic", "--checkpoint-dir", str(tmp_path)])
    assert not os.listdir(tmp_path)


def test_the_torch_floor_has_every_api_the_precision_and_process_group_code_calls():
    """torch.amp.GradScaler("cuda") and init_process_group(device_id=) need 2.3, nn.Module.set_submodule 2.5;
    requirements.txt (which setup.py reads) and the README state the same floor."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        floor = re.search(r"^torch>=([0-9.]+)$", f.read(), flags=re.M).group(1)
    assert tuple(int(x) for x in floor.split(".")) >= (2, 5)
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"torch ≥ {floor} is needed" in f.read()
