"""HCGNet-A1/A2: sizes and multiply-adds equal the original's (docs/method.md §6.4)."""
from typing import Dict, Tuple

import pytest
import torch
import torch.nn as nn

from models import hcgnet
from models.registry import get_spec, registered_names

# name -> (stem params, branch params, whole params, feature dim, stem channels,
#          multiply-adds as the original counts them, true multiply-adds), in M
FACTS: Dict[str, Tuple[int, int, int, int, int, float, float]] = {
    "hcgnet_A1": (117_726, 984_925, 1_102_651, 414, 60, 154.67, 154.27),
    "hcgnet_A2": (455_169, 2_678_510, 3_133_679, 716, 120, 489.38, 488.67),
}
NAMES = sorted(FACTS)


class Net(nn.Module):
    """branch(stem(x)) -> (logits, feature)."""

    def __init__(self, stem: nn.Module, branch: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.branch = branch

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.branch(self.stem(x))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_multiply_adds(model: nn.Module, shape: Tuple[int, ...], dilation_aware: bool) -> int:
    """Conv2d and Linear weight multiply-adds of one forward pass.

    With ``dilation_aware=False`` the output size of a conv is computed as the
    original's counter does, (in + 2*pad - kernel) // stride + 1, ignoring
    dilation; that is how the network table of docs/method.md §6.4 was produced.
    """
    total = [0]

    def hook(m: nn.Module, inputs: Tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            if dilation_aware:
                oh, ow = out.shape[2:]
            else:
                h, w = inputs[0].shape[2:]
                oh = (h + 2 * m.padding[0] - m.kernel_size[0]) // m.stride[0] + 1
                ow = (w + 2 * m.padding[1] - m.kernel_size[1]) // m.stride[1] + 1
            kh, kw = m.kernel_size
            total[0] += m.in_channels * m.out_channels * kh * kw * oh * ow // m.groups
        elif isinstance(m, nn.Linear):
            total[0] += m.weight.numel()

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total[0]


@pytest.fixture(scope="module")
def nets() -> Dict[str, Net]:
    torch.manual_seed(0)
    built = {}
    for name in NAMES:
        spec = get_spec(name)
        built[name] = Net(spec.make_stem("independent"), spec.make_branch(100, "independent"))
    return built


def test_both_archs_are_registered_as_cifar() -> None:
    for name in NAMES:
        assert name in registered_names()
        spec = get_spec(name)
        assert spec.input_size == 32 and spec.family == "cifar"


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts(nets: Dict[str, Net], name: str) -> None:
    stem_p, branch_p, whole_p = FACTS[name][:3]
    net = nets[name]
    assert count_params(net.stem) == stem_p
    assert count_params(net.branch) == branch_p
    assert count_params(net) == whole_p


@pytest.mark.parametrize("name", NAMES)
def test_branched_topology_builds_the_same_parts(name: str) -> None:
    spec = get_spec(name)
    stem_p, branch_p = FACTS[name][:2]
    assert count_params(spec.make_stem("branched")) == stem_p
    assert count_params(spec.make_branch(100, "branched")) == branch_p


def test_unknown_topology_is_rejected() -> None:
    with pytest.raises(ValueError):
        get_spec("hcgnet_A1").make_stem("shared")


@pytest.mark.parametrize("name", NAMES)
def test_feature_dim(nets: Dict[str, Net], name: str) -> None:
    feature_dim = FACTS[name][3]
    assert get_spec(name).feature_dim == feature_dim
    assert nets[name].branch.feature_dim == feature_dim
    assert nets[name].branch.classifier.in_features == feature_dim


@pytest.mark.parametrize("name", NAMES)
def test_multiply_adds(nets: Dict[str, Net], name: str) -> None:
    as_original, true_count = FACTS[name][5:]
    net = nets[name]
    assert count_multiply_adds(net, (1, 3, 32, 32), False) / 1e6 == pytest.approx(
        as_original, abs=0.01
    )
    # The original's formula overcounts the dilated depthwise convs (it sees an
    # output 2 pixels wider); the true count is 0.40M / 0.71M lower.
    assert count_multiply_adds(net, (1, 3, 32, 32), True) / 1e6 == pytest.approx(
        true_count, abs=0.01
    )


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes(nets: Dict[str, Net], name: str) -> None:
    feature_dim, stem_channels = FACTS[name][3:5]
    net = nets[name].train()
    x = torch.randn(2, 3, 32, 32)
    h = net.stem(x)
    assert h.shape == (2, stem_channels, 16, 16)
    logits, feature = net.branch(h)
    assert logits.shape == (2, 100)
    assert feature.shape == (2, feature_dim)
    assert torch.isfinite(logits).all() and torch.isfinite(feature).all()


@pytest.mark.parametrize("name", NAMES)
def test_eval_output_does_not_depend_on_other_samples(nets: Dict[str, Net], name: str) -> None:
    net = nets[name].eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits_pair, feature_pair = net(x)
        logits_alone, feature_alone = net(x[:1])
        logits_other, _ = net(torch.cat([x[:1], torch.randn(1, 3, 32, 32)]))
    torch.testing.assert_close(logits_pair[:1], logits_alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feature_pair[:1], feature_alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits_other[:1], logits_alone, rtol=1e-4, atol=1e-5)


def test_attention_pool_with_flat_context_is_the_spatial_mean() -> None:
    x = torch.randn(2, 3, 4, 5)
    pooled = hcgnet.attention_pool(x, torch.zeros(2, 1, 4, 5))
    torch.testing.assert_close(pooled, x.mean(dim=(2, 3), keepdim=True))


def test_mix_two_scales_weights_sum_to_one_per_channel() -> None:
    a, b = torch.randn(2, 3, 1, 1), torch.randn(2, 3, 1, 1)
    equal = torch.zeros(2, 3, 1, 1)
    torch.testing.assert_close(hcgnet.mix_two_scales(a, b, equal, equal), (a + b) / 2)
    far = torch.full((2, 3, 1, 1), 50.0)
    torch.testing.assert_close(hcgnet.mix_two_scales(a, b, far, -far), a)


@pytest.mark.parametrize("name", NAMES)
def test_project_counter_agrees(nets: Dict[str, Net], name: str) -> None:
    complexity = pytest.importorskip("models.complexity")
    net = nets[name]
    assert complexity.count_parameters(net) == FACTS[name][2]
    counted = complexity.count_multiply_adds(net, (1, 3, 32, 32))
    # Either convention is acceptable here: the true output size (dilation
    # aware) or the original's dilation-blind one that gives the table of docs/method.md §6.4.
    assert counted in (
        count_multiply_adds(net, (1, 3, 32, 32), True),
        count_multiply_adds(net, (1, 3, 32, 32), False),
    )
