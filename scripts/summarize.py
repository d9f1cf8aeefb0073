"""Results table (mean ± std over seeds) of run directories, as markdown or CSV, and curves.

    python scripts/summarize.py runs/*              # markdown, paper metric
    python scripts/summarize.py runs --metric last --csv --out results.csv
    python scripts/summarize.py runs --plot curves.png
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
from typing import List, Optional  # noqa: E402

from utils.args import HelpFormatter  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.groups import group_runs  # noqa: E402
from utils.plots import plot_groups, require_matplotlib  # noqa: E402
from utils.run_dirs import load_readable_runs  # noqa: E402
from utils.tables import METRIC_DESCRIPTIONS, csv_report, markdown_report  # noqa: E402

DESCRIPTION = """\
Tabulate runs of main_cifar.py, main_imagenet.py and main_lincls.py.

Runs whose config.json differ only by the seed (manual_seed / seed) and by
bookkeeping flags (checkpoint dir, data path, workers, devices, resume, ...) are
grouped; each group is one cell "mean ± std (n)" (sample std, ddof=1; no ± for a
single run) of a table laid out like the paper's: a row per architecture, a
column per setting. Baseline = contrastive weights alpha, gamma, beta, lam all 0
and no --logit-distill; MCL(×N) = N networks with the weights; MCL(×N)+Logit KD
with --logit-distill; other configurations get a descriptive name (an ablation
names its losses; keys that differ within a row are appended as key=value);
L-MCL(×N) = main_cifar.py / main_imagenet.py --method lmcl.
Linear evaluations take the setting of the pre-training run whose config.json
sits beside the --pretrained checkpoint.

Metrics (from metrics.jsonl, summary.json only as a fallback):
  paper  best single network at its best epoch: max over epochs of the best
         network's test top-1 (what the paper's tables and the original report)
  last   last-epoch test top-1 averaged over the networks of the cohort
  ensemble  last-epoch test top-1 of the ensemble (mean of the networks' logits)
         (L-MCL runs: all three from each network's final head, the network itself)
  aggregated  L-MCL runs only: last-epoch test top-1 of each network's aggregated
         logits (its aggregator over all stages), averaged over the networks
  nll, ece  calibration at the last evaluated epoch, averaged over the networks:
         negative log-likelihood (nats) and expected calibration error (%, 15
         equal-width confidence bins); lower is better
  ensemble_nll, ensemble_ece  the same of the ensemble (softmax of the mean logits)

A run directory whose files cannot be read (e.g. a damaged metrics.jsonl) is
skipped with one line on stderr naming it; the table shows the others.

A run without summary.json is unfinished: it is listed under the table with its
progress and left out of the means unless --include-unfinished (cells marked *).
"""

EPILOG = """\
--plot draws one panel per group: test top-1 per epoch of every network (net 0,
net 1, ...) and of the ensemble (dashed), each the mean over the group's seeds
(at each epoch, over the runs that reached it), with the learning rate on a second
y axis. It needs matplotlib (pip install matplotlib, or pip install -e .[plot]).

--csv writes one line per table cell: section, network, setting, metric, mean,
std, n, seeds, includes_unfinished, runs.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="summarize.py", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories, folders holding run directories, or globs of them")
    parser.add_argument("--metric", choices=tuple(METRIC_DESCRIPTIONS), default="paper",
                        help="paper: best single network at its best epoch; "
                             "last: last-epoch mean over networks; ensemble: last-epoch ensemble; "
                             "nll, ece, ensemble_nll, ensemble_ece: last-epoch calibration")
    parser.add_argument("--csv", action="store_true", help="write CSV (one line per cell) instead of markdown")
    parser.add_argument("--out", metavar="FILE", help="write the table to FILE instead of stdout")
    parser.add_argument("--include-unfinished", action="store_true",
                        help="count runs without summary.json in the means (their cells get a *)")
    parser.add_argument("--ignore-key", action="append", default=[], metavar="KEY",
                        help="also group runs that differ in config key KEY (repeatable)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw accuracy and learning-rate curves into FILE.png")
    return parser


def write_text(text: str, path: Optional[str]) -> None:
    """``text`` to ``path``, or to stdout when ``path`` is None."""
    if path is None:
        sys.stdout.write(text)
        return
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        require_matplotlib()  # fail before any output
    runs, unreadable = load_readable_runs(args.runs)
    for err in unreadable:  # one damaged run does not cost the table of the others
        print(f"skipped a run: {err}", file=sys.stderr)
    groups = group_runs(runs, ignore=args.ignore_key)
    report = csv_report if args.csv else markdown_report
    write_text(report(groups, args.metric, args.include_unfinished), args.out)
    if args.plot:
        panels = plot_groups(groups, args.plot, args.include_unfinished)
        print(f"wrote {args.plot} ({panels} panel{'s' if panels != 1 else ''})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
