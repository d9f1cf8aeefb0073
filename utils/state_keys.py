"""Mapping of state_dict keys between a checkpoint's model and one of its networks.

Pure dict work (no torch import). models/pretrained.py's ``network_state`` puts
these together into the one mapping that export and main_lincls.py share.
"""
from typing import Any, Dict

DDP_PREFIX = "module."


def take_prefix(state: Dict[str, Any], prefix: str, new_prefix: str = "") -> Dict[str, Any]:
    """Entries whose key starts with ``prefix``, re-prefixed with ``new_prefix``."""
    return {new_prefix + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def drop_module(state: Dict[str, Any], name: str) -> Dict[str, Any]:
    """``state`` without the entries of submodule ``name``."""
    return {k: v for k, v in state.items() if not k.startswith(name + ".")}


def strip_ddp_prefix(state: Dict[str, Any]) -> Dict[str, Any]:
    """Drop a DataParallel/DDP "module." prefix carried by every key."""
    if state and all(k.startswith(DDP_PREFIX) for k in state):
        return {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def cohort_topology(model_state: Dict[str, Any]) -> str:
    """"branched" when the keys show a shared stem and branches, else "independent"."""
    return "branched" if any(k.startswith("branches.") for k in model_state) else "independent"


def network_state_from_cohort_keys(model_state: Dict[str, Any], topology: str, index: int) -> Dict[str, Any]:
    """SplitNet state_dict of network ``index`` of a cohort state.

    independent: "nets.{k}.X" -> "X"; branched: "stem.X" -> "stem.X" and
    "branches.{k}.X" -> "branch.X".
    """
    if topology == "branched":
        return {**take_prefix(model_state, "stem.", "stem."),
                **take_prefix(model_state, f"branches.{index}.", "branch.")}
    return take_prefix(model_state, f"nets.{index}.")


def splitnet_to_torchvision_keys(state: Dict[str, Any]) -> Dict[str, Any]:
    """SplitNet keys -> torchvision keys: drop "stem."/"branch." and a TorchvisionBody's "model."."""
    plain = {**take_prefix(state, "stem."), **take_prefix(state, "branch.")}
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in plain.items()}

