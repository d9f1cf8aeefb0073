"""L-MCL networks: a plain network of the project plus auxiliary branches.

L-MCL (Yang et al., "Online Knowledge Distillation via Mutual Contrastive Learning for Visual
Recognition", TPAMI 2023) reads every network at S stages (3 on CIFAR, 4 on ImageNet). Stage k
< S-1 is an *auxiliary branch*: a fresh copy of the network's later stages fed by the output of
stage k, ending in global average pooling and its own Linear classifier. Stage S-1 is the
network itself. A network therefore yields S (logits, feature) pairs, in the order
``[aux 0, ..., aux S-2, backbone]``.

Branch sizes follow the authors' models: on CIFAR each copy holds the full later stages
(with the network's final BN-ReLU or 1x1 conv + BN-ReLU where it has one); on ImageNet the
ResNet copies hold one block per later stage, and of the ShuffleNetV2 copies the one fed by
the stem holds two units per stage (the strided one and one more), the others the full stages;
each ShuffleNetV2 copy ends with its own 1x1 conv + BN-ReLU.

State-dict layout of an :class:`LMCLNetwork`: ``stem.*`` and ``branch.*`` are exactly the keys
of ``models.get_model(arch, num_classes)`` (the plain network), the auxiliary branches live
under ``aux.{k}.body.*`` / ``aux.{k}.fc.*``. :func:`plain_state_dict` drops them.

Architectures: the CIFAR networks of the registry, the ImageNet ResNet-18/34 of the registry,
and torchvision's ``resnet50``, ``shufflenet_v2_x1_0`` and ``shufflenet_v2_x0_5`` (the plain
networks the authors' ImageNet L-MCL models are built around; an independent cohort already
uses torchvision's definition for these names).
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.shufflenetv2 import InvertedResidual

from . import hcgnet, resnet_cifar, shufflenetv2, wrn
from .cohort import CohortError, SplitNet, get_model, parse_arch_names
from .fused import bn_relu

AUX_PREFIX = "aux."
CIFAR_STAGES = 3
IMAGENET_STAGES = 4

# (plain network, input) -> (inputs of the auxiliary branches [h_0 .. h_{S-2}], logits, feature)
StageRunner = Callable[[nn.Module, Tensor], Tuple[List[Tensor], Tensor, Tensor]]


@dataclass(frozen=True)
class StagePlan:
    """How one architecture is read at several stages.

    run: the plain network's forward, also returning the inputs of the auxiliary branches;
    make_aux_bodies: fresh bodies of the S-1 auxiliary branches (body k is fed h_k);
    init_aux: initialisation of the auxiliary branches (the authors' for that family).
    """

    arch: str
    family: str  # "cifar" or "imagenet"
    number_stage: int
    feature_dim: int
    run: StageRunner
    make_aux_bodies: Callable[[], List[nn.Sequential]]
    init_aux: Callable[[nn.Module], None]


_PLANS: Dict[str, StagePlan] = {}


def _register(plan: StagePlan) -> None:
    if plan.arch in _PLANS:
        raise ValueError(f"L-MCL plan for {plan.arch!r} is registered twice")
    _PLANS[plan.arch] = plan


def lmcl_architectures() -> List[str]:
    """Names that have an L-MCL variant, in registration order."""
    return list(_PLANS)


def get_plan(arch: str) -> StagePlan:
    """The StagePlan of ``arch``; a CohortError lists the valid names otherwise."""
    try:
        return _PLANS[arch]
    except KeyError:
        raise CohortError(f"architecture {arch!r} has no L-MCL variant; valid: "
                          f"{', '.join(lmcl_architectures())}") from None


# ----------------------------------------------------------------------------- modules

def pool_flat(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C) global average."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class AuxiliaryBranch(nn.Module):
    """``body`` (copies of later stages), global average pooling, Linear.

    (B, C_k, H_k, W_k) -> (logits (B, num_classes), feature (B, feature_dim)).
    """

    def __init__(self, body: nn.Sequential, feature_dim: int, num_classes: int):
        super().__init__()
        self.body = body
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, h: Tensor) -> Tuple[Tensor, Tensor]:
        feature = pool_flat(self.body(h))
        return self.fc(feature), feature


class LMCLNetwork(nn.Module):
    """One network with its auxiliary branches.

    ``forward(x) -> (logits, features)``: two lists of S tensors, ``(B, C)`` and ``(B, F)``
    (F the network's feature size at every stage), in the order [aux 0, ..., aux S-2,
    backbone]. ``stem`` and ``branch`` are the plain network's; ``plain()`` returns it.
    """

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        plan = get_plan(arch)
        plain = get_model(arch, num_classes)
        self.stem, self.branch = plain.stem, plain.branch
        self.aux = nn.ModuleList(AuxiliaryBranch(body, plan.feature_dim, num_classes)
                                 for body in plan.make_aux_bodies())
        plan.init_aux(self.aux)
        self.arch = arch
        self.num_classes = num_classes
        self.plan = plan

    @property
    def number_stage(self) -> int:
        return self.plan.number_stage

    @property
    def feature_dim(self) -> int:
        return self.plan.feature_dim

    def plain(self) -> SplitNet:
        """The network without its auxiliary branches (shares this module's parameters)."""
        return SplitNet(self.stem, self.branch)

    def forward(self, x: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
        hidden, logits, feature = self.plan.run(self, x)
        outputs = [aux(h) for aux, h in zip(self.aux, hidden)]
        return [o[0] for o in outputs] + [logits], [o[1] for o in outputs] + [feature]


class LMCLCohort(nn.Module):
    """N L-MCL networks, possibly of different architectures but with the same number of stages.

    ``forward(x) -> (logits, features)``, each ``[net][stage]``: logits (B, C), features
    (B, F_net). State-dict keys ``nets.{n}.*`` as in an IndependentCohort.
    """

    topology = "independent"

    def __init__(self, nets: Sequence[LMCLNetwork]):
        super().__init__()
        stages = {net.number_stage for net in nets}
        if len(stages) != 1:
            raise CohortError("an L-MCL cohort needs networks with the same number of stages "
                              f"(CIFAR and ImageNet networks cannot be mixed); got {[n.arch for n in nets]}")
        self.nets = nn.ModuleList(nets)
        self.arch_names = [net.arch for net in nets]
        self.feature_dims = [net.feature_dim for net in nets]
        self.number_stage = stages.pop()

    @property
    def number_net(self) -> int:
        return len(self.nets)

    def member(self, index: int) -> SplitNet:
        """Network ``index`` without auxiliary branches, returning (logits, feature)."""
        return self.nets[index].plain()

    def forward(self, x: Tensor) -> Tuple[List[List[Tensor]], List[List[Tensor]]]:
        outputs = [net(x) for net in self.nets]
        return [logits for logits, _ in outputs], [features for _, features in outputs]


def build_lmcl_cohort(arch: str, number_net: int, num_classes: int) -> LMCLCohort:
    """``number_net`` L-MCL networks; ``arch`` is one name (repeated) or ``number_net``
    comma-separated names (a heterogeneous cohort). CohortError on bad requests."""
    for name in arch.split(","):
        get_plan(name.strip())  # names the L-MCL architectures when one is not
    names = parse_arch_names(arch, number_net)
    return LMCLCohort([LMCLNetwork(name, num_classes) for name in names])


# ----------------------------------------------------------------------------- export

def plain_state_dict(lmcl_state: Mapping[str, Any]) -> Dict[str, Any]:
    """The state of an LMCLNetwork without its auxiliary branches: the plain network's
    state dict (loads strictly into ``models.get_model(arch, num_classes)``)."""
    return {k: v for k, v in lmcl_state.items() if not k.startswith(AUX_PREFIX)}


def cohort_member_plain_state(cohort_state: Mapping[str, Any], index: int) -> Dict[str, Any]:
    """Network ``index`` of an LMCLCohort state dict, without its auxiliary branches."""
    prefix = f"nets.{index}."
    return plain_state_dict({k[len(prefix):]: v for k, v in cohort_state.items() if k.startswith(prefix)})


# ----------------------------------------------------------------------------- the authors' checkpoints

# Backbone module name of the authors' model -> ours, per family of ResNet keys.
_AUTHORS_BACKBONE_NAMES = {
    "cifar_resnet": {"conv1": "stem.conv1", "bn1": "stem.bn1", "layer1": "stem.layer1",
                     "layer2": "branch.layer2", "layer3": "branch.layer3", "fc": "branch.classifier"},
    "imagenet_resnet": {"conv1": "stem.conv1", "bn1": "stem.bn1", "layer1": "stem.layer1",
                        "layer2": "stem.layer2", "layer3": "branch.layer3", "layer4": "branch.layer4",
                        "fc": "branch.fc"},
    "torchvision_resnet": {"conv1": "stem.model.conv1", "bn1": "stem.model.bn1", "layer1": "stem.model.layer1",
                           "layer2": "stem.model.layer2", "layer3": "stem.model.layer3",
                           "layer4": "stem.model.layer4", "fc": "branch.fc"},
}
_AUTHORS_KEY_FAMILY = {
    "resnet32": "cifar_resnet", "resnet56": "cifar_resnet", "resnet110": "cifar_resnet",
    "resnet18": "imagenet_resnet", "resnet34": "imagenet_resnet", "resnet50": "torchvision_resnet",
}


def authors_network_key(arch: str, key: str) -> str:
    """A key of one network of the authors' L-MCL model (after ``module_list.{i}.``) -> ours.

    ``backbone.<module>.rest`` -> the plain network's name of that module;
    ``auxiliary_classifier.block_extractor{k}.rest`` -> ``aux.{k-1}.body.rest``;
    ``auxiliary_classifier.fc{k}.rest`` -> ``aux.{k-1}.fc.rest``. ResNet families only.
    """
    if arch not in _AUTHORS_KEY_FAMILY:
        raise ValueError(f"no mapping of the authors' keys for {arch!r}; "
                         f"available: {', '.join(_AUTHORS_KEY_FAMILY)}")
    head, _, rest = key.partition(".")
    if head == "backbone":
        module, _, tail = rest.partition(".")
        names = _AUTHORS_BACKBONE_NAMES[_AUTHORS_KEY_FAMILY[arch]]
        if module in names:
            return f"{names[module]}.{tail}"
    elif head == "auxiliary_classifier":
        module, _, tail = rest.partition(".")
        for stem_name, ours in (("block_extractor", "body"), ("fc", "fc")):
            number = module[len(stem_name):]
            if module.startswith(stem_name) and number.isdigit():
                return f"aux.{int(number) - 1}.{ours}.{tail}"
    raise ValueError(f"unexpected key {key!r} in the authors' {arch} model")


def authors_to_lmcl_keys(arch_names: Sequence[str], state: Mapping[str, Any]) -> Dict[str, Any]:
    """The authors' L-MCL cohort state dict -> an LMCLCohort state dict.

    Accepts their homogeneous layout ``module_list.{i}.*`` and their two-network
    heterogeneous layout ``net{i+1}.module_list.0.*``.
    """
    out = {}
    for key, value in state.items():
        index, rest = _authors_net_index(key)
        out[f"nets.{index}.{authors_network_key(arch_names[index], rest)}"] = value
    return out


def _authors_net_index(key: str) -> Tuple[int, str]:
    parts = key.split(".")
    if parts[0] == "module_list" and parts[1].isdigit():
        return int(parts[1]), ".".join(parts[2:])
    if parts[0] in ("net1", "net2") and parts[1:3] == ["module_list", "0"]:
        return int(parts[0][3:]) - 1, ".".join(parts[3:])
    raise ValueError(f"unexpected key {key!r}: expected module_list.<i>.* or net<i>.module_list.0.*")


def load_authors_state_dict(cohort: LMCLCohort, state: Mapping[str, Any]) -> None:
    """Load the authors' L-MCL model state (see :func:`authors_to_lmcl_keys`) strictly."""
    cohort.load_state_dict(authors_to_lmcl_keys(cohort.arch_names, state), strict=True)


# ----------------------------------------------------------------------------- CIFAR plans

def _resnet_aux_init(aux: nn.Module, zero_linear_bias: bool) -> None:
    resnet_cifar.init_resnet_weights(aux)
    if zero_linear_bias:
        for m in aux.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)


def _run_cifar_resnet(net: nn.Module, x: Tensor) -> Tuple[List[Tensor], Tensor, Tensor]:
    branch = net.branch
    h0 = net.stem(x)
    h1 = branch.layer2(h0)
    feature = pool_flat(branch.layer3(h1))
    return [h0, h1], branch.classifier(feature), feature


def _register_cifar_resnet(name: str, block: resnet_cifar.Block, num_blocks: int) -> None:
    e = block.expansion
    widths = resnet_cifar.STAGE_WIDTHS

    def stage(index: int) -> nn.Sequential:  # a copy of layer{index+1}
        return resnet_cifar.make_stage(block, widths[index - 1] * e, widths[index], num_blocks, stride=2)

    _register(StagePlan(
        arch=name, family="cifar", number_stage=CIFAR_STAGES, feature_dim=widths[2] * e,
        run=_run_cifar_resnet,
        make_aux_bodies=lambda: [nn.Sequential(stage(1), stage(2)), nn.Sequential(stage(2))],
        init_aux=lambda aux: _resnet_aux_init(aux, zero_linear_bias=True),
    ))


def _run_wrn(net: nn.Module, x: Tensor) -> Tuple[List[Tensor], Tensor, Tensor]:
    branch = net.branch
    h0 = net.stem(x)
    h1 = branch.block2(h0)
    feature = pool_flat(bn_relu(branch.bn, branch.block3(h1)))
    return [h0, h1], branch.fc(feature), feature


def _register_wrn(name: str, depth: int, k: int) -> None:
    n = wrn.blocks_per_stage(depth)

    def tail() -> List[nn.Module]:
        return [nn.BatchNorm2d(64 * k), nn.ReLU(inplace=True)]

    _register(StagePlan(
        arch=name, family="cifar", number_stage=CIFAR_STAGES, feature_dim=64 * k,
        run=_run_wrn,
        make_aux_bodies=lambda: [
            nn.Sequential(wrn.make_stage(16 * k, 32 * k, n, 2), wrn.make_stage(32 * k, 64 * k, n, 2), *tail()),
            nn.Sequential(wrn.make_stage(32 * k, 64 * k, n, 2), *tail()),
        ],
        init_aux=lambda aux: wrn.init_wrn_weights(aux, zero_linear_bias=True),
    ))


def _run_cifar_shufflenet(net: nn.Module, x: Tensor) -> Tuple[List[Tensor], Tensor, Tensor]:
    branch = net.branch
    h0 = net.stem(x)
    h1 = branch.layer2(h0)
    feature = pool_flat(F.relu(branch.bn2(branch.conv2(branch.layer3(h1)))))
    return [h0, h1], branch.linear(feature), feature


def _register_cifar_shufflenet(name: str, size: str) -> None:
    w = shufflenetv2.STAGE_WIDTHS[size]
    blocks = shufflenetv2.NUM_BLOCKS

    def tail() -> List[nn.Module]:  # conv2 + bn2 + ReLU
        return [*shufflenetv2.conv_bn(w[2], w[3], 1), nn.ReLU(inplace=True)]

    _register(StagePlan(
        arch=name, family="cifar", number_stage=CIFAR_STAGES, feature_dim=w[3],
        run=_run_cifar_shufflenet,
        make_aux_bodies=lambda: [
            nn.Sequential(shufflenetv2.make_stage(w[0], w[1], blocks[1]),
                          shufflenetv2.make_stage(w[1], w[2], blocks[2]), *tail()),
            nn.Sequential(shufflenetv2.make_stage(w[1], w[2], blocks[2]), *tail()),
        ],
        init_aux=lambda aux: None,  # PyTorch's default, as the backbone
    ))


def _run_hcgnet(net: nn.Module, x: Tensor) -> Tuple[List[Tensor], Tensor, Tensor]:
    branch = net.branch
    h0 = net.stem(x)
    h1 = branch.transition2(branch.block2(h0))
    feature = pool_flat(F.relu(branch.norm(branch.block3(h1))))
    return [h0, h1], branch.classifier(feature), feature


def _register_hcgnet(name: str) -> None:
    rates = hcgnet.GROWTH_RATES[name]
    _, c1, c2, feature_dim = hcgnet.stage_channels(rates)
    modules = hcgnet.SMG_PER_BLOCK

    def block3_and_tail() -> List[nn.Module]:
        return [hcgnet.HybridBlock(c2, rates[2], modules), nn.BatchNorm2d(feature_dim), nn.ReLU(inplace=True)]

    def first_body() -> nn.Sequential:
        block2 = hcgnet.HybridBlock(c1, rates[1], modules)
        return nn.Sequential(block2, hcgnet.Transition(block2.out_channels, c2), *block3_and_tail())

    _register(StagePlan(
        arch=name, family="cifar", number_stage=CIFAR_STAGES, feature_dim=feature_dim,
        run=_run_hcgnet,
        make_aux_bodies=lambda: [first_body(), nn.Sequential(*block3_and_tail())],
        init_aux=lambda aux: None,  # PyTorch's default, as the backbone
    ))


# ----------------------------------------------------------------------------- ImageNet plans

def _run_imagenet_resnet(net: nn.Module, x: Tensor) -> Tuple[List[Tensor], Tensor, Tensor]:
    stem, branch = net.stem, net.branch
    h0 = stem.layer1(stem.maxpool(bn_relu(stem.bn1, stem.conv1(x))))
    h1 = stem.layer2(h0)
    h2 = branch.layer3(h1)
    feature = pool_flat(branch.layer4(h2))
    return [h0, h1, h2], branch.fc(feature), feature


def _run_torchvision_resnet(net: nn.Module, x: Tensor) -> Tuple[List[Tensor], Tensor, Tensor]:
    m = net.stem.model
    h0 = m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))
    h1 = m.layer2(h0)
    h2 = m.layer3(h1)
    feature = pool_flat(m.layer4(h2))
    return [h0, h1, h2], net.branch.fc(feature), feature


