"""Networks and cohorts: sizes of docs/method.md §6.4, shapes, topologies, errors."""
from functools import lru_cache

import pytest
import torch
import torch.nn as nn
import torchvision

from models import (
    BranchedCohort,
    IndependentCohort,
    SplitNet,
    available_architectures,
    build_cohort,
    count_multiply_adds,
    count_parameters,
    get_model,
)
from models.registry import get_spec
from utils.errors import ConfigError

# name: (params per net, stem S, branch B, feature dim, multiply-adds in M) - docs/method.md §6.4
TABLE = {
    "resnet32": (472_756, 23_824, 448_932, 64, 69.13),
    "resnet56": (861_620, 42_512, 819_108, 64, 125.75),
    "resnet110": (1_170_868, 55_376, 1_115_492, 256, 167.45),
    "wrn_16_2": (703_284, 33_424, 669_860, 128, 101.12),
    "wrn_40_2": (2_255_156, 107_664, 2_147_492, 128, 327.61),
    "wrn_28_4": (5_872_180, 269_648, 5_602_532, 256, 845.62),
    "ShuffleNetV2_05x": (444_292, 7_632, 436_660, 1024, 10.99),
    "ShuffleNetV2_1x": (1_356_104, 30_888, 1_325_216, 1024, 45.09),
    "hcgnet_A1": (1_102_651, 117_726, 984_925, 414, 154.67),
    "hcgnet_A2": (3_133_679, 455_169, 2_678_510, 716, 489.38),
    "resnet18": (11_689_512, 683_072, 11_006_440, 512, 1814.07),
    "resnet34": (21_797_672, 1_347_904, 20_449_768, 512, 3663.76),
}
CIFAR_ARCHS = [n for n in TABLE if n not in ("resnet18", "resnet34")]
HCGNET = ("hcgnet_A1", "hcgnet_A2")


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Tiny forwards on a shared 2-core CPU run ~5x faster without intra-op threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def num_classes_of(name: str) -> int:
    return 1000 if name in ("resnet18", "resnet34") else 100


@lru_cache(maxsize=None)
def single_net(name: str) -> SplitNet:
    """One network per name, built once for the whole file (tests must not mutate it)."""
    torch.manual_seed(0)
    return get_model(name, num_classes_of(name))


@lru_cache(maxsize=None)
def multiply_adds(name: str) -> int:
    size = get_spec(name).input_size
    return count_multiply_adds(single_net(name), (1, 3, size, size))


def test_every_table_architecture_is_registered_except_possibly_hcgnet():
    assert [n for n in available_architectures() if n in TABLE] == list(TABLE)


@pytest.mark.parametrize("name", list(TABLE))
def test_parameters_stem_branch_and_feature_dim_match_table(name):
    total, stem, branch, dim, _ = TABLE[name]
    net = single_net(name)
    assert count_parameters(net.stem) == stem
    assert count_parameters(net.branch) == branch
    assert count_parameters(net) == total
    assert get_spec(name).feature_dim == dim


@pytest.mark.parametrize("name", list(TABLE))
def test_multiply_adds_match_table(name):
    assert round(multiply_adds(name) / 1e6, 2) == TABLE[name][4]


def test_multiply_adds_do_not_depend_on_batch_size():
    assert count_multiply_adds(single_net("resnet32"), (2, 3, 32, 32)) == multiply_adds("resnet32")


def test_count_multiply_adds_leaves_module_as_it_was():
    net = get_model("resnet32", 10)
    net.train()
    net.branch.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    count_multiply_adds(net)
    assert net.training and net.stem.training and not net.branch.training
    assert all(not m._forward_hooks for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_dilated_convs_follow_the_original_convention_unless_asked():
    conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)
    assert count_multiply_adds(conv, (1, 4, 8, 8)) == 4 * 4 * 9 * 10 * 10
    assert count_multiply_adds(conv, (1, 4, 8, 8), original_convention=False) == 4 * 4 * 9 * 8 * 8


@pytest.mark.parametrize("name", list(TABLE))
def test_two_net_cohort_is_independent_with_twice_the_parameters(name):
    cohort = build_cohort(name, 2, num_classes_of(name))
    assert isinstance(cohort, IndependentCohort)
    assert cohort.topology == "independent" and cohort.number_net == 2
    assert cohort.arch_names == [name, name]
    assert cohort.feature_dims == [TABLE[name][3]] * 2
    assert count_parameters(cohort) == 2 * TABLE[name][0]


