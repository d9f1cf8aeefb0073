"""Results tables of grouped runs: metrics, mean ± std over seeds, markdown and CSV.

Metrics of one run: three of test top-1 %,

- ``paper``: the paper's and the original code's headline number, the best single
  network at its best epoch: max over epochs of (max over networks of test top-1);
- ``last``: the honest one, the last epoch's test top-1 averaged over networks;
- ``ensemble``: the last epoch's test top-1 of the ensemble (mean of the logits);

one of L-MCL runs only: ``aggregated``, the last epoch's test top-1 of every network's
aggregated logits (its aggregator over all its stages), averaged over networks (the three
above use each network's final head, the network itself);

and four of calibration at the last evaluated epoch (lower is better): ``nll`` and ``ece``
averaged over the networks, ``ensemble_nll`` and ``ensemble_ece`` of the ensemble
(negative log-likelihood in nats; expected calibration error in %, 15 confidence bins).

A table per section (entry point and dataset), a row per architecture, a column
per setting, a cell "mean ± std (n)" per group of seeds.
"""
import csv
import io
import re
import statistics
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from utils.errors import UserError
from utils.groups import ARCH_DISPLAY_NAMES, RunGroup
from utils.run_dirs import Run, as_floats, record_test, record_top1

METRIC_DESCRIPTIONS = {
    "paper": "best single network at its best epoch (the paper's and the original's headline number)",
    "last": "last-epoch test top-1 averaged over the networks of the cohort",
    "ensemble": "last-epoch test top-1 of the ensemble (mean of the networks' logits)",
    "aggregated": "L-MCL only: last-epoch test top-1 of each network's aggregated logits (its aggregator over "
                  "all stages) averaged over the networks",
    "nll": "last-epoch test negative log-likelihood averaged over the networks of the cohort",
    "ece": "last-epoch test expected calibration error (15 confidence bins) averaged over the networks",
    "ensemble_nll": "last-epoch test negative log-likelihood of the ensemble",
    "ensemble_ece": "last-epoch test expected calibration error (15 confidence bins) of the ensemble",
}

# What a cell holds, by metric (the first line of a markdown report says it).
METRIC_UNITS = {"nll": "Test NLL (nats, lower is better)", "ensemble_nll": "Test NLL (nats, lower is better)",
                "ece": "Test ECE % (lower is better)", "ensemble_ece": "Test ECE % (lower is better)"}

SCRIPT_ORDER = ("main_cifar", "main_imagenet", "main_lincls", "main_moco_mcl")

CSV_COLUMNS = ("section", "network", "setting", "metric", "mean", "std", "n", "seeds", "includes_unfinished", "runs")

# (rows, columns, {(row, column): cell}) of one table
Table = Tuple[List[str], List[str], Dict[Tuple[str, str], "Cell"]]


# ----------------------------------------------------------------------------- metrics

def test_top1_history(run: Run) -> List[Tuple[int, List[float]]]:
    """(epoch, test top-1 of every network (N,)) for every record that has a test evaluation."""
    history = []
    for record in run.records:
        top1 = record_top1(record)
        if top1:
            history.append((int(record.get("epoch", len(history) + 1)), top1))
    return history


