"""Networks inside checkpoints: the weights of network i of any supported checkpoint.

:func:`network_state` is the one place that knows where network i sits in a
checkpoint; scripts/export.py (models/export.py) and main_lincls.py --pretrained
(:func:`backbone_state`) both read networks through it:

- main_cifar.py / main_imagenet.py cohorts: "nets.{i}.*" (independent) or
  "stem.*" + "branches.{i}.*" (branched), mapped to SplitNet keys, which load
  into models.get_model(arch, num_classes);
- main_moco_mcl.py: query encoder "encoders_q.{i}.*", torchvision keys; its fc is
  MoCo's projection head, not a classifier;
- main_lincls.py: the torchvision classifier (one network, with its trained fc);
- the original MoCo-MCL code: "module.encoder_q_{i}.*", torchvision keys.
"""
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from utils.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from utils.errors import CheckpointError, ConfigError
from utils.run_dirs import infer_script
from utils.state_keys import (cohort_topology, drop_module, network_state_from_cohort_keys,
                              splitnet_to_torchvision_keys, strip_ddp_prefix, take_prefix)

from .lmcl import cohort_member_plain_state

FC_KEYS = ("fc.weight", "fc.bias")
SPLITNET_KEYS = "splitnet"  # models.get_model(arch, num_classes)
TORCHVISION_KEYS = "torchvision"  # torchvision.models.<arch>
PRETRAINED_SCRIPTS = ("main_moco_mcl", "main_imagenet")  # what --pretrained takes besides the original code's


@dataclass
class NetworkState:
    """Network i of a checkpoint: its state_dict and how to read it."""

    state: Dict[str, Any]
    arch: Optional[str]  # None when the checkpoint does not say
    keys: str  # SPLITNET_KEYS or TORCHVISION_KEYS
    what: str  # e.g. "query encoder 1", for messages
    projection_head: Optional[str] = None  # a module of ``state`` that is not a classifier (MoCo's fc)


# ----------------------------------------------------------------------------- what a checkpoint holds

def is_project_checkpoint(ckpt: Dict[str, Any]) -> bool:
    """True for a checkpoint written by this project's scripts (else: the original code's)."""
    return ckpt.get("format") == CHECKPOINT_FORMAT


def checkpoint_script(ckpt: Dict[str, Any]) -> str:
    """The entry point that wrote a checkpoint of this project, e.g. "main_moco_mcl"."""
    return ckpt.get("script") or infer_script(ckpt.get("config") or {})


def count_networks(ckpt: Dict[str, Any]) -> int:
    """How many networks a checkpoint holds (1 when it does not say)."""
    return int(ckpt.get("number_net") or (ckpt.get("config") or {}).get("number_net") or 1)


def member_arch(ckpt: Dict[str, Any], index: int) -> Optional[str]:
    """Architecture of network ``index``: "a,b" lists one per network, one name serves all; None if unnamed."""
    arch = ckpt.get("arch") or (ckpt.get("config") or {}).get("arch") or ""
    names: List[str] = [a.strip() for a in str(arch).split(",") if a.strip()]
    if not names:
        return None
    return names[index] if 1 < len(names) and index < len(names) else names[0]


def check_net_index(ckpt: Dict[str, Any], index: int, path: str) -> None:
    """ConfigError unless 0 <= ``index`` < the number of networks of ``ckpt``."""
    number_net = count_networks(ckpt)
    if not 0 <= index < number_net:
        raise ConfigError(f"--net-index {index} is out of range: {path} holds {number_net} "
                          f"network{'s' if number_net != 1 else ''} (0..{number_net - 1})")


# ----------------------------------------------------------------------------- the key mapping

def _take_network(state: Dict[str, Any], prefix: str, index: int, path: str) -> Dict[str, Any]:
    network = take_prefix(state, prefix)
    if not network:
        raise CheckpointError(f"{path} holds no weights for network {index} (no '{prefix}*' keys)")
    return network