def _imagenet_resnet_bodies(block: Any) -> List[nn.Sequential]:
    """One block per later stage (stride 2 each), as the authors' ImageNet branches."""
    e = block.expansion
    planes = (64, 128, 256, 512)

    def stage(index: int) -> nn.Sequential:
        return resnet_cifar.make_stage(block, planes[index - 1] * e, planes[index], 1, stride=2)

    return [nn.Sequential(*[stage(s) for s in range(k + 1, 4)]) for k in range(3)]


def _register_imagenet_resnet(name: str, block: Any, run: StageRunner) -> None:
    _register(StagePlan(
        arch=name, family="imagenet", number_stage=IMAGENET_STAGES, feature_dim=512 * block.expansion,
        run=run,
        make_aux_bodies=lambda: _imagenet_resnet_bodies(block),
        init_aux=lambda aux: _resnet_aux_init(aux, zero_linear_bias=False),
    ))


def _run_torchvision_shufflenet(net: nn.Module, x: Tensor) -> Tuple[List[Tensor], Tensor, Tensor]:
    m = net.stem.model
    h0 = m.maxpool(m.conv1(x))
    h1 = m.stage2(h0)
    h2 = m.stage3(h1)
    feature = pool_flat(m.conv5(m.stage4(h2)))
    return [h0, h1, h2], net.branch.fc(feature), feature