def _summary_number(run: Run, key: str) -> Optional[float]:
    """summary.json's ``key`` when it is a number: the fallback without metrics.jsonl."""
    value = (run.summary or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def paper_metric(run: Run) -> Optional[float]:
    """Max over epochs of the best network's test top-1 (%); None without test results."""
    history = test_top1_history(run)
    if history:
        return max(max(top1) for _, top1 in history)
    return _summary_number(run, "best_acc")


def last_metric(run: Run) -> Optional[float]:
    """Mean over networks of the last evaluated epoch's test top-1 (%); None without test results."""
    history = test_top1_history(run)
    if history:
        top1 = history[-1][1]
        return sum(top1) / len(top1)
    return _summary_number(run, "last_mean_top1")


def ensemble_metric(run: Run) -> Optional[float]:
    """The ensemble's test top-1 (%) at the last evaluated epoch; None without it."""
    for record in reversed(run.records):
        ens = record_test(record).get("ens_top1")
        if isinstance(ens, (int, float)):
            return float(ens)
    return _summary_number(run, "last_ens_top1")


def _last_test_value(run: Run, key: str, summary_key: str, mean_over_networks: bool) -> Optional[float]:
    """The last evaluated epoch's test ``key`` (averaged over the networks when a list); else summary.json's
    ``summary_key``; None when neither has it (runs from before calibration was measured)."""
    for record in reversed(run.records):
        values = as_floats(record_test(record).get(key))
        if values:
            return sum(values) / len(values) if mean_over_networks else values[0]
    return _summary_number(run, summary_key)


def aggregated_metric(run: Run) -> Optional[float]:
    """L-MCL: mean over networks of the last evaluated epoch's aggregated top-1 (%); None for other runs."""
    return _last_test_value(run, "agg_top1", "last_mean_agg_top1", True)


def nll_metric(run: Run) -> Optional[float]:
    """Mean over networks of the last evaluated epoch's test NLL (nats)."""
    return _last_test_value(run, "nll", "last_mean_nll", True)


def ece_metric(run: Run) -> Optional[float]:
    """Mean over networks of the last evaluated epoch's test ECE (%)."""
    return _last_test_value(run, "ece", "last_mean_ece", True)


def ensemble_nll_metric(run: Run) -> Optional[float]:
    """The ensemble's test NLL (nats) at the last evaluated epoch."""
    return _last_test_value(run, "ens_nll", "last_ens_nll", False)


def ensemble_ece_metric(run: Run) -> Optional[float]:
    """The ensemble's test ECE (%) at the last evaluated epoch."""
    return _last_test_value(run, "ens_ece", "last_ens_ece", False)


METRIC_FUNCTIONS = {"paper": paper_metric, "last": last_metric, "ensemble": ensemble_metric,
                    "aggregated": aggregated_metric, "nll": nll_metric,
                    "ece": ece_metric, "ensemble_nll": ensemble_nll_metric, "ensemble_ece": ensemble_ece_metric}


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


# ----------------------------------------------------------------------------- cells

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


def counted_runs(group: RunGroup, include_unfinished: bool) -> List[Run]:
    """The runs of ``group`` that go into its statistics."""
    return [r for r in group.runs if r.finished or include_unfinished]


def make_cells(groups: Sequence[RunGroup], metric: str, include_unfinished: bool = False) -> List[Cell]:
    """One cell per group that has at least one counted run with test results."""
    cells = []
    for group in groups:
        pairs = [(r, metric_value(r, metric)) for r in counted_runs(group, include_unfinished)]
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


# ----------------------------------------------------------------------------- layout

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


def table_layout(cells: Sequence[Cell]) -> "OrderedDict[str, Table]":
    """section -> (rows, columns, {(row, column): cell}), in the order of the paper's tables."""
    layout: "OrderedDict[str, Table]" = OrderedDict()
    for section in sorted({c.group.section for c in cells}, key=_section_sort_key):
        in_section = [c for c in cells if c.group.section == section]
        rows = sorted({c.group.network for c in in_section}, key=_row_sort_key)
        columns = sorted({c.group.setting for c in in_section}, key=_setting_sort_key)
        layout[section] = (rows, columns, {(c.group.network, c.group.setting): c for c in in_section})
    return layout


# ----------------------------------------------------------------------------- notes

def _progress(run: Run) -> str:
    total = run.epochs_total
    text = f"{run.epochs_done}/{total if total is not None else '?'} epochs"
    if run.epochs_done and total is not None and run.epochs_done >= total:
        text += ", no summary.json"
    return text


def _unfinished_notes(groups: Sequence[RunGroup], include_unfinished: bool) -> List[str]:
    unfinished = [(r, g) for g in groups for r in g.runs if not r.finished]
    if not unfinished:
        return []
    how = ("included, their cells are marked *" if include_unfinished
           else "not in the means; --include-unfinished adds them, marked *")
    return [f"Unfinished runs ({how}):"] + [
        f"- {r.path}: {_progress(r)} ({g.network}, {g.setting}, seed {r.seed})" for r, g in unfinished]


def _no_test_notes(groups: Sequence[RunGroup], metric: str) -> List[str]:
    no_test = [r for g in groups for r in g.runs if r.finished and metric_value(r, metric) is None]
    if not no_test:
        return []
    calibration = metric in METRIC_UNITS
    lines = [f"Runs without test {'calibration' if calibration else 'accuracy'} (not in the tables):"]
    for r in no_test:
        if r.script == "main_moco_mcl":
            why = "MoCo pre-training; summarize its main_lincls runs"
        elif calibration and test_top1_history(r):
            why = "no NLL/ECE in metrics.jsonl (measured by main_cifar.py and main_imagenet.py since they were added)"
        else:
            why = "no test results in metrics.jsonl yet"
        lines.append(f"- {r.path}: {why}")
    return lines


def _repeated_seed_notes(groups: Sequence[RunGroup]) -> List[str]:
    lines = []
    for g in groups:
        seeds = [r.seed for r in g.runs]
        repeated = sorted({str(s) for s in seeds if seeds.count(s) > 1})
        if repeated:
            lines.append(f"Note: {g.network}, {g.setting} has several runs with seed {', '.join(repeated)}.")
    return lines


def _wide_baseline_notes(groups: Sequence[RunGroup], metric: str) -> List[str]:
    wide = [g for g in groups if g.setting.startswith("Baseline") and g.number_net > 1]
    if metric != "paper" or not wide:
        return []
    names = ", ".join(OrderedDict((g.network + g.setting[len("Baseline"):], None) for g in wide))
    return [f"Note: the Baseline runs of {names} train several independent networks; "
            "the paper metric takes the best of them, as the paper's baseline does (the original's scripts train "
            "--number-net 2); --metric last gives their mean."]


def report_notes(groups: Sequence[RunGroup], metric: str, include_unfinished: bool) -> List[str]:
    """Lines under the tables: unfinished runs, runs without test results, caveats."""
    return (_unfinished_notes(groups, include_unfinished) + _no_test_notes(groups, metric)
            + _repeated_seed_notes(groups) + _wide_baseline_notes(groups, metric))


# ----------------------------------------------------------------------------- reports

def metric_line(metric: str) -> str:
    """The first line of a markdown report: which metric, and what a cell holds."""
    return (f"Metric: {metric}, {METRIC_DESCRIPTIONS[metric]}. "
            f"{METRIC_UNITS.get(metric, 'Test top-1 %')}, mean ± std over seeds (number of runs).")


def _markdown_table(section: str, table: Table) -> List[str]:
    rows, columns, cells = table
    lines = [f"## {section}", "", "| Network | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        values = [format_cell(cells[(row, col)]) if (row, col) in cells else "" for col in columns]
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    return lines + [""]


def markdown_report(groups: Sequence[RunGroup], metric: str, include_unfinished: bool = False) -> str:
    """Markdown tables (one per section, laid out like the paper's), then notes."""
    layout = table_layout(make_cells(groups, metric, include_unfinished))
    out = [metric_line(metric), ""]
    if not layout:
        out += ["No run has test results to show yet.", ""]
    for section, table in layout.items():
        out += _markdown_table(section, table)
    for note in report_notes(groups, metric, include_unfinished):
        if out[-1] and not note.startswith("- "):
            out.append("")
        out.append(note)
    if out[-1]:
        out.append("")
    return "\n".join(out)


def _csv_row(section: str, row: str, column: str, metric: str, cell: Cell) -> List[Any]:
    return [
        section, row, column, metric, f"{cell.mean:.4f}",
        "" if cell.std is None else f"{cell.std:.4f}", cell.n,
        " ".join(str(r.seed) for r in cell.runs), int(cell.partial),
        " ".join(r.path for r in cell.runs),
    ]


def csv_report(groups: Sequence[RunGroup], metric: str, include_unfinished: bool = False) -> str:
    """One CSV line per table cell (long format), columns CSV_COLUMNS; std empty for n=1."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for section, (rows, columns, cells) in table_layout(make_cells(groups, metric, include_unfinished)).items():
        for row in rows:
            for col in columns:
                if (row, col) in cells:
                    writer.writerow(_csv_row(section, row, col, metric, cells[(row, col)]))
    return buffer.getvalue()