def test_resnet32_cohort_totals_of_the_spec_examples():
    assert count_parameters(build_cohort("resnet32", 2, 100)) == 945_512
    assert count_parameters(build_cohort("resnet32", 4, 100)) == 1_819_552


@pytest.mark.parametrize("number_net", [3, 4])
@pytest.mark.parametrize("name", list(TABLE))
def test_branched_cohort_has_shared_stem_plus_n_branches(name, number_net):
    _, stem, branch, dim, _ = TABLE[name]
    cohort = build_cohort(name, number_net, num_classes_of(name))
    assert isinstance(cohort, BranchedCohort)
    assert cohort.topology == "branched" and cohort.number_net == number_net
    assert cohort.feature_dims == [dim] * number_net
    assert count_parameters(cohort.stem) == stem
    assert count_parameters(cohort) == stem + number_net * branch


@pytest.mark.parametrize("name", CIFAR_ARCHS)
def test_cifar_forward_shapes(name, device):
    with torch.no_grad():
        logits, feature = single_net(name).to(device)(torch.randn(2, 3, 32, 32, device=device))
    assert logits.shape == (2, 100)
    assert feature.shape == (2, TABLE[name][3])


def test_branched_forward_shapes_and_member_view():
    cohort = build_cohort("resnet32", 3, 10)
    x = torch.randn(2, 3, 32, 32)
    logits, features = cohort(x)  # with autograd and train-mode BN, as in training
    assert logits[0].requires_grad
    assert [t.shape for t in logits] == [(2, 10)] * 3
    assert [t.shape for t in features] == [(2, 64)] * 3
    cohort.eval()
    with torch.no_grad():
        logits, _ = cohort(x)
        alone, _ = cohort.member(1)(x)
    assert torch.allclose(alone, logits[1])
    assert not torch.allclose(logits[0], logits[1])


def test_resnet18_forward_shape_on_small_input():
    with torch.no_grad():
        logits, feature = single_net("resnet18")(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1000) and feature.shape == (2, 512)


def test_resnet18_state_dict_keys_and_outputs_equal_torchvision():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    net = get_model("resnet18", 10).eval()
    stripped = {k.split(".", 1)[1]: v for k, v in net.state_dict().items()}
    assert list(stripped) == list(reference.state_dict())
    net.stem.load_state_dict({k: v for k, v in reference.state_dict().items()
                              if k.split(".")[0] in dict(net.stem.named_children())})
    net.branch.load_state_dict({k: v for k, v in reference.state_dict().items()
                                if k.split(".")[0] in dict(net.branch.named_children())})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x)[0], reference(x), atol=1e-5)


def test_independent_members_are_initialised_separately():
    cohort = build_cohort("resnet32", 2, 10).eval()
    with torch.no_grad():
        logits, _ = cohort(torch.randn(2, 3, 32, 32))
    assert not torch.allclose(logits[0], logits[1])


def test_wrn_linear_bias_is_zero_only_for_independent_networks():
    assert torch.count_nonzero(get_model("wrn_16_2", 10).branch.fc.bias) == 0
    branched = build_cohort("wrn_16_2", 3, 10)
    assert torch.count_nonzero(branched.branches[0].fc.bias) > 0


def test_auto_topology_follows_the_original_rule():
    assert build_cohort("resnet32", 1, 10).topology == "independent"
    assert build_cohort("resnet32", 2, 10).topology == "independent"
    assert build_cohort("resnet32", 3, 10).topology == "branched"
    assert build_cohort("resnet32", 2, 10, cohort="branched").topology == "branched"
    assert build_cohort("resnet32", 4, 10, cohort="independent").number_net == 4


def test_mixed_cohort():
    cohort = build_cohort("resnet32,wrn_16_2", 2, 10)
    assert isinstance(cohort, IndependentCohort)
    assert cohort.arch_names == ["resnet32", "wrn_16_2"]
    assert cohort.feature_dims == [64, 128]
    assert count_parameters(cohort) == count_parameters(get_model("resnet32", 10)) + count_parameters(
        get_model("wrn_16_2", 10))
    with torch.no_grad():
        logits, features = cohort(torch.randn(2, 3, 32, 32))
    assert [f.shape[1] for f in features] == [64, 128]
    assert [t.shape for t in logits] == [(2, 10)] * 2


