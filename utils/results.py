"""Results of runs: load run directories, group seeds, tabulate, plot.

A run directory (written by main_cifar.py, main_imagenet.py, main_lincls.py) holds
``config.json`` (all flags), ``metrics.jsonl`` (one record per finished epoch) and,
once the run is over, ``summary.json``. Runs whose configs differ only by the seed
and by bookkeeping flags (paths, workers, devices, ...) form a *group*; a group is
one cell of the results table: a row per architecture, a column per setting
(Baseline, MCL(×N), MCL(×N)+Logit KD, ...), as in SPEC section 10.

Two metrics (SPEC section 8):

- ``paper``: the original's headline number, the best single network at its best
  epoch: max over epochs of (max over networks of test top-1);
- ``last``: the honest one, the last epoch's test top-1 averaged over networks.

Everything here is a pure function of the files read; the scripts only parse flags
and print.
"""
import csv
import glob
import io
import json
import math
import os
import re
import statistics
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from utils.errors import CheckpointError, UserError
from utils.state_keys import (cohort_topology, network_state_from_cohort_keys, splitnet_to_torchvision_keys,
                              strip_ddp_prefix, take_prefix)

SEED_KEYS = ("manual_seed", "seed")

# Flags that say where or how a run was executed, not what was trained.
BOOKKEEPING_KEYS = frozenset({
    "checkpoint_dir", "checkpoint", "run_name", "run_dir", "out_dir", "output_dir", "log_dir",
    "resume", "resume_checkpoint", "evaluate", "evaluate_checkpoint", "start_epoch",
    "data", "data_dir", "download", "num_workers", "workers",
    "device", "gpu_id", "gpu_ids", "gpu", "multiprocessing_distributed",
    "dist_url", "dist_backend", "world_size", "rank", "local_rank",
    "print_freq", "log_freq", "tensorboard", "no_tensorboard", "verbose", "quiet", "script",
    "versions", "no_progress", "save_every_steps", "eval_batch_size", "world_size_total", "batch_per_process",
    # same maths, another execution path (amp, which changes numerics, is not in this list)
    "channels_last", "data_path", "fast", "deterministic",
})

WEIGHT_KEYS = ("alpha", "gamma", "beta", "lam")
LOSS_OF_WEIGHT = {"alpha": "VCL", "gamma": "Soft VCL", "beta": "ICL", "lam": "Soft ICL"}

METRIC_DESCRIPTIONS = {
    "paper": "best single network at its best epoch (the paper's and the original's headline number)",
    "last": "last-epoch test top-1 averaged over the networks of the cohort",
    "ensemble": "last-epoch test top-1 of the ensemble (mean of the networks' logits)",
}

# SPEC section 10 names and row order.
ARCH_DISPLAY_NAMES = OrderedDict([
    ("resnet32", "ResNet-32"), ("resnet56", "ResNet-56"), ("resnet110", "ResNet-110"),
    ("wrn_16_2", "WRN-16-2"), ("wrn_40_2", "WRN-40-2"), ("wrn_28_4", "WRN-28-4"),
    ("hcgnet_A1", "HCGNet-A1"), ("hcgnet_A2", "HCGNet-A2"),
    ("ShuffleNetV2_05x", "ShuffleNetV2 0.5×"), ("ShuffleNetV2_1x", "ShuffleNetV2 1×"),
    ("resnet18", "ResNet-18"), ("resnet34", "ResNet-34"), ("resnet50", "ResNet-50"),
])

DATASET_DISPLAY_NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10", "imagenet": "ImageNet"}

SCRIPT_ORDER = ("main_cifar", "main_imagenet", "main_lincls", "main_moco_mcl")


# ----------------------------------------------------------------------------- runs

