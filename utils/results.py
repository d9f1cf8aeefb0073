"""Export one network of a checkpoint (scripts/export.py).

The finding, reading, grouping, tabulating and plotting of run directories that
lived here are in utils/runs.py, utils/groups.py, utils/tables.py and utils/plots.py.
"""
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from utils.errors import CheckpointError, UserError
from utils.runs import as_floats as _as_list, infer_script, read_jsonl as _read_jsonl
from utils.state_keys import (cohort_topology, network_state_from_cohort_keys, splitnet_to_torchvision_keys,
                              strip_ddp_prefix, take_prefix)

# ----------------------------------------------------------------------------- export
#
# A checkpoint's "model" is a cohort's state_dict: IndependentCohort keys are
# "nets.{k}.<SplitNet key>", BranchedCohort keys "stem.<...>" and "branches.{k}.<...>"
# (a SplitNet's keys start with "stem." or "branch."). MoCo checkpoints hold a
# MoCoMCL: "encoders_q.{k}.<torchvision key>". models and torchvision are imported
# inside the functions that need them, so that summarize starts without torch.

NATIVE_FORMAT = "mcl-network"
TORCHVISION_FORMAT = "torchvision"


@dataclass
class NetChoice:
    """Which network of a cohort to export, and why."""

    index: int
    reason: str
    epoch: Optional[int] = None
    top1: Optional[float] = None


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
    from utils.checkpoint import best_checkpoint_path, latest_checkpoint_path

    best = best_checkpoint_path(path)
    latest = latest_checkpoint_path(path)
    if which == "best" and os.path.isfile(best):
        return best, []
    if os.path.isfile(latest):
        notes = [f"{path} has no best.pth.tar; using checkpoint.pth.tar (the latest)"] if which == "best" else []
        return latest, notes
    raise UserError(f"{path} holds neither best.pth.tar nor checkpoint.pth.tar; pass a run directory of "
                    "main_cifar.py / main_imagenet.py / main_moco_mcl.py / main_lincls.py or a checkpoint file")


def _record_at(records: Sequence[Dict[str, Any]], epoch: Any) -> Optional[Dict[str, Any]]:
    for record in records:
        if record.get("epoch") == epoch and isinstance(record.get("test"), dict):
            return record
    return None


def epoch_of_checkpoint(records: Sequence[Dict[str, Any]], ckpt: Dict[str, Any],
                        is_best_file: bool) -> Optional[Dict[str, Any]]:
    """The metrics record that describes the weights of ``ckpt``.

    best.pth.tar: the record of its best_epoch (else the best record); another file
    (the latest checkpoint): the last record of an epoch completed before it was written.
    """
    evaluated = [r for r in records if _as_list((r.get("test") or {}).get("top1")) if isinstance(r.get("test"), dict)]
    if not evaluated:
        return None
    if is_best_file:
        record = _record_at(evaluated, ckpt.get("best_epoch"))
        return record or max(evaluated, key=lambda r: max(_as_list(r["test"]["top1"])))
    epoch = ckpt.get("epoch")
    if isinstance(epoch, int) and not ckpt.get("finished"):
        done = [r for r in evaluated if isinstance(r.get("epoch"), int) and r["epoch"] < epoch]
        if done:
            return done[-1]
    return evaluated[-1]


def choose_net_index(records: Sequence[Dict[str, Any]], ckpt: Dict[str, Any], is_best_file: bool,
                     number_net: int) -> Optional[NetChoice]:
    """The network with the highest test top-1 at the checkpoint's epoch; None without test results."""
    record = epoch_of_checkpoint(records, ckpt, is_best_file)
    if record is None:
        return None
    top1 = _as_list(record["test"]["top1"])[:number_net]
    index = max(range(len(top1)), key=lambda k: top1[k])
    epoch = record.get("epoch")
    when = f"epoch {epoch + 1}" if isinstance(epoch, int) else "the checkpoint's epoch"
    kind = "the best epoch" if is_best_file else "the checkpoint's last finished epoch"
    reason = f"net {index} has the highest test top-1 ({top1[index]:.2f}%) at {when}, {kind} in metrics.jsonl"
    return NetChoice(index=index, reason=reason, epoch=epoch, top1=top1[index])


def _checkpoint_number_net(ckpt: Dict[str, Any]) -> int:
    number_net = ckpt.get("number_net") or (ckpt.get("config") or {}).get("number_net") or 1
    return int(number_net)


