"""Group runs that differ only by the seed, and name them like the paper's tables.

Runs whose configs differ only by the seed and by bookkeeping flags (paths,
workers, devices, ...) form a *group*; a group is one cell of the results table:
a row per architecture, a column per setting (Baseline, MCL(×N),
MCL(×N)+Logit KD, ...), laid out like the paper's result tables.
"""
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence

from utils.run_dirs import SEED_KEYS, Run, infer_script

# Flags that say where or how a run was executed, not what was trained.
BOOKKEEPING_KEYS = frozenset({
    "checkpoint_dir", "checkpoint", "run_name", "run_dir", "out_dir", "output_dir", "log_dir",
    "resume", "resume_checkpoint", "evaluate", "evaluate_checkpoint", "start_epoch",
    "data", "data_dir", "download", "num_workers", "workers",
    "device", "gpu_id", "gpu_ids", "gpu", "multiprocessing_distributed",
    "dist_url", "dist_backend", "dist_timeout", "world_size", "rank", "local_rank",
    "print_freq", "log_freq", "tensorboard", "no_tensorboard", "verbose", "quiet", "script",
    "versions", "provenance", "config", "no_progress", "save_every_steps", "eval_batch_size", "world_size_total",
    "batch_per_process", "normalization",
    "wandb", "tb_embeddings",  # dashboards
    # same maths, another execution path (amp, which changes numerics, is not in this list)
    "channels_last", "data_path", "fast", "deterministic",
})

# Flags of L-MCL only (--method lmcl): no part of what an MCL run (method "mcl", or a config from before
# --method existed) trained.
LMCL_ONLY_KEYS = frozenset({"method", "meta_freq", "times", "exact_hypergradient", "restore_bn_after_meta",
                            "vcl_partner_memory"})

WEIGHT_KEYS = ("alpha", "gamma", "beta", "lam")
LOSS_OF_WEIGHT = {"alpha": "VCL", "gamma": "Soft VCL", "beta": "ICL", "lam": "Soft ICL"}

# Row labels, in the order of the paper's tables.
ARCH_DISPLAY_NAMES = OrderedDict([
    ("resnet32", "ResNet-32"), ("resnet56", "ResNet-56"), ("resnet110", "ResNet-110"),
    ("wrn_16_2", "WRN-16-2"), ("wrn_40_2", "WRN-40-2"), ("wrn_28_4", "WRN-28-4"),
    ("hcgnet_A1", "HCGNet-A1"), ("hcgnet_A2", "HCGNet-A2"),
    ("ShuffleNetV2_05x", "ShuffleNetV2 0.5×"), ("ShuffleNetV2_1x", "ShuffleNetV2 1×"),
    ("resnet18", "ResNet-18"), ("resnet34", "ResNet-34"), ("resnet50", "ResNet-50"),
])

DATASET_DISPLAY_NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10", "imagenet": "ImageNet"}


# ----------------------------------------------------------------------------- labels

def network_name(arch: str) -> str:
    """Row label: "resnet32" -> "ResNet-32"; a mixed cohort "a,b" -> "A + B"."""
    parts = [p.strip() for p in str(arch).split(",") if p.strip()]
    return " + ".join(ARCH_DISPLAY_NAMES.get(p, p) for p in parts) or "?"


def section_title(run: Run) -> str:
    """Which table a run belongs to: one per entry point and dataset."""
    script = run.script
    dataset = str(run.config.get("dataset", "")).strip()
    pretty = DATASET_DISPLAY_NAMES.get(dataset.lower(), dataset)
    if script == "main_lincls":
        return f"Linear evaluation{' on ' + pretty if pretty else ''} (main_lincls.py)"
    if script == "main_moco_mcl":
        return "MoCo pre-training (main_moco_mcl.py)"
    default = "ImageNet" if script == "main_imagenet" else "CIFAR-100"
    return f"{pretty or default} ({script}.py)"


def _number(value: Any) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


def _number_net(config: Dict[str, Any]) -> int:
    return int(_number(config.get("number_net", 1)) or 1)


def base_setting(config: Dict[str, Any], script: Optional[str] = None) -> str:
    """Column label from what was trained.

    Baseline: every contrastive weight (alpha, gamma, beta, lam) 0 and no logit
    distillation; MCL(×N): N networks with all four weights; "+Logit KD" with
    --logit-distill; an ablation names its losses, e.g. "MCL(×2) [VCL+ICL]".
    --method lmcl: "L-MCL(×N)", an ablation likewise "L-MCL(×2) [ICL+Soft ICL]".
    MoCo pre-training: "MoCo" for one network, "MCL(×N)" for a cohort.
    """
    script = script or infer_script(config)
    number_net = _number_net(config)
    if script == "main_moco_mcl":
        return "MoCo" if number_net == 1 else f"MCL(×{number_net})"
    used = [k for k in WEIGHT_KEYS if _number(config.get(k)) != 0]
    if config.get("method") == "lmcl":
        label = f"L-MCL(×{number_net})"
        if len(used) < len(WEIGHT_KEYS):
            label += " [" + ("+".join(LOSS_OF_WEIGHT[k] for k in used) or "no contrast") + "]"
        return label
    distill = bool(config.get("logit_distill"))
    if not used:
        return f"Logit KD(×{number_net})" if distill else "Baseline"
    label = f"MCL(×{number_net})"
    if len(used) < len(WEIGHT_KEYS):
        label += " [" + "+".join(LOSS_OF_WEIGHT[k] for k in used) + "]"
    return label + ("+Logit KD" if distill else "")