@pytest.mark.parametrize("arch, number_net, cohort, message", [
    ("resnet32,wrn_16_2", 3, "auto", "lists 2 architectures"),
    ("resnet32,wrn_16_2", 2, "branched", "cannot be branched"),
    ("resnet32,", 2, "auto", "empty architecture name"),
    ("resnet32", 0, "auto", "at least 1"),
    ("resnet32", 2, "shared", "unknown cohort"),
    ("mobilenet_v2", 3, "branched", "cannot be branched"),
])
def test_impossible_requests_raise_clear_value_errors(arch, number_net, cohort, message):
    with pytest.raises(ValueError, match=message) as info:
        build_cohort(arch, number_net, 10, cohort=cohort)
    assert isinstance(info.value, ConfigError)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        build_cohort("resnet33", 2, 10)
    assert "resnet33" in str(info.value)
    assert all(name in str(info.value) for name in available_architectures())
    with pytest.raises(ValueError, match="resnet32, resnet56"):
        get_model("nope", 10)


def test_torchvision_model_in_independent_cohort():
    cohort = build_cohort("mobilenet_v3_small", 2, 10)
    assert cohort.topology == "independent"
    assert cohort.feature_dims == [1024, 1024]
    with torch.no_grad():
        logits, features = cohort(torch.randn(2, 3, 64, 64))
    assert [t.shape for t in logits] == [(2, 10)] * 2
    assert [t.shape for t in features] == [(2, 1024)] * 2


def test_torchvision_model_feature_is_input_of_its_classifier():
    net = get_model("mobilenet_v3_small", 10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits, feature = net(x)
        assert torch.allclose(net.branch.fc(feature), logits)
    assert not any(isinstance(m, nn.Linear) and m.out_features == 10 for m in net.stem.modules())


def test_timm_model_in_a_mixed_cohort():
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    cohort = build_cohort("timm:convnext_atto,resnet32", 2, 10)
    assert cohort.topology == "independent" and cohort.arch_names == ["timm:convnext_atto", "resnet32"]
    reference = timm.create_model("convnext_atto", num_classes=10)
    assert cohort.feature_dims == [reference.num_features, 64]
    net = cohort.member(0).eval()
    with torch.no_grad():
        logits, features = cohort.eval()(torch.randn(2, 3, 32, 32))
        assert torch.allclose(net.branch.fc(features[0]), logits[0])
    assert [t.shape for t in logits] == [(2, 10)] * 2
    assert net.stem.classifier_name == "head.fc"
    assert count_parameters(net) == count_parameters(reference)


def test_timm_names_are_checked_and_never_branched():
    pytest.importorskip("timm", reason="timm is an optional extra (pip install timm)")
    with pytest.raises(ConfigError, match=r"timm has no model 'convnext_atom' \(close: convnext_atto"):
        build_cohort("timm:convnext_atom", 2, 10)
    with pytest.raises(ConfigError, match="cannot be branched"):
        build_cohort("timm:convnext_atto", 3, 10, "branched")
    assert build_cohort("timm:convnext_atto", 3, 10).topology == "independent"


def test_a_timm_name_without_timm_says_how_to_install_it(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConfigError, match=r"need the timm package: pip install timm"):
        build_cohort("timm:convnext_atto,resnet32", 2, 10)


@pytest.mark.parametrize("number_net", [2, 3, 4])
@pytest.mark.parametrize("topology", ["independent", "branched"])
@pytest.mark.parametrize("name", CIFAR_ARCHS)
def test_explicit_topologies_for_two_to_four_networks(name, topology, number_net):
    """Either topology for any N: independent = N x per-net, branched = S + N x B (docs/method.md §6.4)."""
    per_net, stem, branch, _, _ = TABLE[name]
    cohort = build_cohort(name, number_net, 100, topology)
    assert cohort.topology == topology and cohort.number_net == number_net
    expected = number_net * per_net if topology == "independent" else stem + number_net * branch
    assert count_parameters(cohort) == expected
