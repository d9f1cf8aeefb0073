"""models/lmcl.py: L-MCL networks (auxiliary branches) against the authors' sizes and outputs.

The sizes below were counted from the authors' L-MCL models (github.com/winycg/L-MCL, commit
2c0901efbee5ef35e90bcae751183a616bf806fa, built with number_net=2, 100 classes on CIFAR and 1000
on ImageNet). Per network: parameters of the backbone without its classifier, of its
classifier, of the auxiliary branches without their classifiers, of the auxiliary classifiers,
and the feature size of every stage. Our names: the CIFAR networks of the registry; on
ImageNet resnet18/34 of the registry and torchvision's resnet50 / shufflenet_v2_x1_0 /
shufflenet_v2_x0_5 (the authors' lmcl_resnet*_imagenet and lmcl_ShuffleNetV2_*_imagenet).
"""
import pytest
import torch

import models
from models.cohort import CohortError, last_linear_name
from models.export import load_strict, on_meta
from models.lmcl import (
    LMCLCohort,
    LMCLNetwork,
    authors_network_key,
    authors_to_lmcl_keys,
    build_lmcl_cohort,
    cohort_member_plain_state,
    get_plan,
    lmcl_architectures,
    load_authors_state_dict,
    plain_state_dict,
)
from tests.lmcl_fixtures import TRAIN_ITER, reference_cases, train_iter_inputs, unpack_init

# arch: (backbone w/o classifier, backbone classifier, aux branches w/o classifiers, aux classifiers, stage dim)
AUTHORS_SIZES = {
    "resnet32": (466_256, 6_500, 796_096, 13_000, 64),
    "resnet56": (855_120, 6_500, 1_462_208, 13_000, 64),
    "resnet110": (1_145_168, 25_700, 1_959_680, 51_400, 256),
    "wrn_16_2": (690_384, 12_900, 1_182_400, 25_800, 128),
    "wrn_40_2": (2_242_256, 12_900, 3_841_728, 25_800, 128),
    "wrn_28_4": (5_846_480, 25_700, 10_037_632, 51_400, 256),
    "ShuffleNetV2_05x": (341_792, 102_500, 622_768, 205_000, 1024),
    "ShuffleNetV2_1x": (1_253_604, 102_500, 2_201_252, 205_000, 1024),
    "hcgnet_A1": (1_061_151, 41_500, 1_395_429, 83_000, 414),
    "hcgnet_A2": (3_061_979, 71_700, 3_971_146, 143_400, 716),
    "resnet18": (11_176_512, 513_000, 13_087_488, 1_539_000, 512),
    "resnet34": (21_284_672, 513_000, 13_087_488, 1_539_000, 512),
    "resnet50": (23_508_032, 2_049_000, 21_522_944, 6_147_000, 2048),
    "shufflenet_v2_x1_0": (1_253_604, 1_025_000, 3_044_796, 3_075_000, 1024),
    "shufflenet_v2_x0_5": (341_792, 1_025_000, 889_128, 3_075_000, 1024),
}
# The authors' two-network heterogeneous models: total parameters (same source).
AUTHORS_PAIR_TOTALS = {
    "ShuffleNetV2_1x,wrn_40_2": 9_885_040,  # lmcl_shufflev2_wrn_40_2_cifar
    "resnet18,shufflenet_v2_x1_0": 34_714_400,  # lmcl_res18_shufflenetv2_1x_imagenet
}


def count(module):
    return sum(p.numel() for p in module.parameters())


def classes_of(arch):
    return 100 if get_plan(arch).family == "cifar" else 1000


def test_every_cifar_architecture_has_a_variant():
    cifar = [a for a in models.available_architectures() if models.registry.get_spec(a).family == "cifar"]
    assert set(cifar) <= set(lmcl_architectures())
    # <= rather than ==: tests/tiny_lmcl.py registers a tiny architecture when another test imports it.
    assert set(AUTHORS_SIZES) <= set(lmcl_architectures())


@pytest.mark.parametrize("arch", list(AUTHORS_SIZES))
def test_sizes_outputs_and_backbone_equal_the_plain_network(arch):
    backbone, classifier, aux, aux_classifiers, dim = AUTHORS_SIZES[arch]
    torch.manual_seed(0)
    net = LMCLNetwork(arch, classes_of(arch)).eval()
    plain = net.plain()
    plain_classifier = count(plain.get_submodule(last_linear_name(plain, arch)))
    assert (count(plain) - plain_classifier, plain_classifier) == (backbone, classifier)
    assert (count(net.aux) - sum(count(a.fc) for a in net.aux), sum(count(a.fc) for a in net.aux)) == (
        aux, aux_classifiers)
    assert count(net) == backbone + classifier + aux + aux_classifiers

    batch = 2 if get_plan(arch).family == "cifar" else 1
    x = torch.randn(batch, 3, 32, 32)  # ImageNet networks pool globally: a small input suffices
    with torch.no_grad():
        logits, features = net(x)
        plain_logits, plain_feature = plain(x)
    assert len(logits) == len(features) == net.number_stage == (3 if batch == 2 else 4)
    assert [tuple(t.shape) for t in logits] == [(batch, classes_of(arch))] * net.number_stage
    assert [tuple(t.shape) for t in features] == [(batch, dim)] * net.number_stage
    assert torch.equal(logits[-1], plain_logits) and torch.equal(features[-1], plain_feature)


