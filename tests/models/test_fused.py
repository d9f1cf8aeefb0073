"""models.fused: BatchNorm + (residual) + ReLU, fused on the CPU bf16 channels_last path.

The fused op is checked against a float64 formula of the same maths (batch statistics, biased
variance, ReLU mask = the op's own output > 0) and against eager bf16; the dispatch is checked
to fall back to the eager ops everywhere else, and the float32 networks to be bitwise
torchvision's blocks. Tests of the kernel itself are skipped where it cannot be built (no
AVX-512 BF16, or no compiler).
"""
import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock

from models import fused
from models.resnet_cifar import FusableBasicBlock

SHAPES = [(8, 16, 12, 12), (4, 32, 8, 8), (2, 64, 4, 4), (3, 128, 5, 3)]


def eager_bn_relu(bn, x, residual=None):
    """The networks' eager ops, out of place."""
    out = bn(x)
    return torch.relu(out if residual is None else out + residual)


def needs_kernel():
    if fused.fused_kernel() is None:
        pytest.skip("the fused kernel is not available on this machine (no AVX-512 BF16 or no compiler)")


def channels_last_bf16(t):
    return t.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)


def random_bn(channels, seed):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.2)
        bn.running_mean.normal_(0.0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def reference(x, residual, weight, bias, grad, live, eps):
    """float64: output before rounding, input/weight/bias/residual gradients, batch mean and variance."""
    x, weight, bias, grad = x.double(), weight.double(), bias.double(), grad.double()
    dims = (0, 2, 3)
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    invstd = (var + eps).rsqrt()
    xhat = (x - mean[None, :, None, None]) * invstd[None, :, None, None]
    z = xhat * weight[None, :, None, None] + bias[None, :, None, None]
    if residual is not None:
        z = z + residual.double()
    dz = grad * live.double()
    count = x.numel() // x.size(1)
    dbias = dz.sum(dims)
    dweight = (dz * xhat).sum(dims)
    dx = (weight * invstd)[None, :, None, None] * (
        dz - dbias[None, :, None, None] / count - xhat * dweight[None, :, None, None] / count)
    return z.clamp_min(0), dx, dweight, dbias, dz, mean, var * count / (count - 1)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_matches_the_float64_formula(shape, with_residual):
    needs_kernel()
    bn = random_bn(shape[1], seed=shape[1])
    before_mean, before_var = bn.running_mean.clone(), bn.running_var.clone()
    x = channels_last_bf16(torch.randn(shape) * 1.5 + 0.3).requires_grad_()
    residual = channels_last_bf16(torch.randn(shape)).requires_grad_() if with_residual else None
    assert fused.can_fuse(bn, x, residual)
    y = fused.bn_relu(bn, x, residual)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    grad = channels_last_bf16(torch.randn(shape))
    y.backward(grad)

    want_y, want_dx, want_dw, want_db, want_dz, mean, unbiased = reference(
        x.detach(), None if residual is None else residual.detach(), bn.weight.detach(), bn.bias.detach(),
        grad, y.detach() > 0, bn.eps)
    torch.testing.assert_close(y.double(), want_y, rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(x.grad.double(), want_dx, rtol=2 ** -6, atol=1e-2 * want_dx.abs().max().item())
    torch.testing.assert_close(bn.weight.grad.double(), want_dw, rtol=1e-4, atol=1e-4 * want_dw.abs().max().item())
    torch.testing.assert_close(bn.bias.grad.double(), want_db, rtol=1e-4, atol=1e-4 * want_db.abs().max().item())
    if with_residual:
        torch.testing.assert_close(residual.grad.double(), want_dz, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_mean.double(), 0.9 * before_mean.double() + 0.1 * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), 0.9 * before_var.double() + 0.1 * unbiased, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_agrees_with_eager_bf16(with_residual):
    needs_kernel()
    shape = (16, 16, 16, 16)
    bn = random_bn(16, seed=3)
    eager_bn = copy.deepcopy(bn)
    torch.manual_seed(4)
    x = channels_last_bf16(torch.randn(shape) * 2 - 0.5)
    residual = channels_last_bf16(torch.randn(shape)) if with_residual else None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = fused.bn_relu(bn, x1, residual)
    y2 = eager_bn_relu(eager_bn, x2, residual)
    # bf16 rounding of the two orders of operations differs by an ulp now and then; the sign
    # of an output right at zero may flip, so compare all but a handful of elements.
    close = torch.isclose(y1.float(), y2.float(), rtol=2 ** -7, atol=2 ** -7)
    assert (~close).sum().item() <= 8
    grad = channels_last_bf16(torch.randn(shape))
    y1.backward(grad)
    y2.backward(grad)
    for a, b in ((bn.weight.grad, eager_bn.weight.grad), (bn.bias.grad, eager_bn.bias.grad)):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    torch.testing.assert_close(bn.running_mean, eager_bn.running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, eager_bn.running_var, rtol=1e-4, atol=1e-5)
    assert bn.num_batches_tracked.item() == eager_bn.num_batches_tracked.item() == 1


def test_everything_else_takes_the_eager_ops():
    bn = nn.BatchNorm2d(16)
    x = channels_last_bf16(torch.randn(2, 16, 4, 4))
    assert not fused.can_fuse(bn, x.float(), None)  # float32: the paper's path
    assert not fused.can_fuse(bn, x.contiguous(), None)  # NCHW
    assert not fused.can_fuse(bn, x, x.contiguous())  # residual in another layout
    assert not fused.can_fuse(nn.BatchNorm2d(8), channels_last_bf16(torch.randn(2, 8, 4, 4)), None)
    assert not fused.can_fuse(bn.eval(), x, None)
    assert not fused.can_fuse(nn.BatchNorm2d(16, momentum=None), x, None)
    assert not fused.can_fuse(nn.BatchNorm2d(16, track_running_stats=False), x, None)


def test_float32_blocks_are_bitwise_torchvisions():
    torch.manual_seed(0)
    theirs = BasicBlock(16, 32, stride=2, downsample=nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False),
                                                                   nn.BatchNorm2d(32)))
    ours = FusableBasicBlock(16, 32, stride=2, downsample=copy.deepcopy(theirs.downsample))
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(4, 16, 8, 8)
    outputs = []
    for block in (theirs, ours):
        inp = x.clone().requires_grad_()
        out = block(inp)
        out.square().sum().backward()
        outputs.append((out, inp.grad, block.conv1.weight.grad, block.bn2.running_var))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MCL_FUSED_BN", "0")
    monkeypatch.setattr(fused, "_kernel", None)
    monkeypatch.setattr(fused, "_kernel_tried", False)
    assert fused.fused_kernel() is None
    assert not fused.can_fuse(nn.BatchNorm2d(16), channels_last_bf16(torch.randn(2, 16, 4, 4)), None)