def run_setting(run: Run) -> str:
    """Column label of a run; a linear evaluation takes the label of the run it evaluates."""
    if run.script == "main_lincls":
        if run.pretrain_config is not None:
            return base_setting(run.pretrain_config)
        return "linear eval"
    return base_setting(run.config, run.script)


# ----------------------------------------------------------------------------- identity

def canonical(value: Any) -> str:
    """A JSON text equal for equal values (sorted keys): a dict key for configs."""
    return json.dumps(value, sort_keys=True, default=str)


def _identity_items(config: Dict[str, Any], ignore: Iterable[str]) -> Dict[str, Any]:
    skipped = set(BOOKKEEPING_KEYS) | set(SEED_KEYS) | set(ignore)
    if config.get("method", "mcl") == "mcl":
        skipped |= LMCL_ONLY_KEYS
    return {k: v for k, v in config.items() if k not in skipped}


def identity(run: Run, ignore: Iterable[str] = ()) -> Dict[str, Any]:
    """The config that defines what a run trained: everything but seed and bookkeeping.

    A linear evaluation is identified by the pre-training run's identity instead
    of its checkpoint path (one path per pre-training seed), when config.json sits
    beside that checkpoint.
    """
    ident = _identity_items(run.config, ignore)
    ident["script"] = run.script
    if run.script == "main_lincls" and run.pretrain_config is not None:
        ident.pop("pretrained", None)
        ident["pretrained_run"] = _identity_items(run.pretrain_config, ignore)
    return ident


@dataclass
class RunGroup:
    """Runs that differ only by seed: one cell of the table."""

    section: str
    network: str
    setting: str
    identity: Dict[str, Any]
    runs: List[Run] = field(default_factory=list)

    @property
    def number_net(self) -> int:
        return _number_net(self.identity)


# ----------------------------------------------------------------------------- grouping

def _format_key_value(key: str, value: Any) -> str:
    if isinstance(value, float):
        value = format(value, "g")
    elif isinstance(value, (list, dict)):
        value = canonical(value).replace(" ", "")
    return f"{key}={value}"


def _flat_identity(ident: Dict[str, Any]) -> Dict[str, Any]:
    flat = {k: v for k, v in ident.items() if k != "pretrained_run"}
    for k, v in (ident.get("pretrained_run") or {}).items():
        flat[f"pretrain.{k}"] = v
    return flat


def _group_by(groups: Iterable[RunGroup], key: Any) -> "OrderedDict[Any, List[RunGroup]]":
    grouped: "OrderedDict[Any, List[RunGroup]]" = OrderedDict()
    for group in groups:
        grouped.setdefault(key(group), []).append(group)
    return grouped


def _varying_keys(same_label: Sequence[RunGroup]) -> List[str]:
    """Config keys that differ between groups sharing a label and a row, in first-seen order."""
    varying: List[str] = []
    for row in _group_by(same_label, lambda g: g.network).values():
        if len(row) < 2:
            continue
        flats = [_flat_identity(g.identity) for g in row]
        for key in sorted(set().union(*flats)):
            if len({canonical(f.get(key)) for f in flats}) > 1 and key not in varying:
                varying.append(key)
    return varying


def _disambiguate(groups: List[RunGroup]) -> None:
    """Append "key=value" to the labels of groups that would share a cell.

    For every label, the keys that differ between groups of the same section and
    row are named in every group of that label (so columns stay consistent).
    """
    for same_label in _group_by(groups, lambda g: (g.section, g.setting)).values():
        varying = _varying_keys(same_label)
        for group in same_label:
            flat = _flat_identity(group.identity)
            suffix = " ".join(_format_key_value(k, flat.get(k)) for k in varying)
            if suffix:
                group.setting = f"{group.setting} {suffix}"


def group_runs(runs: Sequence[Run], ignore: Iterable[str] = ()) -> List[RunGroup]:
    """Group runs by identity (config without seed and bookkeeping keys), in first-seen order."""
    ignore = tuple(ignore)
    groups: Dict[str, RunGroup] = OrderedDict()
    for run in runs:
        ident = identity(run, ignore)
        key = canonical(ident)
        if key not in groups:
            groups[key] = RunGroup(
                section=section_title(run),
                network=network_name(run.config.get("arch", "?")),
                setting=run_setting(run),
                identity=ident,
            )
        groups[key].runs.append(run)
    result = list(groups.values())
    _disambiguate(result)
    return result
