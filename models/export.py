"""Export one network of a checkpoint as a file that loads without any cohort code.

The network's weights come from models.pretrained.network_state, the key mapping
that main_lincls.py --pretrained uses too. Which network: the one asked for, else
the best by the metrics.jsonl beside the checkpoint. Every exported state_dict is
checked to load strictly (or missing only a dropped module) into the model it is
meant for, built on the meta device (no memory, no init cost).
"""
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torchvision

import models
from models.cohort import last_linear_name
from models.pretrained import (SPLITNET_KEYS, NetworkState, check_net_index, checkpoint_script, count_networks,
                               network_state)
from models.registry import get_spec
from utils.checkpoint import best_checkpoint_path, latest_checkpoint_path, load_checkpoint
from utils.errors import CheckpointError, UserError
from utils.run_dirs import read_jsonl, record_top1
from utils.state_keys import drop_module, splitnet_to_torchvision_keys, take_prefix

NATIVE_FORMAT = "mcl-network"  # models.get_model(arch, num_classes).load_state_dict(state_dict)
TORCHVISION_FORMAT = "torchvision"  # torchvision.models.get_model(arch, num_classes=...).load_state_dict(...)


@dataclass
class NetChoice:
    """Which network of a cohort to export, and why."""

    index: int
    reason: str
    epoch: Optional[int] = None
    top1: Optional[float] = None


@dataclass
class Exported:
    """The weights of one network in the format they are written in."""

    format: str  # NATIVE_FORMAT or TORCHVISION_FORMAT
    arch: str
    num_classes: Optional[int]  # None: any (MoCo encoders have no classifier)
    state: Dict[str, Any]
    dropped: Optional[str] = None  # a module left out of ``state``


# ----------------------------------------------------------------------------- which file, which network

def resolve_checkpoint(path: str, which: str = "best") -> Tuple[str, List[str]]:
    """Checkpoint file for a run directory or a file path; also notes for the user.

    which="best": best.pth.tar, else checkpoint.pth.tar; which="last": checkpoint.pth.tar.
    """
    if which not in ("best", "last"):
        raise UserError(f"unknown --which {which!r}; choose best or last")
    if os.path.isfile(path):
        return path, []
    if not os.path.isdir(path):
        raise UserError(f"no such run directory or checkpoint: {path}")
    best, latest = best_checkpoint_path(path), latest_checkpoint_path(path)
    if which == "best" and os.path.isfile(best):
        return best, []
    if os.path.isfile(latest):
        notes = [f"{path} has no best.pth.tar; using checkpoint.pth.tar (the latest)"] if which == "best" else []
        return latest, notes
    raise UserError(f"{path} holds neither best.pth.tar nor checkpoint.pth.tar; pass a run directory of "
                    "main_cifar.py / main_imagenet.py / main_moco_mcl.py / main_lincls.py or a checkpoint file")


def epoch_of_checkpoint(records: Sequence[Dict[str, Any]], ckpt: Dict[str, Any],
                        is_best_file: bool) -> Optional[Dict[str, Any]]:
    """The metrics record that describes the weights of ``ckpt``.

    best.pth.tar: the record of its best_epoch (else the best record); another file
    (the latest checkpoint): the last record of an epoch completed before it was written.
    """
    evaluated = [r for r in records if record_top1(r)]
    if not evaluated:
        return None
    if is_best_file:
        at_best = [r for r in evaluated if r.get("epoch") == ckpt.get("best_epoch")]
        return at_best[0] if at_best else max(evaluated, key=lambda r: max(record_top1(r)))
    epoch = ckpt.get("epoch")
    if isinstance(epoch, int) and not ckpt.get("finished"):
        done = [r for r in evaluated if isinstance(r.get("epoch"), int) and r["epoch"] <= epoch]
        if done:
            return done[-1]
    return evaluated[-1]


