#!/usr/bin/env python
"""The authors' own code against this project, on this CPU: is the benchmark's reference honest?

    git clone https://github.com/winycg/MCL /tmp/MCL-original
    python scripts/benchmark_original.py --original /tmp/MCL-original

scripts/benchmark.py compares the fast path with a ``reference`` mode that re-creates the
original's way of training. This script checks that re-creation against the real thing: it runs
the original repository's ``main_cifar.py`` (the MCL ×2 command of its README by default),
unedited, in a subprocess, and times its steady-state training steps; then it times this
project's ``reference`` and ``fast`` modes (the very steps of scripts/benchmark.py) on the same
images in this process. Round after round (original, reference, fast, original, ...), medians
over the rounds.

The original needs a GPU; scripts/_original_timer.py patches from outside only what a CPU-only
machine needs (``.cuda()`` returns its object, torchvision's MD5 check accepts the synthetic
files, ``numpy.int`` exists again). Its timed window is whole iterations of its own loop:
loading and augmenting the batch (PIL, 0 workers), forward, backward, SGD, its ``.item()``
logging and its per-batch print.

Data: a synthetic CIFAR-shaped set with 100 classes (``--synthetic-size`` training images)
written in the official CIFAR-100 pickle layout to a temporary folder, for both sides.

Output: one JSON line per mode (``original``, then this project's modes), then a summary line with
the ratios to the original, the original's commit, the command, the hardware and the versions.
CPU only.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(SCRIPTS)
for path in (ROOT, SCRIPTS):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402

import benchmark  # noqa: E402  (scripts/benchmark.py: the project's modes and the reporting)
from data.cifar import write_cifar100  # noqa: E402
from data.pipeline import load_arrays  # noqa: E402
from utils import distributed as du  # noqa: E402
from utils.args import AT_LEAST_1, HelpFormatter, parse_flags  # noqa: E402
from utils.cli import run_main  # noqa: E402
from utils.errors import ConfigError, UserError  # noqa: E402

TIMER = os.path.join(SCRIPTS, "_original_timer.py")
CLASSES = 100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--original", required=True, help="a checkout of github.com/winycg/MCL")
    benchmark.add_cohort_args(p, arch_help="any CIFAR architecture both codes have (case is matched)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round and mode")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing (each original run, "
                                                         "and once per project mode)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; the figures are medians over them")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of both (default: torch's default)")
    p.add_argument("--modes", default="reference,fast",
                   help="this project's modes to time, comma-separated subset of: reference, fast; or none")
    p.add_argument("--synthetic-size", type=int, default=10000, help="training images (100 classes)")
    p.add_argument("--seed", type=int, default=0)
    return p


def check_args(args: argparse.Namespace) -> None:
    script = os.path.join(args.original, "main_cifar.py")
    if not os.path.isfile(script):
        raise ConfigError(f"--original {args.original!r} has no main_cifar.py; pass a checkout of "
                          "github.com/winycg/MCL")
    batches = args.synthetic_size // args.batch_size
    if batches < args.warmup + args.steps:
        raise ConfigError(f"--synthetic-size {args.synthetic_size} gives {batches} batches of "
                          f"{args.batch_size} per epoch; the original's run must not reach its epoch end "
                          f"within --warmup + --steps = {args.warmup + args.steps} steps")


def project_modes(text: str) -> List[str]:
    return [] if text.strip() == "none" else benchmark.parse_modes(text, torch.device("cpu"))


def original_command(args: argparse.Namespace, data_dir: str) -> List[str]:
    """The original's MCL command line (its README), on the synthetic set."""
    return ["--arch", args.arch, "--number-net", str(args.number_net), "--batch-size", str(args.batch_size),
            "--alpha", str(args.alpha), "--gamma", str(args.gamma), "--beta", str(args.beta),
            "--lam", str(args.lam), "--data", data_dir, "--manual_seed", str(args.seed)]