@dataclass
class Run:
    """One run directory as read from disk."""

    path: str
    config: Dict[str, Any]
    records: List[Dict[str, Any]]  # metrics.jsonl, in file order
    summary: Optional[Dict[str, Any]]  # summary.json, None while the run is going
    pretrain_config: Optional[Dict[str, Any]] = None  # main_lincls: config.json of the pre-training run

    @property
    def finished(self) -> bool:
        return self.summary is not None and bool(self.summary.get("finished", True))

    @property
    def epochs_done(self) -> int:
        epochs = [r["epoch"] for r in self.records if isinstance(r.get("epoch"), int)]
        return max(epochs) + 1 if epochs else 0

    @property
    def epochs_total(self) -> Optional[int]:
        for source in (self.summary or {}, self.records[-1] if self.records else {}, self.config):
            if isinstance(source.get("epochs"), int):
                return source["epochs"]
        return None

    @property
    def seed(self) -> Any:
        for key in SEED_KEYS:
            if key in self.config:
                return self.config[key]
        return None

    @property
    def script(self) -> str:
        return infer_script(self.config)


def infer_script(config: Dict[str, Any]) -> str:
    """Which entry point wrote ``config``: "main_cifar", "main_imagenet", "main_lincls" or "main_moco_mcl"."""
    script = config.get("script")
    if isinstance(script, str) and script:
        return os.path.splitext(os.path.basename(script))[0]
    if "moco_k" in config:
        return "main_moco_mcl"
    if "pretrained" in config:
        return "main_lincls"
    if "neg_k" in config or "nce_m" in config:
        return "main_imagenet"
    return "main_cifar"