def choose_net_index(records: Sequence[Dict[str, Any]], ckpt: Dict[str, Any], is_best_file: bool,
                     number_net: int) -> Optional[NetChoice]:
    """The network with the highest test top-1 at the checkpoint's epoch; None without test results."""
    record = epoch_of_checkpoint(records, ckpt, is_best_file)
    if record is None:
        return None
    top1 = record_top1(record)[:number_net]
    index = max(range(len(top1)), key=lambda k: top1[k])
    epoch = record.get("epoch")
    when = f"epoch {epoch}" if isinstance(epoch, int) else "the checkpoint's epoch"
    kind = "the best epoch" if is_best_file else "the checkpoint's last finished epoch"
    reason = f"net {index} has the highest test top-1 ({top1[index]:.2f}%) at {when}, {kind} in metrics.jsonl"
    return NetChoice(index=index, reason=reason, epoch=epoch, top1=top1[index])


def pick_net(ckpt: Dict[str, Any], ckpt_path: str, net_index: Optional[int]) -> NetChoice:
    """The requested network, or the best one by the metrics.jsonl beside the checkpoint (net 0 without)."""
    if net_index is not None:
        check_net_index(ckpt, net_index, ckpt_path)
        return NetChoice(index=net_index, reason="")
    number_net = count_networks(ckpt)
    if number_net == 1:
        return NetChoice(index=0, reason="")
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        return NetChoice(index=0, reason=f"no metrics.jsonl beside {ckpt_path}: "
                                         "exporting net 0 (choose another with --net-index)")
    is_best_file = os.path.basename(ckpt_path).startswith("best")
    choice = choose_net_index(read_jsonl(metrics_path), ckpt, is_best_file, number_net)
    if choice is None:
        return NetChoice(index=0, reason=f"{metrics_path} has no test results: "
                                         "exporting net 0 (choose another with --net-index)")
    return choice


# ----------------------------------------------------------------------------- checks on the meta device

def on_meta(build: Any, *args: Any, **kwargs: Any) -> Any:
    """``build(*args, **kwargs)`` with parameters on the meta device: no memory, no init cost.

    Such a module only checks a state_dict's keys and shapes, or takes the
    checkpoint's tensors with load_state_dict(assign=True).
    """
    with torch.device("meta"):
        return build(*args, **kwargs)


def load_strict(module: nn.Module, state: Dict[str, Any], what: str) -> None:
    """load_state_dict(strict=True, assign=True); CheckpointError naming a few offending keys."""
    result = module.load_state_dict(state, strict=False, assign=True)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"{what} does not fit: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; "
            "is it a checkpoint of another --arch or of another version of the code?"
        )
    try:
        module.load_state_dict(state, strict=True, assign=True)  # shape mismatches surface here
    except RuntimeError as err:
        raise CheckpointError(f"{what} does not fit: {str(err).splitlines()[-1].strip()}") from None


def target_model(fmt: str, arch: str, num_classes: Optional[int]) -> nn.Module:
    """The model an export of format ``fmt`` loads into, on the meta device."""
    if fmt == NATIVE_FORMAT:
        return on_meta(models.get_model, arch, num_classes)
    classes = {"num_classes": num_classes} if num_classes else {}
    return on_meta(torchvision.models.get_model, arch, weights=None, **classes)


def check_torchvision_load(exported: Exported) -> None:
    """The state loads into torchvision.models.<arch>: strictly, or missing only the dropped module."""
    model = target_model(TORCHVISION_FORMAT, exported.arch, exported.num_classes)
    if exported.dropped is None:
        load_strict(model, exported.state, f"the torchvision {exported.arch} weights")
        return
    result = model.load_state_dict(exported.state, strict=False, assign=True)
    extra = [k for k in result.missing_keys if not k.startswith(exported.dropped + ".")] + list(result.unexpected_keys)
    if extra:
        raise CheckpointError(f"the torchvision {exported.arch} weights do not fit: {extra[:3]}")


# ----------------------------------------------------------------------------- formats

def torchvision_state(arch: str, num_classes: int, state: Dict[str, Any]) -> Dict[str, Any]:
    """SplitNet state_dict -> the state_dict of torchvision.models.<arch>(num_classes=...).

    ImageNet ResNets of this project name their parts like torchvision: drop the
    "stem."/"branch." prefix. torchvision models used as they are (e.g. mobilenet_v2):
    "stem.model.X" -> "X" and "branch.fc.X" -> "<its classifier>.X".
    """
    if arch in models.available_architectures():
        if get_spec(arch).family != "imagenet" or arch not in torchvision.models.list_models():
            raise UserError(
                f"--torchvision needs an ImageNet ResNet (resnet18, resnet34) or a torchvision model; {arch} is a "
                "CIFAR network of this project: export without --torchvision and load it with models.get_model"
            )
        return splitnet_to_torchvision_keys(state)
    classifier = last_linear_name(target_model(TORCHVISION_FORMAT, arch, num_classes), arch)
    return {**take_prefix(state, "stem.model."), **take_prefix(state, "branch.fc.", classifier + ".")}