def time_original(args: argparse.Namespace, workdir: str, data_dir: str, round_index: int) -> float:
    """Seconds for ``args.steps`` iterations of the original's training loop, in a fresh process."""
    result = os.path.join(workdir, f"original_{round_index}.json")
    log = os.path.join(workdir, f"original_{round_index}.log")
    cmd = [sys.executable, TIMER, args.original, result, str(args.warmup), str(args.steps),
           str(args.threads or 0), "--"] + original_command(args, data_dir)
    with open(log, "w") as out:
        code = subprocess.call(cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
    if code != 0 or not os.path.isfile(result):
        with open(log) as f:
            lines = [line.strip() for line in f if line.strip()]
        raise UserError(f"the original's main_cifar.py failed (exit {code}): "
                        f"{lines[-1] if lines else 'no output'}")
    with open(result) as f:
        return float(json.load(f)["seconds"])


def original_commit(path: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    except OSError:
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


SHARED_OPTIONS = ("arch", "number_net", "batch_size", "alpha", "gamma", "beta", "lam", "steps", "warmup", "repeats",
                  "seed")


def benchmark_args(args: argparse.Namespace) -> argparse.Namespace:
    """scripts/benchmark.py's options for the same configuration (its defaults elsewhere)."""
    options = benchmark.build_parser().parse_args(["--device", "cpu"])
    for name in SHARED_OPTIONS:
        setattr(options, name, getattr(args, name))
    options.num_workers = 0  # benchmark.py's choice on a CPU: the loading in the timed process
    return options


def summarize(seconds: List[float], args: argparse.Namespace) -> Dict[str, Any]:
    per_round = [args.batch_size * args.steps / s for s in seconds]
    return {"images_per_s": statistics.median(per_round), "images_per_s_rounds": [round(v, 2) for v in per_round],
            "s_per_step": statistics.median(seconds) / args.steps}


def run(args: argparse.Namespace, argv: List[str]) -> int:
    check_args(args)
    modes = project_modes(args.modes)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = du.setup_distributed(device="cpu")
    load_before = [round(v, 2) for v in os.getloadavg()]
    data = load_arrays("synthetic", "", args.synthetic_size, CLASSES, args.seed)
    bargs = benchmark_args(args)
    builders = {"reference": lambda: benchmark.reference_step_fn(bargs, data, ctx.device),
                "fast": lambda: benchmark.fast_step_fn(bargs, data, ctx)}
    steps = {mode: builders[mode]() for mode in modes}
    for step in steps.values():
        benchmark.time_steps(step, args.warmup, ctx.device)
    seconds: Dict[str, List[float]] = {"original": [], **{mode: [] for mode in modes}}
    with tempfile.TemporaryDirectory(prefix="mcl_original_") as workdir:
        data_dir = os.path.join(workdir, "data")
        write_cifar100(data_dir, (data.train_images, data.train_labels), (data.test_images, data.test_labels))
        for r in range(args.repeats):
            seconds["original"].append(time_original(args, workdir, data_dir, r))
            for mode, step in steps.items():
                seconds[mode].append(benchmark.time_steps(step, args.steps, ctx.device)[0])
    common = {"arch": args.arch, "number_net": args.number_net, "batch_size": args.batch_size, "device": "cpu",
              "threads": torch.get_num_threads()}
    results = {mode: summarize(values, args) for mode, values in seconds.items()}
    for mode, result in results.items():
        print(json.dumps({"mode": mode, **common, **result}), flush=True)
    summary: Dict[str, Any] = {"summary": True, **common, "steps": args.steps, "warmup": args.warmup,
                               "repeats": args.repeats, "original_commit": original_commit(args.original)}
    for mode in modes:
        summary[f"ratio_{mode}_over_original"] = results[mode]["images_per_s"] / results["original"]["images_per_s"]
    env = benchmark.environment(ctx.device, argv)
    env["command"] = env["command"].replace("scripts/benchmark.py", "scripts/benchmark_original.py", 1)
    summary.update(env, load_avg_before=load_before)
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(parse_flags(build_parser(), argv, {"warmup": AT_LEAST_1}), argv)


if __name__ == "__main__":
    run_main(main)