def test_a_failed_build_warns_once_and_runs_eager(monkeypatch):
    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.delenv("MCL_FUSED_BN", raising=False)
    monkeypatch.setattr(fused, "_cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setattr(fused.sys, "platform", "linux")
    monkeypatch.setattr(fused, "_build", no_compiler)
    monkeypatch.setattr(fused, "_kernel", None)
    monkeypatch.setattr(fused, "_kernel_tried", False)
    bn = nn.BatchNorm2d(16)
    x = channels_last_bf16(torch.randn(2, 16, 4, 4))
    with pytest.warns(UserWarning, match="Ninja is required"):
        y = fused.bn_relu(bn, x)
    assert torch.equal(y, eager_bn_relu(nn.BatchNorm2d(16), x))
    assert fused.fused_kernel() is None  # no second attempt, no second warning


@pytest.mark.parametrize("cached", [False, True])
def test_the_first_build_is_announced_in_one_line(monkeypatch, capsys, cached):
    monkeypatch.delenv("MCL_FUSED_BN", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(fused, "_cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setattr(fused.sys, "platform", "linux")
    monkeypatch.setattr(fused, "_build", lambda: "kernel")
    monkeypatch.setattr(fused, "_cached_build", lambda: (cached, "/cache/mcl_bn_relu_cpu"))
    assert fused._load() == ("kernel", None)
    out = capsys.readouterr().out
    if cached:
        assert out == ""
    else:
        assert out.count("\n") == 1 and "building the fused BatchNorm+ReLU CPU kernel" in out
        assert "once" in out and "/cache/mcl_bn_relu_cpu" in out


def test_the_cache_check_compares_with_the_source(monkeypatch, tmp_path):
    class FakeExtension:
        @staticmethod
        def _get_build_directory(name, verbose):
            return str(tmp_path)

    monkeypatch.setattr(fused, "_cpp_extension", lambda: FakeExtension)
    assert fused._cached_build() == (False, str(tmp_path))
    (tmp_path / "mcl_bn_relu_cpu.so").write_bytes(b"")
    assert fused._cached_build()[0]


def test_one_value_per_channel_is_left_to_eager():
    bn = nn.BatchNorm2d(16)
    assert not fused.can_fuse(bn, channels_last_bf16(torch.randn(1, 16, 1, 1)), None)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused.bn_relu(bn, channels_last_bf16(torch.randn(1, 16, 1, 1)))