def pick_net(ckpt: Dict[str, Any], ckpt_path: str, net_index: Optional[int]) -> NetChoice:
    """The requested network, or the best one by the metrics.jsonl beside the checkpoint (net 0 without)."""
    number_net = _checkpoint_number_net(ckpt)
    if net_index is not None:
        if not 0 <= net_index < number_net:
            raise UserError(f"--net-index {net_index} is out of range: {ckpt_path} holds {number_net} "
                            f"network{'s' if number_net != 1 else ''} (0..{number_net - 1})")
        return NetChoice(index=net_index, reason="")
    if number_net == 1:
        return NetChoice(index=0, reason="")
    metrics_path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        return NetChoice(index=0, reason=f"no metrics.jsonl beside {ckpt_path}: "
                                         "exporting net 0 (choose another with --net-index)")
    is_best_file = os.path.basename(ckpt_path).startswith("best")
    choice = choose_net_index(_read_jsonl(metrics_path), ckpt, is_best_file, number_net)
    if choice is None:
        return NetChoice(index=0, reason=f"{metrics_path} has no test results: "
                                         "exporting net 0 (choose another with --net-index)")
    return choice


def on_meta(build: Any, *args: Any, **kwargs: Any) -> Any:
    """``build(*args, **kwargs)`` with parameters on the meta device: no memory, no init cost.

    Such a module only checks a state_dict's keys and shapes, or takes the
    checkpoint's tensors with load_state_dict(assign=True).
    """
    import torch

    with torch.device("meta"):
        return build(*args, **kwargs)


def _load_strict(module: Any, state: Dict[str, Any], what: str) -> None:
    """load_state_dict(strict=True, assign=True); CheckpointError naming a few offending keys.

    assign=True: a module built on the meta device takes the tensors of ``state``.
    """
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


def _cohort_arch_names(ckpt: Dict[str, Any], number_net: int) -> List[str]:
    names = [n.strip() for n in str(ckpt["arch"]).split(",")]
    return names * number_net if len(names) == 1 else names


def extract_network(ckpt: Dict[str, Any], index: int) -> Tuple[str, Dict[str, Any], List[str]]:
    """(arch, SplitNet state_dict, notes) of network ``index`` of a supervised checkpoint.

    Rebuilds the cohort with models.build_cohort and takes the member's weights; if
    the cohort does not rebuild, maps keys instead. Either way the result is checked
    to load strictly into models.get_model(arch, num_classes).
    """
    import models
    for key in ("arch", "num_classes", "model"):
        if ckpt.get(key) is None:
            raise CheckpointError(f"the checkpoint has no {key!r} entry; "
                                  "export takes checkpoints of main_cifar.py / main_imagenet.py")
    number_net = _checkpoint_number_net(ckpt)
    topology = ckpt.get("topology") or (ckpt.get("config") or {}).get("cohort") or "auto"
    num_classes = int(ckpt["num_classes"])
    model_state = strip_ddp_prefix(ckpt["model"])
    arch = _cohort_arch_names(ckpt, number_net)[index]
    notes: List[str] = []
    try:
        cohort = on_meta(models.build_cohort, str(ckpt["arch"]), number_net, num_classes, topology)
        _load_strict(cohort, model_state, "the checkpoint's cohort")
        state = {k: v.detach() for k, v in cohort.member(index).state_dict().items()}
        if any(v.is_meta for v in state.values()):
            raise CheckpointError("the cohort has state that its state_dict does not restore")
    except (ValueError, CheckpointError) as err:
        notes.append(f"could not rebuild the cohort ({err}); mapping keys instead")
        state = network_state_from_cohort_keys(model_state, cohort_topology(model_state), index)
    _load_strict(on_meta(models.get_model, arch, num_classes), state, f"network {index} ({arch})")
    return arch, state, notes


def classifier_name(module: Any) -> str:
    """Qualified name of the last nn.Linear of ``module`` (its classifier)."""
    import torch.nn as nn

    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UserError("this network has no Linear classifier to drop")
    return names[-1]


def drop_module(state: Dict[str, Any], name: str) -> Dict[str, Any]:
    """``state`` without the entries of submodule ``name``."""
    return {k: v for k, v in state.items() if not k.startswith(name + ".")}


def torchvision_state(arch: str, num_classes: int, state: Dict[str, Any]) -> Dict[str, Any]:
    """SplitNet state_dict -> the state_dict of torchvision.models.<arch>(num_classes=...).

    ImageNet ResNets of this project name their parts like torchvision: drop the
    "stem."/"branch." prefix. torchvision models used as they are (e.g. mobilenet_v2):
    "stem.model.X" -> "X" and "branch.fc.X" -> "<its classifier>.X".
    """
    import torchvision

    import models
    from models.registry import get_spec

    if arch in models.available_architectures():
        if get_spec(arch).family != "imagenet" or arch not in torchvision.models.list_models():
            raise UserError(
                f"--torchvision needs an ImageNet ResNet (resnet18, resnet34) or a torchvision model; {arch} is a "
                "CIFAR network of this project: export without --torchvision and load it with models.get_model"
            )
        return splitnet_to_torchvision_keys(state)
    reference = on_meta(torchvision.models.get_model, arch, weights=None, num_classes=num_classes)
    return {**take_prefix(state, "stem.model."), **take_prefix(state, "branch.fc.", classifier_name(reference) + ".")}