def _has_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def _runs_below(directory: str) -> List[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        if "config.json" in files:
            found.append(root)
            dirs[:] = []  # a run directory's subfolders (tb/) are not runs
    return found


def find_run_dirs(patterns: Sequence[str]) -> List[str]:
    """Run directories named by ``patterns`` (directories or globs), deduplicated, in order.

    A directory without config.json stands for every run directory below it. A
    config.json or metrics.jsonl path stands for its directory.
    """
    found: List[str] = []
    for pattern in patterns:
        paths = sorted(glob.glob(pattern)) if _has_glob(pattern) else [pattern]
        if not paths:
            raise UserError(f"no run directory matches {pattern!r}; "
                            "check the pattern (quote it to let summarize expand it)")
        for path in paths:
            if os.path.isfile(path) and os.path.basename(path) in ("config.json", "metrics.jsonl", "summary.json"):
                path = os.path.dirname(path) or "."
            if not os.path.exists(path):
                raise UserError(f"no such run directory: {path}")
            if not os.path.isdir(path):
                raise UserError(f"{path} is not a run directory; pass directories written by "
                                "main_cifar.py, main_imagenet.py or main_lincls.py")
            found.extend(_runs_below(path))
    unique = list(OrderedDict((os.path.realpath(p), p) for p in found).values())
    if not unique:
        raise UserError(
            f"no runs found in {', '.join(patterns)}: a run directory holds config.json "
            "(written by main_cifar.py, main_imagenet.py, main_lincls.py)"
        )
    return unique


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise UserError(f"cannot read {path}: {reason}; fix or remove that run directory") from None


def _read_jsonl(path: str) -> List[Dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (a killed run) is dropped, any other bad line is an error."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    lines = [line for line in lines if line]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise UserError(f"cannot read {path}: line {number} is not JSON; "
                            "fix or remove that run directory") from None
        if not isinstance(record, dict):
            raise UserError(f"cannot read {path}: line {number} is not a JSON object")
        records.append(record)
    return records


def _pretrain_config(config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """config.json of the run whose checkpoint a main_lincls run evaluates, if it sits beside it."""
    pretrained = config.get("pretrained")
    if not isinstance(pretrained, str) or not pretrained:
        return None
    path = os.path.join(os.path.dirname(pretrained), "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            loaded = json.load(f)
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def load_run(path: str) -> Run:
    """Read one run directory; UserError if its files are unreadable."""
    config = _read_json(os.path.join(path, "config.json"))
    if not isinstance(config, dict):
        raise UserError(f"cannot read {os.path.join(path, 'config.json')}: not a JSON object")
    records = _read_jsonl(os.path.join(path, "metrics.jsonl"))
    summary_path = os.path.join(path, "summary.json")
    summary = _read_json(summary_path) if os.path.exists(summary_path) else None
    if summary is not None and not isinstance(summary, dict):
        raise UserError(f"cannot read {summary_path}: not a JSON object")
    pretrain = _pretrain_config(config) if infer_script(config) == "main_lincls" else None
    return Run(path=path, config=config, records=records, summary=summary, pretrain_config=pretrain)


# ----------------------------------------------------------------------------- metrics

def _as_list(value: Any) -> List[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value if isinstance(v, (int, float))]
    return []


def test_top1_history(run: Run) -> List[Tuple[int, List[float]]]:
    """(epoch, [test top-1 of every network]) for every record that has a test evaluation."""
    history = []
    for record in run.records:
        test = record.get("test")
        top1 = _as_list(test.get("top1")) if isinstance(test, dict) else []
        if top1:
            history.append((int(record.get("epoch", len(history))), top1))
    return history


def paper_metric(run: Run) -> Optional[float]:
    """Max over epochs of the best network's test top-1 (%); None without test results."""
    history = test_top1_history(run)
    if history:
        return max(max(top1) for _, top1 in history)
    if run.summary is not None and isinstance(run.summary.get("best_acc"), (int, float)):
        return float(run.summary["best_acc"])
    return None


def last_metric(run: Run) -> Optional[float]:
    """Mean over networks of the last evaluated epoch's test top-1 (%); None without test results."""
    history = test_top1_history(run)
    if history:
        top1 = history[-1][1]
        return sum(top1) / len(top1)
    if run.summary is not None and isinstance(run.summary.get("last_mean_top1"), (int, float)):
        return float(run.summary["last_mean_top1"])
    return None


def ensemble_metric(run: Run) -> Optional[float]:
    """The ensemble's test top-1 (%) at the last evaluated epoch; None without it."""
    for record in reversed(run.records):
        test = record.get("test")
        if isinstance(test, dict) and isinstance(test.get("ens_top1"), (int, float)):
            return float(test["ens_top1"])
    if run.summary is not None and isinstance(run.summary.get("last_ens_top1"), (int, float)):
        return float(run.summary["last_ens_top1"])
    return None


METRIC_FUNCTIONS = {"paper": paper_metric, "last": last_metric, "ensemble": ensemble_metric}


def metric_value(run: Run, metric: str) -> Optional[float]:
    """The value of ``metric`` (a key of METRIC_DESCRIPTIONS) for one run."""
    if metric not in METRIC_FUNCTIONS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_FUNCTIONS)}")
    return METRIC_FUNCTIONS[metric](run)


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


# ----------------------------------------------------------------------------- grouping

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


def base_setting(config: Dict[str, Any], script: Optional[str] = None) -> str:
    """Column label from what was trained.

    Baseline: every contrastive weight (alpha, gamma, beta, lam) 0 and no logit
    distillation; MCL(×N): N networks with all four weights; "+Logit KD" with
    --logit-distill; an ablation names its losses, e.g. "MCL(×2) [VCL+ICL]".
    MoCo pre-training: "MoCo" for one network, "MCL(×N)" for a cohort.
    """
    script = script or infer_script(config)
    number_net = int(_number(config.get("number_net", 1)) or 1)
    if script == "main_moco_mcl":
        return "MoCo" if number_net == 1 else f"MCL(×{number_net})"
    used = [k for k in WEIGHT_KEYS if _number(config.get(k)) != 0]
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


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _identity_items(config: Dict[str, Any], ignore: Iterable[str]) -> Dict[str, Any]:
    skipped = set(BOOKKEEPING_KEYS) | set(SEED_KEYS) | set(ignore)
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
        return int(_number(self.identity.get("number_net", 1)) or 1)


def _format_key_value(key: str, value: Any) -> str:
    if isinstance(value, float):
        value = format(value, "g")
    elif isinstance(value, (list, dict)):
        value = _canonical(value).replace(" ", "")
    return f"{key}={value}"


def _flat_identity(ident: Dict[str, Any]) -> Dict[str, Any]:
    flat = {k: v for k, v in ident.items() if k != "pretrained_run"}
    for k, v in (ident.get("pretrained_run") or {}).items():
        flat[f"pretrain.{k}"] = v
    return flat


def _disambiguate(groups: List[RunGroup]) -> None:
    """Append "key=value" to the labels of groups that would share a cell.

    For every label, the keys that differ between groups of the same section and
    row are named in every group of that label (so columns stay consistent).
    """
    by_label: Dict[Tuple[str, str], List[RunGroup]] = OrderedDict()
    for group in groups:
        by_label.setdefault((group.section, group.setting), []).append(group)
    for same_label in by_label.values():
        by_row: Dict[str, List[RunGroup]] = OrderedDict()
        for group in same_label:
            by_row.setdefault(group.network, []).append(group)
        varying: List[str] = []
        for row in by_row.values():
            if len(row) < 2:
                continue
            flats = [_flat_identity(g.identity) for g in row]
            keys = sorted(set().union(*flats))
            for key in keys:
                if len({_canonical(f.get(key)) for f in flats}) > 1 and key not in varying:
                    varying.append(key)
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
        key = _canonical(ident)
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


# ----------------------------------------------------------------------------- table

@dataclass
class Cell:
    """Statistics of one group under one metric."""

    group: RunGroup
    values: List[float]
    runs: List[Run]  # the runs behind ``values``
    partial: bool  # some of them are unfinished

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return mean_std(self.values)[0]

    @property
    def std(self) -> Optional[float]:
        return mean_std(self.values)[1]


def make_cells(groups: Sequence[RunGroup], metric: str, include_unfinished: bool = False) -> List[Cell]:
    """One cell per group that has at least one counted run with test results."""
    cells = []
    for group in groups:
        counted = [r for r in group.runs if r.finished or include_unfinished]
        pairs = [(r, metric_value(r, metric)) for r in counted]
        pairs = [(r, v) for r, v in pairs if v is not None]
        if pairs:
            cells.append(Cell(
                group=group,
                values=[v for _, v in pairs],
                runs=[r for r, _ in pairs],
                partial=any(not r.finished for r, _ in pairs),
            ))
    return cells


def format_cell(cell: Cell) -> str:
    """ "72.96 ± 0.28 (3)"; one run: "72.96 (1)"; "*" when unfinished runs are included."""
    text = f"{cell.mean:.2f}"
    if cell.std is not None:
        text += f" ± {cell.std:.2f}"
    text += f" ({cell.n})"
    return text + ("*" if cell.partial else "")


_LABEL_HEAD = re.compile(r"(Baseline|MoCo)|MCL\(×(\d+)\)(\+Logit KD)?")


def _setting_sort_key(label: str) -> Tuple[int, int, str]:
    """Baseline, MCL(×N) by N, MCL(×N)+Logit KD by N, then everything else by name."""
    match = _LABEL_HEAD.match(label)
    if match is None or label[match.end():].startswith(" ["):
        return (3, 0, label)
    number = int(match.group(2)) if match.group(2) else 0
    rank = 0 if match.group(1) else (2 if match.group(3) else 1)
    return (rank, number, label)


def _row_sort_key(network: str) -> Tuple[int, str]:
    names = list(ARCH_DISPLAY_NAMES.values())
    return (names.index(network), network) if network in names else (len(names), network)


def _section_sort_key(section: str) -> Tuple[int, str]:
    for index, script in enumerate(SCRIPT_ORDER):
        if f"({script}.py)" in section:
            return (index, section)
    return (len(SCRIPT_ORDER), section)


def table_order(group: RunGroup) -> Tuple[Any, ...]:
    """Sort key putting groups in the order of the tables: section, row, column."""
    return (_section_sort_key(group.section), _row_sort_key(group.network), _setting_sort_key(group.setting))


def table_layout(cells: Sequence[Cell]) -> "OrderedDict[str, Tuple[List[str], List[str], Dict[Tuple[str, str], Cell]]]":
    """section -> (rows, columns, {(row, column): cell}), in SPEC section 10 order."""
    layout: "OrderedDict[str, Tuple[List[str], List[str], Dict[Tuple[str, str], Cell]]]" = OrderedDict()
    for section in sorted({c.group.section for c in cells}, key=_section_sort_key):
        in_section = [c for c in cells if c.group.section == section]
        rows = sorted({c.group.network for c in in_section}, key=_row_sort_key)
        columns = sorted({c.group.setting for c in in_section}, key=_setting_sort_key)
        layout[section] = (rows, columns, {(c.group.network, c.group.setting): c for c in in_section})
    return layout


def _progress(run: Run) -> str:
    total = run.epochs_total
    text = f"{run.epochs_done}/{total if total is not None else '?'} epochs"
    if run.epochs_done and total is not None and run.epochs_done >= total:
        text += ", no summary.json"
    return text


def report_notes(groups: Sequence[RunGroup], metric: str, include_unfinished: bool) -> List[str]:
    """Lines under the tables: unfinished runs, runs without test results, caveats."""
    lines: List[str] = []
    unfinished = [(r, g) for g in groups for r in g.runs if not r.finished]
    if unfinished:
        how = ("included, their cells are marked *" if include_unfinished
               else "not in the means; --include-unfinished adds them, marked *")
        lines.append(f"Unfinished runs ({how}):")
        lines.extend(f"- {r.path}: {_progress(r)} ({g.network}, {g.setting}, seed {r.seed})" for r, g in unfinished)
    no_test = [(r, g) for g in groups for r in g.runs if r.finished and metric_value(r, metric) is None]
    if no_test:
        lines.append("Runs without test accuracy (not in the tables):")
        for r, g in no_test:
            why = ("MoCo pre-training; summarize its main_lincls runs" if r.script == "main_moco_mcl"
                   else "no test results in metrics.jsonl yet")
            lines.append(f"- {r.path}: {why}")
    for g in groups:
        seeds = [r.seed for r in g.runs]
        repeated = sorted({str(s) for s in seeds if seeds.count(s) > 1})
        if repeated:
            lines.append(f"Note: {g.network}, {g.setting} has several runs with seed {', '.join(repeated)}.")
    wide = [g for g in groups if g.setting.startswith("Baseline") and g.number_net > 1]
    if metric == "paper" and wide:
        names = ", ".join(OrderedDict((g.network + g.setting[len("Baseline"):], None) for g in wide))
        lines.append(
            f"Note: the Baseline runs of {names} train several independent networks; "
            "the paper metric takes the best of them (train with --number-net 1 for a single-network baseline)."
        )
    return lines


def metric_line(metric: str) -> str:
    return (f"Metric: {metric}, {METRIC_DESCRIPTIONS[metric]}. "
            "Test top-1 %, mean ± std over seeds (number of runs).")


def markdown_report(groups: Sequence[RunGroup], metric: str, include_unfinished: bool = False) -> str:
    """Markdown tables (one per section) in the layout of SPEC section 10, then notes."""
    cells = make_cells(groups, metric, include_unfinished)
    out = [metric_line(metric), ""]
    layout = table_layout(cells)
    if not layout:
        out += ["No run has test results to show yet.", ""]
    for section, (rows, columns, table) in layout.items():
        out.append(f"## {section}")
        out.append("")
        out.append("| Network | " + " | ".join(columns) + " |")
        out.append("|---|" + "---|" * len(columns))
        for row in rows:
            values = [format_cell(table[(row, col)]) if (row, col) in table else "" for col in columns]
            out.append(f"| {row} | " + " | ".join(values) + " |")
        out.append("")
    for note in report_notes(groups, metric, include_unfinished):
        if out[-1] and not note.startswith("- "):
            out.append("")
        out.append(note)
    if out[-1]:
        out.append("")
    return "\n".join(out)


CSV_COLUMNS = ("section", "network", "setting", "metric", "mean", "std", "n", "seeds", "includes_unfinished", "runs")


def csv_report(groups: Sequence[RunGroup], metric: str, include_unfinished: bool = False) -> str:
    """One CSV line per table cell (long format), columns CSV_COLUMNS; std empty for n=1."""
    cells = make_cells(groups, metric, include_unfinished)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for section, (rows, columns, table) in table_layout(cells).items():
        for row in rows:
            for col in columns:
                cell = table.get((row, col))
                if cell is None:
                    continue
                writer.writerow([
                    section, row, col, metric, f"{cell.mean:.4f}",
                    "" if cell.std is None else f"{cell.std:.4f}", cell.n,
                    " ".join(str(r.seed) for r in cell.runs), int(cell.partial),
                    " ".join(r.path for r in cell.runs),
                ])
    return buffer.getvalue()


# ----------------------------------------------------------------------------- plot

MATPLOTLIB_MISSING = "--plot needs matplotlib: pip install matplotlib (or pip install -e .[plot])"


def require_matplotlib() -> Any:
    """matplotlib.pyplot with the file-only Agg backend; UserError when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(MATPLOTLIB_MISSING) from None
    return plt


def _mean_curve(series: Sequence[Dict[int, float]]) -> Tuple[List[int], List[float]]:
    """Per-epoch mean over the runs that reached that epoch."""
    epochs = sorted(set().union(*[s.keys() for s in series])) if series else []
    return epochs, [statistics.fmean([s[e] for s in series if e in s]) for e in epochs]


def group_curves(runs: Sequence[Run]) -> Dict[str, Tuple[List[int], List[float]]]:
    """Curves of a group, averaged over seeds: "net k" -> test top-1, "ensemble", "lr"."""
    per_run: Dict[str, List[Dict[int, float]]] = OrderedDict()
    for run in runs:
        curves: Dict[str, Dict[int, float]] = OrderedDict()
        for record in run.records:
            epoch = record.get("epoch")
            test = record.get("test") if isinstance(record.get("test"), dict) else {}
            if not isinstance(epoch, int):
                continue
            for k, value in enumerate(_as_list(test.get("top1"))):
                curves.setdefault(f"net {k}", {})[epoch] = value
            ens = _as_list(test.get("ens_top1"))
            if ens:
                curves.setdefault("ensemble", {})[epoch] = ens[0]
            lr = _as_list(record.get("lr"))
            if lr:
                curves.setdefault("lr", {})[epoch] = lr[0]
        for name, curve in curves.items():
            per_run.setdefault(name, []).append(curve)
    return OrderedDict((name, _mean_curve(series)) for name, series in per_run.items())


def plot_groups(groups: Sequence[RunGroup], path: str, include_unfinished: bool = False) -> int:
    """One panel per group: test top-1 of every network and of the ensemble (mean over
    seeds) per epoch, learning rate on a second y axis. Returns the number of panels."""
    plt = require_matplotlib()
    panels = []
    for group in sorted(groups, key=table_order):
        runs = [r for r in group.runs if r.finished or include_unfinished]
        curves = group_curves(runs)
        if any(name != "lr" for name in curves):
            panels.append((group, runs, curves))
    if not panels:
        raise UserError("nothing to plot: no counted run has test results per epoch (try --include-unfinished)")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, (group, runs, curves) in zip(axes.flat, panels):
        for name, (epochs, values) in curves.items():
            if name == "lr":
                continue
            style = dict(color="black", linestyle="--", linewidth=1.6) if name == "ensemble" else dict(linewidth=1.0)
            ax.plot(epochs, values, label=name, **style)
        ax.set_title(f"{group.network}, {group.setting} ({len(runs)} seed{'s' if len(runs) != 1 else ''})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 %")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        legend_ax = ax
        if "lr" in curves:
            legend_ax = ax.twinx()  # drawn above ``ax``: the legend goes there to stay visible
            (line,) = legend_ax.plot(*curves["lr"], color="grey", linestyle=":", linewidth=1.0)
            legend_ax.set_ylabel("learning rate", color="grey")
            handles, labels = handles + [line], labels + ["lr (right axis)"]
        legend_ax.legend(handles, labels, fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return len(panels)


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