@pytest.mark.parametrize("arch", ["resnet32", "resnet50", "shufflenet_v2_x0_5"])
def test_export_loads_into_the_registered_plain_network(arch):
    net = on_meta(LMCLNetwork, arch, 10)
    state = plain_state_dict(net.state_dict())
    assert not any(k.startswith("aux.") for k in state)
    load_strict(on_meta(models.get_model, arch, 10), state, arch)


def test_exported_network_computes_what_the_backbone_computes():
    torch.manual_seed(0)
    cohort = build_lmcl_cohort("resnet32,wrn_16_2", 2, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    for index, arch in enumerate(["resnet32", "wrn_16_2"]):
        plain = models.get_model(arch, 10).eval()
        plain.load_state_dict(cohort_member_plain_state(cohort.state_dict(), index))
        with torch.no_grad():
            logits, _ = cohort(x)
            assert torch.equal(plain(x)[0], logits[index][-1])
            assert torch.equal(cohort.member(index)(x)[0], logits[index][-1])


@pytest.mark.parametrize("arch, total", list(AUTHORS_PAIR_TOTALS.items()))
def test_heterogeneous_cohort_sizes(arch, total):
    cohort = on_meta(build_lmcl_cohort, arch, 2, 100 if "resnet18" not in arch else 1000)
    assert isinstance(cohort, LMCLCohort) and cohort.arch_names == arch.split(",")
    assert count(cohort) == total
    assert all(k.startswith("nets.0.") or k.startswith("nets.1.") for k in cohort.state_dict())


def test_cohort_forward_is_net_by_stage():
    torch.manual_seed(0)
    cohort = build_lmcl_cohort("resnet32", 3, 10)
    logits, features = cohort(torch.randn(4, 3, 32, 32))
    assert cohort.number_net == 3 and cohort.number_stage == 3 and cohort.feature_dims == [64] * 3
    assert [len(per_net) for per_net in logits] == [3, 3, 3]
    assert features[2][0].shape == (4, 64) and logits[1][2].shape == (4, 10)


@pytest.mark.parametrize("arch, number_net, message", [
    ("mobilenet_v2", 2, "no L-MCL variant"),
    ("resnet32,resnet18", 2, "same number of stages"),
    ("resnet32,resnet56", 3, "lists 2 architectures"),
])
def test_bad_cohorts_are_cohort_errors(arch, number_net, message):
    with pytest.raises(CohortError, match=message):
        on_meta(build_lmcl_cohort, arch, number_net, 10)


# ----------------------------------------------------------------------------- the authors' keys

def test_authors_key_mapping():
    assert authors_network_key("resnet32", "backbone.layer1.0.conv1.weight") == "stem.layer1.0.conv1.weight"
    assert authors_network_key("resnet32", "backbone.fc.bias") == "branch.classifier.bias"
    assert (authors_network_key("resnet110", "auxiliary_classifier.block_extractor2.0.3.bn3.weight")
            == "aux.1.body.0.3.bn3.weight")
    assert authors_network_key("resnet18", "auxiliary_classifier.fc3.weight") == "aux.2.fc.weight"
    assert authors_network_key("resnet18", "backbone.layer2.1.bn2.bias") == "stem.layer2.1.bn2.bias"
    assert authors_network_key("resnet50", "backbone.layer3.0.conv1.weight") == "stem.model.layer3.0.conv1.weight"
    mapped = authors_to_lmcl_keys(["resnet18", "resnet50"], {
        "net1.module_list.0.backbone.fc.weight": 0, "net2.module_list.0.backbone.fc.weight": 1})
    assert mapped == {"nets.0.branch.fc.weight": 0, "nets.1.branch.fc.weight": 1}
    with pytest.raises(ValueError, match="unexpected key"):
        authors_network_key("resnet32", "backbone.layer9.weight")
    with pytest.raises(ValueError, match="no mapping"):
        authors_network_key("wrn_16_2", "backbone.conv1.weight")


def test_authors_resnet32_forward_matches_their_outputs():
    """Their initial state and batch: our stage features and logits equal theirs (float64, train mode)."""
    case = reference_cases()[TRAIN_ITER]
    cohort = build_lmcl_cohort("resnet32", 2, 100).double().train()
    load_authors_state_dict(cohort, unpack_init(case["init"]["net"]))
    with torch.no_grad():
        logits, features = cohort(train_iter_inputs())
    expected = case["main_step"]
    torch.testing.assert_close(torch.stack([torch.stack(f) for f in features]), expected["embeddings"],
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.stack([torch.stack(t) for t in logits]), expected["logits"],
                               rtol=1e-10, atol=1e-10)