def _lincls_classifier(model_state: Dict[str, Any], path: str) -> Dict[str, Any]:
    """The torchvision classifier of a main_lincls model state (keys maybe under a wrapper's prefix)."""
    for prefix in ("", "encoder.", "model.", "backbone."):
        candidate = take_prefix(model_state, prefix)
        if all(key in candidate for key in ("conv1.weight", "fc.weight")):
            return candidate
    raise CheckpointError(f"unrecognised main_lincls checkpoint {path}: its model has no torchvision ResNet keys "
                          "(conv1.weight, fc.weight)")


def _original_code_network(ckpt: Dict[str, Any], index: int, path: str) -> NetworkState:
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is neither a checkpoint of this project nor of the original MoCo-MCL code")
    state = _take_network(ckpt["state_dict"], f"module.encoder_q_{index}.", index, path)
    return NetworkState(state, member_arch(ckpt, index), TORCHVISION_KEYS,
                        f"query encoder {index} (original code)", projection_head="fc")


def network_state(ckpt: Dict[str, Any], index: int, path: str) -> NetworkState:
    """Network ``index`` of any supported checkpoint (see the module docstring).

    ConfigError when ``index`` is out of range; CheckpointError when the checkpoint
    does not hold that network.
    """
    if not is_project_checkpoint(ckpt):
        return _original_code_network(ckpt, index, path)
    check_net_index(ckpt, index, path)
    if not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' entry; is it a checkpoint of this project's scripts?")
    model_state = strip_ddp_prefix(ckpt["model"])
    script, arch = checkpoint_script(ckpt), member_arch(ckpt, index)
    if script == "main_moco_mcl":
        state = _take_network(model_state, f"encoders_q.{index}.", index, path)
        return NetworkState(state, arch, TORCHVISION_KEYS, f"query encoder {index}", projection_head="fc")
    if script == "main_lincls":
        return NetworkState(_lincls_classifier(model_state, path), arch, TORCHVISION_KEYS, "linear classifier")
    if ckpt.get("method") == "lmcl":  # without its auxiliary branches: the plain network
        state = cohort_member_plain_state(model_state, index)
    else:
        state = network_state_from_cohort_keys(model_state, cohort_topology(model_state), index)
    if not state:
        raise CheckpointError(f"{path} holds no weights for network {index}")
    return NetworkState(state, arch, SPLITNET_KEYS, f"supervised network {index}")


# ----------------------------------------------------------------------------- main_lincls.py --pretrained

def backbone_state(ckpt: Dict[str, Any], net_index: int,
                   path: str) -> Tuple[Dict[str, torch.Tensor], Optional[str], str]:
    """(torchvision state without fc, architecture or None, description) of one pre-trained network."""
    if is_project_checkpoint(ckpt) and checkpoint_script(ckpt) not in PRETRAINED_SCRIPTS:
        raise CheckpointError(f"{path} was written by {checkpoint_script(ckpt)}.py; --pretrained takes a "
                              "checkpoint of main_moco_mcl.py or main_imagenet.py")
    network = network_state(ckpt, net_index, path)
    state = network.state if network.keys == TORCHVISION_KEYS else splitnet_to_torchvision_keys(network.state)
    state = drop_module(state, "fc")
    if not state:
        raise CheckpointError(f"{path} holds no weights for network {net_index}")
    return state, network.arch, network.what


def read_pretrained(path: str) -> Dict[str, Any]:
    """Our checkpoint format, or the original code's dict with a 'state_dict'."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--pretrained {path} does not exist; pass a checkpoint of main_moco_mcl.py")
    try:
        return load_checkpoint(path)
    except CheckpointError:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:
            raise CheckpointError(f"--pretrained {path} is truncated or not a checkpoint") from None
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise CheckpointError(f"--pretrained {path} is not a checkpoint of main_moco_mcl.py, "
                                  "main_imagenet.py or the original code") from None
        return ckpt


def load_backbone(model: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    """Load ``state`` into everything but the fc; CheckpointError when the shapes or names do not fit."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path} does not fit this architecture ({first}); pass the matching -a") from None
    missing = sorted(set(result.missing_keys) - set(FC_KEYS))
    if missing or result.unexpected_keys:
        bad = (missing + list(result.unexpected_keys))[:3]
        raise CheckpointError(f"{path} does not fit this architecture (e.g. {', '.join(bad)}); pass the matching -a")
