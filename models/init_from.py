"""Starting weights for networks of a cohort: ``--init-from [INDEX=]PATH ...``.

PATH holds one network's state_dict: ``torch.save(net.state_dict(), PATH)`` of a network
built by models.get_model, of the library model itself (a torchvision or timm model, keys as
that library names them, e.g. ``conv1.weight`` and ``fc.weight``; a ResNet-18/34 of this
project takes torchvision's keys too), or a file of scripts/export.py. A dict holding the
state under "state_dict" or "model", and DataParallel's "module." prefix, are accepted.

Every weight of the network must be in the file with its shape, except the classifier (the
branch's last Linear): a file without one, or with one for another number of classes, leaves
it at its random initialisation (and says so). Anything else that does not fit is one
CheckpointError naming the keys.
"""
import os
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from utils.checkpoint import CHECKPOINT_FORMAT
from utils.errors import CheckpointError, ConfigError
from utils.state_keys import strip_ddp_prefix

from .cohort import TorchvisionBody, last_linear_name

SHOWN = 3  # keys named per kind of problem


def parse_init_from(specs: Sequence[str], number_net: int) -> Dict[int, str]:
    """{network index: path} of ``--init-from`` values ``I=PATH`` (``PATH`` alone: every network).

    ConfigError for an index outside the cohort, a network named twice, or a missing file.
    """
    chosen: Dict[int, str] = {}
    for spec in specs or ():
        head, sep, tail = spec.partition("=")
        indices, path = ([int(head)], tail) if sep and head.strip().isdigit() else (range(number_net), spec)
        if not path:
            raise ConfigError(f"--init-from {spec!r} names no file; write INDEX=PATH or PATH")
        for index in indices:
            if index >= number_net:
                raise ConfigError(f"--init-from {spec}: network {index} does not exist (--number-net {number_net}: "
                                  f"0..{number_net - 1})")
            if index in chosen:
                raise ConfigError(f"--init-from names network {index} twice ({chosen[index]} and {path})")
            chosen[index] = path
    for path in sorted(set(chosen.values())):
        if not os.path.isfile(path):
            raise ConfigError(f"--init-from {path} does not exist")
    return chosen


def read_network_state(path: str) -> Dict[str, torch.Tensor]:
    """The state_dict a file holds (see the module docstring)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        hint = ""
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            hint = ("; a checkpoint of a whole run? export one network first: python scripts/export.py RUN_DIR "
                    "--net-index K --out net.pth")
        raise CheckpointError(f"--init-from {path} is not a state_dict file torch.load can read{hint}") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        raise CheckpointError(f"--init-from {path} is a checkpoint of a whole cohort; export one network first: "
                              f"python scripts/export.py {path} --net-index K --out net.pth")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"--init-from {path} does not hold a state_dict (a dict of tensors)")
    return strip_ddp_prefix(obj)


def library_keys(network: nn.Module) -> Dict[str, str]:
    """{key as the network's own library names it: key of the network}.

    torchvision / timm members: "stem.model.X" <- "X" and "branch.fc.X" <- "<classifier>.X";
    this project's networks: "stem.X" / "branch.X" <- "X" (when unambiguous).
    """
    keys = list(network.state_dict())
    body = getattr(network, "stem", None)
    if isinstance(body, TorchvisionBody):
        mapping = {k[len("stem.model."):]: k for k in keys if k.startswith("stem.model.")}
        mapping.update({f"{body.classifier_name}.{k[len('branch.fc.'):]}": k for k in keys
                        if k.startswith("branch.fc.")})
        return mapping
    plain: Dict[str, List[str]] = {}
    for k in keys:
        plain.setdefault(k.split(".", 1)[1] if "." in k else k, []).append(k)
    return {short: full[0] for short, full in plain.items() if len(full) == 1}


def classifier_prefix(network: nn.Module) -> str:
    """"branch.<name>." of the network's classifier (the branch's last Linear)."""
    return f"branch.{last_linear_name(network.branch, 'network')}."


def match_keys(state: Dict[str, torch.Tensor], network: nn.Module) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(the file's tensors under the network's keys, the file's keys that name nothing in it)."""
    own = network.state_dict()
    by_library = library_keys(network)
    matched, unexpected = {}, []
    for key, value in state.items():
        target = key if key in own else by_library.get(key)
        if target is None:
            unexpected.append(key)
        else:
            matched[target] = value
    return matched, unexpected


def _names(keys: Sequence[str]) -> str:
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def load_network(network: nn.Module, path: str, what: str) -> str:
    """Load the state_dict of ``path`` into ``network`` (see the module docstring); returns the line to print."""
    matched, unexpected = match_keys(read_network_state(path), network)
    own = network.state_dict()
    classifier = classifier_prefix(network)
    wrong_shape = [k for k, v in matched.items() if tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in matched]
    kept = [k for k in missing + wrong_shape if k.startswith(classifier)]
    missing = [k for k in missing if k not in kept]
    wrong_shape = [k for k in wrong_shape if k not in kept]
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    if wrong_shape:
        problems.append("shape of " + ", ".join(f"{k} {tuple(matched[k].shape)} in the file, {tuple(own[k].shape)} "
                                               f"in the network" for k in wrong_shape[:SHOWN]))
    if problems:
        raise CheckpointError(f"--init-from {path} does not fit {what}: {'; '.join(problems)}; pass a state_dict of "
                              "that architecture")
    network.load_state_dict({k: v for k, v in matched.items() if k not in kept}, strict=False)
    note = " (its classifier keeps its random initialisation: the file has none for this number of classes)" \
        if kept else ""
    return f"{what} starts from {path}{note}"


def init_networks(cohort: nn.Module, paths: Dict[int, str]) -> List[str]:
    """Load ``paths`` ({network index: file}) into the networks of an independent cohort; the lines to print."""
    if not paths:
        return []
    if cohort.topology != "independent":
        raise ConfigError("--init-from loads whole networks, which a branched cohort does not have (its networks "
                          "share one stem); add --cohort independent")
    return [load_network(cohort.member(i), path, f"network {i} ({cohort.arch_names[i]})")
            for i, path in sorted(paths.items())]