def check_torchvision_load(arch: str, num_classes: Optional[int], state: Dict[str, Any],
                           without: Optional[str]) -> None:
    """``state`` loads into torchvision.models.<arch>: strictly, or missing only submodule ``without``."""
    import torchvision
    model = on_meta(torchvision.models.get_model, arch, weights=None,
                    **({"num_classes": num_classes} if num_classes else {}))
    if without is None:
        _load_strict(model, state, f"the torchvision {arch} weights")
        return
    result = model.load_state_dict(state, strict=False, assign=True)
    extra = [k for k in result.missing_keys if not k.startswith(without + ".")] + list(result.unexpected_keys)
    if extra:
        raise CheckpointError(f"the torchvision {arch} weights do not fit: {extra[:3]}")


def moco_encoder_state(ckpt: Dict[str, Any], index: int) -> Dict[str, Any]:
    """torchvision state_dict of query encoder ``index`` of a main_moco_mcl checkpoint, without its fc.

    The fc of a MoCo encoder is the projection head (Linear(d, moco-dim), or the
    MoCo v2 MLP with --mlp), not a classifier: it is dropped.
    """
    model_state = strip_ddp_prefix(ckpt.get("model") or {})
    state = take_prefix(model_state, f"encoders_q.{index}.")
    if not state:
        raise CheckpointError(f"the MoCo checkpoint has no query encoder {index} (no 'encoders_q.{index}.' keys)")
    return drop_module(state, "fc")


def lincls_state(ckpt: Dict[str, Any]) -> Dict[str, Any]:
    """torchvision state_dict (with its trained fc) of a main_lincls checkpoint."""
    model_state = strip_ddp_prefix(ckpt.get("model") or {})
    for prefix in ("", "encoder.", "model.", "backbone."):
        candidate = take_prefix(model_state, prefix)
        if "conv1.weight" in candidate and "fc.weight" in candidate:
            return candidate
    raise CheckpointError("unrecognised main_lincls checkpoint: its model has no torchvision ResNet keys "
                          "(conv1.weight, fc.weight)")


def export_network(path: str, net_index: Optional[int] = None, which: str = "best",
                   torchvision: bool = False, drop_fc: bool = False) -> Tuple[Dict[str, Any], List[str]]:
    """Payload holding one network of a run directory or checkpoint, and notes for the user.

    Payload: {"format": "mcl-network" | "torchvision", "arch", "num_classes",
    "state_dict", "source", "net_index", "classifier_dropped", "test_top1", "epoch"}.
    "mcl-network" loads with models.get_model(arch, num_classes).load_state_dict(sd);
    "torchvision" with torchvision.models.get_model(arch, num_classes=num_classes)
    (strict=False when "classifier_dropped", missing only the classifier).
    """
    from utils.checkpoint import load_checkpoint

    ckpt_path, notes = resolve_checkpoint(path, which)
    ckpt = load_checkpoint(ckpt_path)
    script = ckpt.get("script") or infer_script(ckpt.get("config") or {})
    choice = pick_net(ckpt, ckpt_path, net_index)
    if choice.reason:
        notes.append(choice.reason)
    arch = str(ckpt.get("arch") or (ckpt.get("config") or {}).get("arch"))
    num_classes: Optional[int] = int(ckpt["num_classes"]) if ckpt.get("num_classes") else None
    fmt, dropped = TORCHVISION_FORMAT, None
    if script == "main_moco_mcl":
        state, num_classes, dropped = moco_encoder_state(ckpt, choice.index), None, "fc"
        notes.append("MoCo encoders are exported without their projection head (fc); "
                     f"load with torchvision.models.{arch}() and strict=False (only fc missing)")
    elif script == "main_lincls":
        state = lincls_state(ckpt)
        num_classes = int(state["fc.weight"].shape[0])
    else:
        arch, state, extra_notes = extract_network(ckpt, choice.index)
        notes.extend(extra_notes)
        if torchvision:
            state = torchvision_state(arch, num_classes, state)
        else:
            fmt = NATIVE_FORMAT
    if drop_fc and dropped is None:
        if fmt == NATIVE_FORMAT:
            import models
            dropped = classifier_name(on_meta(models.get_model, arch, num_classes))
        else:
            import torchvision as tv
            dropped = classifier_name(on_meta(tv.models.get_model, arch, weights=None, num_classes=num_classes))
        state = drop_module(state, dropped)
    if fmt == TORCHVISION_FORMAT:
        check_torchvision_load(arch, num_classes, state, dropped)
    payload = {
        "format": fmt, "arch": arch, "num_classes": num_classes, "state_dict": state,
        "source": os.path.abspath(ckpt_path), "net_index": choice.index,
        "classifier_dropped": dropped, "test_top1": choice.top1, "epoch": choice.epoch, "script": script,
    }
    return payload, notes
