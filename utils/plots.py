"""Training curves of grouped runs: test top-1 per network and of the ensemble, and the
learning rate, each averaged over the group's seeds.

matplotlib is optional: it is imported only when a plot is drawn, and its absence
is a one-line UserError that says how to install it.
"""
import math
import statistics
from collections import OrderedDict
from typing import Any, Dict, List, Sequence, Tuple

from utils.errors import UserError
from utils.groups import RunGroup
from utils.run_dirs import Run, as_floats, record_test
from utils.tables import counted_runs, table_order

MATPLOTLIB_MISSING = "--plot needs matplotlib: pip install matplotlib (or pip install -e .[plot])"

# name ("net k", "ensemble", "lr") -> (epochs, values), both (E,)
Curves = Dict[str, Tuple[List[int], List[float]]]


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


def run_curves(run: Run) -> Dict[str, Dict[int, float]]:
    """Curves of one run: "net k" -> {epoch: test top-1}, "ensemble" -> {...}, "lr" -> {epoch: lr}."""
    curves: Dict[str, Dict[int, float]] = OrderedDict()
    for record in run.records:
        epoch = record.get("epoch")
        if not isinstance(epoch, int):
            continue
        test = record_test(record)
        for k, value in enumerate(as_floats(test.get("top1"))):
            curves.setdefault(f"net {k}", {})[epoch] = value
        for name, value in (("ensemble", test.get("ens_top1")), ("lr", record.get("lr"))):
            values = as_floats(value)
            if values:
                curves.setdefault(name, {})[epoch] = values[0]
    return curves


def group_curves(runs: Sequence[Run]) -> Curves:
    """Curves of a group, averaged over seeds: "net k" -> test top-1, "ensemble", "lr"."""
    per_run: Dict[str, List[Dict[int, float]]] = OrderedDict()
    for run in runs:
        for name, curve in run_curves(run).items():
            per_run.setdefault(name, []).append(curve)
    return OrderedDict((name, _mean_curve(series)) for name, series in per_run.items())


def _draw_panel(ax: Any, group: RunGroup, runs: Sequence[Run], curves: Curves) -> None:
    """Accuracy curves of one group on ``ax``, the learning rate on a second y axis."""
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


def _panels(groups: Sequence[RunGroup], include_unfinished: bool) -> List[Tuple[RunGroup, List[Run], Curves]]:
    """(group, counted runs, curves) of every group with accuracy curves, in table order."""
    panels = []
    for group in sorted(groups, key=table_order):
        runs = counted_runs(group, include_unfinished)
        curves = group_curves(runs)
        if any(name != "lr" for name in curves):
            panels.append((group, runs, curves))
    if not panels:
        raise UserError("nothing to plot: no counted run has test results per epoch (try --include-unfinished)")
    return panels


def plot_groups(groups: Sequence[RunGroup], path: str, include_unfinished: bool = False) -> int:
    """One panel per group: test top-1 of every network and of the ensemble (mean over
    seeds) per epoch, learning rate on a second y axis. Returns the number of panels."""
    plt = require_matplotlib()
    panels = _panels(groups, include_unfinished)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        _draw_panel(ax, *panel)
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
