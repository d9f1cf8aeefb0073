"""Does MCL help? Baseline against MCL(x2) on a class-balanced CIFAR subset, over seeds and precisions.

    python scripts/study_cifar.py --data DIR --out study

trains, with main_cifar.py, every (precision, method, seed) of the study -- by default
``fast`` (bf16 autocast, channels_last, the tensor data path) for seeds 0 1 2 and
``fp32`` (the same data path and memory format in float32) for seed 0, each for the
baseline (two independent networks) and MCL(x2) with the paper's weights -- running
``--jobs`` processes side by side with ``--threads`` intra-op threads each. ``DIR`` holds
``cifar-10-batches-py/`` (the official python layout). Each run goes to its own run
directory under ``--out`` and is started with ``--resume``, so running the study again
continues unfinished runs and skips finished ones. At the end it writes
``OUT/study.md``: the last-epoch mean of the two networks, the best single network at its
best epoch (the paper's metric) and the last-epoch ensemble, as mean ± std over seeds.

Arguments after ``--`` reach every run (e.g. ``-- --max-train-batches 2``).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import List, Optional, Sequence  # noqa: E402

from utils.args import AT_LEAST_1, HelpFormatter, parse_flags  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.groups import group_runs  # noqa: E402
from utils.run_dirs import load_runs  # noqa: E402
from utils.tables import markdown_report  # noqa: E402

MAIN_CIFAR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "main_cifar.py")
MCL_WEIGHTS = ["--alpha", "0.1", "--gamma", "1.", "--beta", "0.1", "--lam", "1."]  # the paper's MCL(x2)
METHODS = {"baseline": [], "mcl": MCL_WEIGHTS}
# Both precisions share the data path and memory format, so the only difference is the arithmetic.
PRECISIONS = {"fast": ["--fast"], "fp32": ["--data-path", "tensor", "--channels-last"]}
METRICS = ("last", "paper", "ensemble")


@dataclass(frozen=True)
class Job:
    precision: str
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.precision}-{self.method}-seed{self.seed}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="study_cifar.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="folder holding cifar-10-batches-py/ (or cifar-100-python/)")
    p.add_argument("--dataset", default="cifar10", help="the --dataset of every run")
    p.add_argument("--out", default="study", help="folder of the run directories and study.md")
    p.add_argument("--arch", default="resnet32", help="architecture of both networks")
    p.add_argument("--epochs", type=int, default=20, help="epochs of every run (cosine schedule)")
    p.add_argument("--train-per-class", type=int, default=1000,
                   help="training images per class (the first ones of each class; 0 = all)")
    p.add_argument("--m-per-class", type=int, default=16, help="images per class in a batch")
    p.add_argument("--fast-seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds trained with --fast")
    p.add_argument("--fp32-seeds", type=int, nargs="*", default=[0], help="seeds trained in float32")
    p.add_argument("--max-eval-batches", type=int, default=20,
                   help="evaluate every epoch on the first N x 256 test images (20: 5,120 of CIFAR-10's 10,000, "
                        "to keep evaluation cheap; 0 = all)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each run")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    return p


def plan_jobs(fast_seeds: Sequence[int], fp32_seeds: Sequence[int]) -> List[Job]:
    """Every run of the study; seed by seed, baseline and MCL next to each other, the fast path first."""
    return [Job(precision, method, seed)
            for precision, seeds in (("fast", fast_seeds), ("fp32", fp32_seeds))
            for seed in seeds for method in METHODS]


def job_command(job: Job, args: argparse.Namespace, extra: Sequence[str]) -> List[str]:
    """The main_cifar.py command line of one run."""
    return ([sys.executable, MAIN_CIFAR, "--dataset", args.dataset, "--data", args.data, "--arch", args.arch,
             "--number-net", "2", "--epochs", str(args.epochs), "--train-per-class", str(args.train_per_class),
             "--m-per-class", str(args.m_per_class), "--manual_seed", str(job.seed), "--threads", str(args.threads),
             "--max-eval-batches", str(args.max_eval_batches), "--checkpoint-dir", args.out, "--run-name", job.name,
             "--no-progress", "--resume"]
            + PRECISIONS[job.precision] + METHODS[job.method] + list(extra))


def run_job(job: Job, command: List[str], out: str) -> int:
    """Run one job, its console output in OUT/NAME.out; returns its exit code."""
    tic = time.time()
    with open(os.path.join(out, job.name + ".out"), "a") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    status = "done" if code == 0 else f"FAILED (exit {code}, see {os.path.join(out, job.name + '.out')})"
    print(f"{job.name}: {status} in {time.time() - tic:.0f} s", flush=True)
    return code


def study_table(out: str) -> str:
    """The study's markdown: one table per metric, over the run directories under ``out``."""
    groups = group_runs(load_runs([out]))
    return "\n".join(markdown_report(groups, metric) for metric in METRICS)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = parse_flags(build_parser(), argv, {"threads": AT_LEAST_1})  # every job gets its own threads
    jobs = plan_jobs(args.fast_seeds, args.fp32_seeds)
    if not jobs:
        raise UserError("no seeds given: pass --fast-seeds and/or --fp32-seeds")
    commands = [job_command(job, args, extra) for job in jobs]
    if args.dry_run:
        print("\n".join(shlex.join(c) for c in commands))
        return 0
    os.makedirs(args.out, exist_ok=True)
    print(f"{len(jobs)} runs, {args.jobs} at a time, {args.threads} thread(s) each; logs in {args.out}/", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        codes = list(pool.map(lambda jc: run_job(jc[0], jc[1], args.out), zip(jobs, commands)))
    table = study_table(args.out)
    path = os.path.join(args.out, "study.md")
    with open(path, "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {path}")
    failed = [job.name for job, code in zip(jobs, codes) if code != 0]
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
