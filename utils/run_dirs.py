"""Run directories: find them, read them.

A run directory (written by main_cifar.py, main_imagenet.py, main_lincls.py,
main_moco_mcl.py) holds ``config.json`` (all flags), ``metrics.jsonl`` (one record
per finished epoch) and, once the run is over, ``summary.json``. Everything here
is a pure function of the files read; it imports neither torch nor the models.
"""
import glob
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from utils.errors import UserError

SEED_KEYS = ("manual_seed", "seed")


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
        return max(epochs) if epochs else 0  # records number their epochs from 1

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


# ----------------------------------------------------------------------------- records

def as_floats(value: Any) -> List[float]:
    """A number or a list of numbers (one per network) as a list of floats; [] for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value if isinstance(v, (int, float))]
    return []


def record_test(record: Dict[str, Any]) -> Dict[str, Any]:
    """The "test" entry of a metrics.jsonl record; {} when the epoch was not evaluated."""
    test = record.get("test")
    return test if isinstance(test, dict) else {}


def record_top1(record: Dict[str, Any]) -> List[float]:
    """Test top-1 (%) of every network in a metrics.jsonl record: (N,); [] without a test evaluation."""
    return as_floats(record_test(record).get("top1"))


# ----------------------------------------------------------------------------- finding

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


def _run_dirs_of(pattern: str) -> List[str]:
    """Run directories of one pattern (a directory, a run file or a glob)."""
    paths = sorted(glob.glob(pattern)) if _has_glob(pattern) else [pattern]
    if not paths:
        raise UserError(f"no run directory matches {pattern!r}; "
                        "check the pattern (quote it to let summarize expand it)")
    found: List[str] = []
    for path in paths:
        if os.path.isfile(path) and os.path.basename(path) in ("config.json", "metrics.jsonl", "summary.json"):
            path = os.path.dirname(path) or "."
        if not os.path.exists(path):
            raise UserError(f"no such run directory: {path}")
        if not os.path.isdir(path):
            raise UserError(f"{path} is not a run directory; pass directories written by "
                            "main_cifar.py, main_imagenet.py or main_lincls.py")
        found.extend(_runs_below(path))
    return found


def find_run_dirs(patterns: Sequence[str]) -> List[str]:
    """Run directories named by ``patterns`` (directories or globs), deduplicated, in order.

    A directory without config.json stands for every run directory below it. A
    config.json or metrics.jsonl path stands for its directory.
    """
    found = [path for pattern in patterns for path in _run_dirs_of(pattern)]
    unique = list(OrderedDict((os.path.realpath(p), p) for p in found).values())
    if not unique:
        raise UserError(
            f"no runs found in {', '.join(patterns)}: a run directory holds config.json "
            "(written by main_cifar.py, main_imagenet.py, main_lincls.py)"
        )
    return unique


# ----------------------------------------------------------------------------- reading

def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise UserError(f"cannot read {path}: {reason}; fix or remove that run directory") from None


def _read_json_object(path: str) -> Dict[str, Any]:
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise UserError(f"cannot read {path}: not a JSON object")
    return obj


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    """Records of a metrics.jsonl ([] when absent); a torn last line (a killed run) is dropped,
    any other bad line is a UserError."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"cannot read {path}: not UTF-8 text (byte {err.start}); "
                        "fix or remove that run directory") from None
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
    config = _read_json_object(os.path.join(path, "config.json"))
    records = read_jsonl(os.path.join(path, "metrics.jsonl"))
    summary_path = os.path.join(path, "summary.json")
    summary = _read_json_object(summary_path) if os.path.exists(summary_path) else None
    pretrain = _pretrain_config(config) if infer_script(config) == "main_lincls" else None
    return Run(path=path, config=config, records=records, summary=summary, pretrain_config=pretrain)


def load_runs(patterns: Sequence[str]) -> List[Run]:
    """Every run directory named by ``patterns`` (see find_run_dirs), read; UserError at the first unreadable one."""
    return [load_run(path) for path in find_run_dirs(patterns)]


def load_readable_runs(patterns: Sequence[str]) -> Tuple[List[Run], List[UserError]]:
    """(the readable run directories named by ``patterns``, the error of each unreadable one).

    UserError when none is readable (the only error, or a count and the first).
    """
    runs: List[Run] = []
    errors: List[UserError] = []
    for path in find_run_dirs(patterns):
        try:
            runs.append(load_run(path))
        except UserError as err:
            errors.append(err)
    if not runs and len(errors) == 1:
        raise errors[0]
    if not runs:
        raise UserError(f"none of the {len(errors)} run directories is readable; the first: {errors[0]}")
    return runs, errors
