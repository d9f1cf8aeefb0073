"""Pre-trained weights for main_lincls.py: a torchvision backbone out of a checkpoint of
main_moco_mcl.py, main_imagenet.py or the original MoCo-MCL code (key mapping in
utils/state_keys.py)."""
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from utils.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from utils.errors import CheckpointError, ConfigError
from utils.state_keys import cohort_member_torchvision_state, take_prefix

FC_KEYS = ("fc.weight", "fc.bias")


def _count_networks(ckpt: Dict[str, Any]) -> int:
    return int(ckpt.get("number_net") or 1)


def _member_arch(ckpt: Dict[str, Any], net_index: int, number_net: int) -> Optional[str]:
    """Architecture of network ``net_index`` ("a,b" lists one per network; one name serves all)."""
    archs = [a.strip() for a in str(ckpt.get("arch", "")).split(",") if a.strip()]
    return archs[net_index] if len(archs) == number_net else (archs[0] if archs else None)


def backbone_state(ckpt: Dict[str, Any], net_index: int,
                   path: str) -> Tuple[Dict[str, torch.Tensor], Optional[str], str]:
    """(torchvision state without fc, architecture or None, description) of one pre-trained network."""
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        script = ckpt.get("script")
        number_net = _count_networks(ckpt)
        if net_index >= number_net:
            raise ConfigError(f"--net-index {net_index} but {path} holds {number_net} networks (0..{number_net - 1})")
        arch = _member_arch(ckpt, net_index, number_net)
        if script == "main_moco_mcl":
            state, what = take_prefix(ckpt["model"], f"encoders_q.{net_index}."), f"query encoder {net_index}"
        elif script == "main_imagenet":
            state = cohort_member_torchvision_state(ckpt["model"], net_index)
            what = f"supervised network {net_index}"
        else:
            raise CheckpointError(f"{path} was written by {script}.py; --pretrained takes a checkpoint of "
                                  "main_moco_mcl.py or main_imagenet.py")
    else:  # the original code's MoCo-MCL checkpoint
        if not isinstance(ckpt.get("state_dict"), dict):
            raise CheckpointError(f"{path} is neither a checkpoint of this project nor of the original MoCo-MCL code")
        prefix = f"module.encoder_q_{net_index}."
        state = take_prefix(ckpt["state_dict"], prefix)
        if not state:
            raise ConfigError(f"--net-index {net_index}: {path} has no {prefix}* weights")
        arch, what = ckpt.get("arch"), f"query encoder {net_index} (original code)"
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if not state:
        raise CheckpointError(f"{path} holds no weights for network {net_index}")
    return state, arch, what


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