SHUFFLENET_IMAGENET_WIDTHS = {  # stem, stage2, stage3, stage4, conv5 (torchvision's)
    "shufflenet_v2_x0_5": (24, 48, 96, 192, 1024),
    "shufflenet_v2_x1_0": (24, 116, 232, 464, 1024),
}
SHUFFLENET_IMAGENET_REPEATS = (4, 8, 4)  # units per stage, the first one with stride 2


def _shufflenet_imagenet_bodies(widths: Tuple[int, ...]) -> List[nn.Sequential]:
    """Branch 0 (fed by the stem): two units per stage; branches 1, 2: full copies."""

    def stage(index: int, units: int) -> nn.Sequential:  # a copy of stage{index+2}
        inp, oup = widths[index], widths[index + 1]
        return nn.Sequential(InvertedResidual(inp, oup, 2), *[InvertedResidual(oup, oup, 1) for _ in range(units - 1)])

    def conv5() -> List[nn.Module]:
        return [nn.Conv2d(widths[3], widths[4], 1, 1, 0, bias=False), nn.BatchNorm2d(widths[4]),
                nn.ReLU(inplace=True)]

    repeats = SHUFFLENET_IMAGENET_REPEATS
    return [
        nn.Sequential(stage(0, 2), stage(1, 2), stage(2, 2), *conv5()),
        nn.Sequential(stage(1, repeats[1]), stage(2, repeats[2]), *conv5()),
        nn.Sequential(stage(2, repeats[2]), *conv5()),
    ]