def _cohort_member(ckpt: Dict[str, Any], network: NetworkState, index: int, to_torchvision: bool) -> Exported:
    """A supervised network, checked to load strictly into models.get_model(arch, num_classes)."""
    for key in ("arch", "num_classes"):
        if ckpt.get(key) is None:
            raise CheckpointError(f"the checkpoint has no {key!r} entry; "
                                  "export takes checkpoints of main_cifar.py / main_imagenet.py")
    arch, num_classes = str(network.arch), int(ckpt["num_classes"])
    load_strict(target_model(NATIVE_FORMAT, arch, num_classes), network.state, f"network {index} ({arch})")
    if to_torchvision:
        return Exported(TORCHVISION_FORMAT, arch, num_classes, torchvision_state(arch, num_classes, network.state))
    return Exported(NATIVE_FORMAT, arch, num_classes, network.state)


def _exported(ckpt: Dict[str, Any], ckpt_path: str, index: int, to_torchvision: bool) -> Tuple[Exported, List[str]]:
    """Network ``index`` of ``ckpt`` in the format it is written in; notes for the user."""
    network = network_state(ckpt, index, ckpt_path)
    if network.keys == SPLITNET_KEYS:
        return _cohort_member(ckpt, network, index, to_torchvision), []
    arch = str(network.arch)
    if network.projection_head is not None:  # MoCo: keep the encoder, drop the projection head
        notes = ["MoCo encoders are exported without their projection head (fc); "
                 f"load with torchvision.models.{arch}() and strict=False (only fc missing)"]
        head = network.projection_head
        return Exported(TORCHVISION_FORMAT, arch, None, drop_module(network.state, head), head), notes
    num_classes = int(network.state["fc.weight"].shape[0])  # main_lincls: the trained classifier
    return Exported(TORCHVISION_FORMAT, arch, num_classes, network.state), []


def _without_classifier(exported: Exported) -> Exported:
    """``exported`` without its last Linear (its classifier)."""
    name = last_linear_name(target_model(exported.format, exported.arch, exported.num_classes), exported.arch)
    return Exported(exported.format, exported.arch, exported.num_classes, drop_module(exported.state, name), name)


def export_network(path: str, net_index: Optional[int] = None, which: str = "best",
                   to_torchvision: bool = False, drop_fc: bool = False) -> Tuple[Dict[str, Any], List[str]]:
    """Payload holding one network of a run directory or checkpoint, and notes for the user.

    Payload: {"format": "mcl-network" | "torchvision", "arch", "num_classes",
    "state_dict", "source", "net_index", "classifier_dropped", "test_top1", "epoch", "script"}.
    "mcl-network" loads with models.get_model(arch, num_classes).load_state_dict(sd);
    "torchvision" with torchvision.models.get_model(arch, num_classes=num_classes)
    (strict=False when "classifier_dropped", missing only the classifier).
    """
    ckpt_path, notes = resolve_checkpoint(path, which)
    ckpt = load_checkpoint(ckpt_path)
    choice = pick_net(ckpt, ckpt_path, net_index)
    notes += [choice.reason] if choice.reason else []
    exported, more_notes = _exported(ckpt, ckpt_path, choice.index, to_torchvision)
    notes += more_notes
    if drop_fc and exported.dropped is None:
        exported = _without_classifier(exported)
    if exported.format == TORCHVISION_FORMAT:
        check_torchvision_load(exported)
    payload = {
        "format": exported.format, "arch": exported.arch, "num_classes": exported.num_classes,
        "state_dict": exported.state, "source": os.path.abspath(ckpt_path), "net_index": choice.index,
        "classifier_dropped": exported.dropped, "test_top1": choice.top1, "epoch": choice.epoch,
        "script": checkpoint_script(ckpt),
    }
    return payload, notes
