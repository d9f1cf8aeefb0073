"""Single networks and cohorts of networks.

A network is ``branch(stem(x)) -> (logits (B, C), feature (B, F))`` (a
:class:`SplitNet`). A cohort of N networks is either

- :class:`IndependentCohort`: N complete networks, each with its own stem and
  its own initialisation (they may be of different architectures), or
- :class:`BranchedCohort`: ONE shared stem feeding N branches of the same
  architecture (the original's model for N != 2).

Both return ``(list of N logits (B, C), list of N features (B, F_n))``.

Besides the registered architectures (models/registry.py), any torchvision
classification model name (``mobilenet_v2``, ``efficientnet_b0``...) and any timm model as
``timm:<name>`` (``timm:convnext_atto``, models/timm_nets.py) can be used in an independent
cohort; they are built with random weights (never downloaded).
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torchvision

from .registry import TOPOLOGIES, CohortError, get_spec, registered_names
from .timm_nets import build_timm_parts, check_timm_name, is_timm_name

COHORT_CHOICES = ("auto",) + TOPOLOGIES

# torchvision models whose training-mode output is not a plain tensor unless told so.
TORCHVISION_EXTRA_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


class SplitNet(nn.Module):
    """One network: ``(B, 3, H, W) -> (logits (B, C), feature (B, F))``."""

    def __init__(self, stem: nn.Module, branch: nn.Module):
        super().__init__()
        self.stem = stem
        self.branch = branch

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.branch(self.stem(x))


class IndependentCohort(nn.Module):
    """N separate networks; ``forward(x) -> ([logits_n (B, C)], [feature_n (B, F_n)])``."""

    topology = "independent"

    def __init__(self, nets: Sequence[SplitNet], arch_names: Sequence[str], feature_dims: Sequence[int]):
        super().__init__()
        if not (len(nets) == len(arch_names) == len(feature_dims)):
            raise ValueError("nets, arch_names and feature_dims must have the same length")
        self.nets = nn.ModuleList(nets)
        self.arch_names = list(arch_names)
        self.feature_dims = list(feature_dims)

    @property
    def number_net(self) -> int:
        return len(self.nets)

    def member(self, index: int) -> nn.Module:
        """Network ``index`` alone, returning (logits, feature)."""
        return self.nets[index]

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        outputs = [net(x) for net in self.nets]
        return [logits for logits, _ in outputs], [feature for _, feature in outputs]


class BranchedCohort(nn.Module):
    """One shared stem and N branches; the stem runs once per forward."""

    topology = "branched"

    def __init__(self, stem: nn.Module, branches: Sequence[nn.Module], arch_name: str, feature_dim: int):
        super().__init__()
        self.stem = stem
        self.branches = nn.ModuleList(branches)
        self.arch_names = [arch_name] * len(self.branches)
        self.feature_dims = [feature_dim] * len(self.branches)

    @property
    def number_net(self) -> int:
        return len(self.branches)

    def member(self, index: int) -> nn.Module:
        """Network ``index`` alone (sharing this cohort's stem), returning (logits, feature)."""
        return SplitNet(self.stem, self.branches[index])

    def forward(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        shared = self.stem(x)
        outputs = [branch(shared) for branch in self.branches]
        return [logits for logits, _ in outputs], [feature for _, feature in outputs]


# ---------------------------------------------------------------- torchvision models

def torchvision_model_names() -> List[str]:
    """Names of torchvision's image classification models."""
    return torchvision.models.list_models(module=torchvision.models)


def is_torchvision_only(name: str) -> bool:
    """True for a torchvision classification model that is not a registered architecture."""
    return name not in registered_names() and name in torchvision_model_names()


def is_external(name: str) -> bool:
    """True for a member built from another library (torchvision or timm), which cannot be branched."""
    return is_timm_name(name) or is_torchvision_only(name)


class TorchvisionBody(nn.Module):
    """A classifier (torchvision's, or timm's) whose final Linear was taken out.

    ``(B, 3, H, W) -> feature (B, F)``, the input of the removed Linear. ``classifier_name``
    is that Linear's name in the library's own state_dict (e.g. "fc", "classifier.1", "head.fc").
    """

    def __init__(self, model: nn.Module, feature_dim: int, classifier_name: str = "fc"):
        super().__init__()
        self.model = model
        self.feature_dim = feature_dim
        self.classifier_name = classifier_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature = self.model(x)
        if feature.dim() != 2 or feature.size(1) != self.feature_dim:
            raise RuntimeError(
                f"expected the model's output before its last Linear to be (B, {self.feature_dim}), "
                f"got {tuple(feature.shape)}; this model does not end with its classifier Linear"
            )
        return feature


class LinearClassifier(nn.Module):
    """``feature (B, F) -> (logits (B, C), feature (B, F))``."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc

    def forward(self, feature: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.fc(feature), feature


def last_linear_name(model: nn.Module, model_name: str) -> str:
    """Qualified name of the last nn.Linear registered in ``model``."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise CohortError(f"torchvision model {model_name!r} has no Linear classifier; choose another model")
    return names[-1]


def build_torchvision_net(name: str, num_classes: int) -> SplitNet:
    """torchvision model ``name`` (random init) as SplitNet(body, LinearClassifier).

    Module surgery rather than a forward hook: the final Linear moves out of the
    model into the branch, so the feature is an ordinary intermediate value (works
    with DataParallel/DDP replicas, which a stored hook output would not).
    """
    kwargs = dict(TORCHVISION_EXTRA_KWARGS.get(name, {}))
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    fc_name = last_linear_name(model, name)
    fc = model.get_submodule(fc_name)
    model.set_submodule(fc_name, nn.Identity())
    return SplitNet(TorchvisionBody(model, fc.in_features, fc_name), LinearClassifier(fc))


def build_timm_net(name: str, num_classes: int) -> SplitNet:
    """timm model ``timm:<name>`` (random init) as SplitNet(body, LinearClassifier)."""
    model, fc, classifier_name = build_timm_parts(name, num_classes)
    return SplitNet(TorchvisionBody(model, fc.in_features, classifier_name), LinearClassifier(fc))


# ---------------------------------------------------------------- building

def unknown_name_error(name: str) -> CohortError:
    return CohortError(
        f"unknown architecture {name!r}; valid: {', '.join(registered_names())} "
        f"(or, for independent cohorts, any torchvision classification model name, e.g. mobilenet_v2, or a timm "
        f"model as timm:NAME, e.g. timm:convnext_atto)"
    )


def check_known(name: str) -> None:
    if is_timm_name(name):
        check_timm_name(name)
    elif name not in registered_names() and not is_torchvision_only(name):
        raise unknown_name_error(name)


def feature_dim_of(name: str, net: SplitNet) -> int:
    if name in registered_names():
        return get_spec(name).feature_dim
    return net.stem.feature_dim


def get_model(name: str, num_classes: int) -> SplitNet:
    """One independent network ``name``: forward ``(B, 3, H, W) -> (logits (B, C), feature (B, F))``."""
    check_known(name)
    if name in registered_names():
        spec = get_spec(name)
        return SplitNet(spec.make_stem("independent"), spec.make_branch(num_classes, "independent"))
    if is_timm_name(name):
        return build_timm_net(name, num_classes)
    return build_torchvision_net(name, num_classes)


def parse_arch_names(arch: str, number_net: int) -> List[str]:
    """``"a"`` -> [a] * number_net; ``"a,b,c"`` -> [a, b, c] (must list number_net names)."""
    if number_net < 1:
        raise CohortError(f"number_net must be at least 1, got {number_net}")
    names = [n.strip() for n in arch.split(",")]
    if any(not n for n in names):
        raise CohortError(f"empty architecture name in {arch!r}; write names separated by commas")
    if len(names) == 1:
        names = names * number_net
    elif len(names) != number_net:
        raise CohortError(
            f"--arch lists {len(names)} architectures but number_net is {number_net}; "
            f"give one name or exactly {number_net}"
        )
    for name in names:
        check_known(name)
    return names


def resolve_topology(cohort: str, arch_names: Sequence[str]) -> str:
    """The topology a cohort request means.

    "auto" is the original's rule: N == 2 (or N == 1) -> independent, otherwise
    branched; mixed cohorts and torchvision or timm models, which cannot be branched,
    are independent under "auto".
    """
    if cohort not in COHORT_CHOICES:
        raise CohortError(f"unknown cohort {cohort!r}; choose one of {', '.join(COHORT_CHOICES)}")
    mixed = len(set(arch_names)) > 1
    external = any(is_external(n) for n in arch_names)
    if cohort == "auto":
        if len(arch_names) in (1, 2) or mixed or external:
            return "independent"
        return "branched"
    if cohort == "branched":
        if mixed:
            raise CohortError("a mixed-architecture cohort cannot be branched; use --cohort independent")
        if external:
            raise CohortError(
                f"{arch_names[0]!r} is not a registered architecture and cannot be branched; "
                f"use --cohort independent or one of: {', '.join(registered_names())}"
            )
    return cohort


def build_cohort(arch: str, number_net: int, num_classes: int, cohort: str = "auto") -> nn.Module:
    """A cohort of ``number_net`` networks (IndependentCohort or BranchedCohort).

    ``arch`` is one name (repeated) or ``number_net`` comma-separated names.
    Raises CohortError (a ValueError) on unknown names or impossible requests.
    """
    names = parse_arch_names(arch, number_net)
    topology = resolve_topology(cohort, names)
    if topology == "independent":
        nets = [get_model(name, num_classes) for name in names]
        dims = [feature_dim_of(name, net) for name, net in zip(names, nets)]
        return IndependentCohort(nets, names, dims)
    spec = get_spec(names[0])
    branches = [spec.make_branch(num_classes, "branched") for _ in names]
    return BranchedCohort(spec.make_stem("branched"), branches, spec.name, spec.feature_dim)