def _register_torchvision_shufflenet(name: str) -> None:
    widths = SHUFFLENET_IMAGENET_WIDTHS[name]
    _register(StagePlan(
        arch=name, family="imagenet", number_stage=IMAGENET_STAGES, feature_dim=widths[4],
        run=_run_torchvision_shufflenet,
        make_aux_bodies=lambda: _shufflenet_imagenet_bodies(widths),
        init_aux=lambda aux: None,  # PyTorch's default, as torchvision's ShuffleNetV2
    ))


_register_cifar_resnet("resnet32", resnet_cifar.FusableBasicBlock, 5)
_register_cifar_resnet("resnet56", resnet_cifar.FusableBasicBlock, 9)
_register_cifar_resnet("resnet110", resnet_cifar.FusableBottleneck, 12)
_register_wrn("wrn_16_2", 16, 2)
_register_wrn("wrn_40_2", 40, 2)
_register_wrn("wrn_28_4", 28, 4)
_register_cifar_shufflenet("ShuffleNetV2_05x", "0.5x")
_register_cifar_shufflenet("ShuffleNetV2_1x", "1x")
_register_hcgnet("hcgnet_A1")
_register_hcgnet("hcgnet_A2")
_register_imagenet_resnet("resnet18", resnet_cifar.FusableBasicBlock, _run_imagenet_resnet)
_register_imagenet_resnet("resnet34", resnet_cifar.FusableBasicBlock, _run_imagenet_resnet)
_register_imagenet_resnet("resnet50", resnet_cifar.FusableBottleneck, _run_torchvision_resnet)
_register_torchvision_shufflenet("shufflenet_v2_x1_0")
_register_torchvision_shufflenet("shufflenet_v2_x0_5")

