#!/usr/bin/env python
"""The checks of ``bash scripts/gpu_check.sh``: the CUDA and NCCL paths of the project, on one GPU, in minutes.

    bash scripts/gpu_check.sh              # installs the project (pip install -e ".[test]"), then this
    python scripts/gpu_check.py --quick    # the same without the install, smallest settings

Prints one line per check, ``PASS|FAIL|SKIP <name>: <reason>``, as the checks finish, then
``N passed, M failed``; exits 1 when a check failed. Progress and the work directory go to
stderr; every check's output is in ``<work dir>/logs/<check>.log``.

Checks: the test suite's CUDA tests (``pytest -m cuda``); each of the four scripts for a few
steps with ``--fast --compile`` and with ``--amp fp16 --channels-last --deterministic``; a
one-rank NCCL group running main_cifar.py's training (DDP, --sync-bn, --compile) and the
collectives of utils/distributed.py; two processes sharing the GPU over gloo (main_cifar.py
--sync-bn equal across ranks and to one process on the whole batch, main_imagenet.py's memory
banks and main_moco_mcl.py's queues and shuffled BatchNorm equal across ranks); a SIGTERM stop
and resume bitwise equal to an uninterrupted --deterministic run; the host synchronisations
of a fast-path step (torch.cuda.set_sync_debug_mode; reported, a failure only when clearly
broken); and scripts/benchmark.py on CUDA for resnet32 x2, x4 and wrn_16_2 x2, one JSON line
each, run last and alone so that the other checks do not disturb the timings.

Without a GPU it is a dry run: the checks that need CUDA are SKIPped with the reason and the
rest run on the CPU (with --compile through torch.compile's eager backend: inductor builds
C++ for minutes on a small CPU), so the script itself is tested (tests/scripts/test_gpu_check.py).
A time budget (``--budget``, counted from ``--started-at``) keeps the whole command under its
limit: checks not started by then are SKIPped, saying so. The checks that run a group of
processes start scripts/gpu_check_workers.py, which reports back in one ``RESULT`` line.
"""
import argparse
import collections
import concurrent.futures
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

STATUSES = ("PASS", "FAIL", "SKIP")
LINE = re.compile(r"^(PASS|FAIL|SKIP) (\S.*?): (.+)$")  # what every check line looks like
MCL = ["--alpha", "0.1", "--gamma", "1.", "--beta", "0.1", "--lam", "1."]
MAX_SYNCS_PER_STEP = 20  # more than the original's per-step .item() calls: clearly broken
BENCHMARKS = (("resnet32", 2), ("resnet32", 4), ("wrn_16_2", 2))
GRACE_S = 50  # a check running at the deadline gets this long to finish
WORKERS_SCRIPT = os.path.join(ROOT, "scripts", "gpu_check_workers.py")  # the checks' subprocesses


@dataclass
class Result:
    status: str
    reason: str


@dataclass
class Check:
    """One line of the output. ``cuda_only`` is the SKIP reason without a GPU; ``alone`` checks run
    after all others, one at a time (timings); ``in_quick`` is False for those --quick leaves out."""

    name: str
    run: Callable[["Context"], Result]
    cuda_only: str = ""
    alone: bool = False
    in_quick: bool = True


@dataclass
class Context:
    """Where and how the checks run."""

    device: str  # "cuda" or "cpu"
    work: str
    quick: bool
    deadline: float
    python: str = sys.executable
    env: Dict[str, str] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    def run(self, log_name: str, cmd: Sequence[str], timeout: float = 300, env: Optional[Dict[str, str]] = None,
            ) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the repository; its output goes to logs/<log_name>.log (appended) and is returned.
        The timeout is cut to the time left before the deadline (plus GRACE_S)."""
        left = self.deadline + GRACE_S - time.monotonic()
        timeout = max(10.0, min(timeout, left))
        full_env = {**os.environ, **self.env, **(env or {})}
        try:
            out = subprocess.run(list(cmd), cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            text = (_text(err.stdout) + _text(err.stderr))
            self._log(log_name, cmd, text + f"\n[timed out after {timeout:.0f} s]\n")
            raise CheckTimeout(f"timed out after {timeout:.0f} s ({' '.join(cmd[1:3])} ...)") from None
        self._log(log_name, cmd, out.stdout + out.stderr + f"\n[exit code {out.returncode}]\n")
        return out

    def _log(self, name: str, cmd: Sequence[str], text: str) -> None:
        with open(self.path("logs", f"{slug(name)}.log"), "a") as f:
            f.write("$ " + " ".join(cmd) + "\n" + text + "\n")


class CheckTimeout(Exception):
    pass


class CheckFailed(Exception):
    pass


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def last_error_line(out: subprocess.CompletedProcess) -> str:
    """The line that says what went wrong: the last 'error'/'Error' line of stderr, else its last line."""
    lines = [line.strip() for line in (out.stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    text = (errors or lines or ["(no output)"])[-1]
    return text[:300]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ============================================================================ data and flags

def write_image_folder(root: str) -> str:
    """train/ and val/ of 3 classes (8 and 2 JPEG files of 40x40 each) for the ImageNet-style scripts."""
    import numpy as np
    from PIL import Image

    if os.path.isdir(os.path.join(root, "val")):
        return root
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for c in range(3):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = (rng.random((40, 40, 3)) * 90 + 70 * c).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"img{i}.JPEG"), quality=90)
    return root


def cifar_flags(ctx: Context) -> List[str]:
    """MCL x2 on synthetic CIFAR-shaped data: the paper's batch and network on a GPU, tiny on a CPU."""
    if ctx.cuda:
        size = ["--synthetic-size", "1280", "--synthetic-classes", "100", "--synthetic-test-size", "256",
                "--batch-size", "128", "--eval-batch-size", "256", "--arch", "resnet32"]
    else:
        size = ["--synthetic-size", "64", "--synthetic-classes", "4", "--synthetic-test-size", "16",
                "--batch-size", "8", "--eval-batch-size", "16", "--arch", "wrn_16_2"]
    return ["--dataset", "synthetic", *size, "--m-per-class", "2", "--number-net", "2", *MCL, "--epochs", "2",
            "--max-train-batches", "3", "--max-eval-batches", "1", "--num-workers", "0", "--no-progress",
            "--save-every-steps", "0", "--device", ctx.device]


def script_flags(script: str, ctx: Context, run_dir: str) -> List[str]:
    """The flags of a few steps of ``script`` writing to ``run_dir``."""
    parent, name = os.path.dirname(run_dir), os.path.basename(run_dir)
    if script == "main_cifar":
        return cifar_flags(ctx) + ["--checkpoint-dir", parent, "--run-name", name]
    images = ctx.path("images")
    device = ["--device", ctx.device]
    if script == "main_imagenet":
        return ["--data", images, "--image-size", "32", "--arch", "resnet18", "--number-net", "2", *MCL,
                "--neg_k", "8", "--batch-size", "6", "--epochs", "1", "--max-train-batches", "2",
                "--max-eval-batches", "1", "--num-workers", "0", "--no-progress", "--save-every-steps", "0",
                *device, "--checkpoint-dir", parent, "--run-name", name]
    common = ["-a", "resnet18", "-b", "8", "--image-size", "32", "-j", "0", "-p", "1", "--data", images,
              "--epochs", "1", "--max-train-batches", "2", "--no-progress", *device, "--checkpoint", parent,
              "--run-name", name]
    if script == "main_moco_mcl":
        return common + ["--moco-k", "16", "--number-net", "2", "--seed", "0"]
    return common  # main_lincls: a random backbone (no --pretrained): the steps are the same


def check_run_dir(run_dir: str) -> str:
    """CheckFailed unless ``run_dir`` holds a finished checkpoint with the plain module's keys and finite
    losses; returns a few words on what it holds."""
    import torch
    from utils.checkpoint import load_checkpoint

    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pth.tar"))
    if not ckpt.get("finished"):
        raise CheckFailed(f"{run_dir}/checkpoint.pth.tar is not finished")
    bad = [k for k in ckpt["model"] if k.startswith(("_orig_mod.", "module."))]
    if bad:
        raise CheckFailed(f"checkpoint keys of a wrapped module: {bad[0]}")
    for key, value in ckpt["model"].items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckFailed(f"non-finite {key} in the checkpoint")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    loss = records[-1]["train"]["loss"] if records else float("nan")
    if not math.isfinite(loss):
        raise CheckFailed(f"training loss {loss} in metrics.jsonl")
    return f"{len(records)} epoch(s), last training loss {loss:.3f}"


# ============================================================================ the checks

def check_cuda_tests(ctx: Context) -> Result:
    out = ctx.run("cuda tests", [ctx.python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                  timeout=300)
    summary = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
    if out.returncode != 0:
        return Result("FAIL", f"pytest -m cuda: {summary}")
    return Result("PASS", f"pytest -m cuda tests: {summary}")


def script_check(script: str, flags: List[str], cpu_flags: List[str], cpu_note: str) -> Check:
    """``script`` for a few steps with ``flags`` (``cpu_flags`` in the CPU dry run)."""

    def run(ctx: Context) -> Result:
        used = flags if ctx.cuda else cpu_flags
        run_dir = ctx.path("runs", slug(f"{script}{''.join(used)}"))
        env = {} if ctx.cuda or "--compile" not in used else {"MCL_COMPILE_BACKEND": "eager"}
        tic = time.monotonic()
        out = ctx.run(f"{script} {' '.join(flags)}", [ctx.python, f"{script}.py", *script_flags(script, ctx, run_dir),
                                                       *used], timeout=360, env=env)
        if out.returncode != 0:
            return Result("FAIL", f"exit code {out.returncode}: {last_error_line(out)}")
        words = check_run_dir(run_dir)
        note = "" if ctx.cuda else f"; CPU dry run: {' '.join(used)}{cpu_note}"
        return Result("PASS", f"{words}, {time.monotonic() - tic:.0f} s{note}")

    return Check(f"{script} {' '.join(flags)}", run)


def script_checks() -> List[Check]:
    """Each script with --fast --compile and with --amp fp16 --channels-last --deterministic. On CPU,
    --fast's bfloat16 is left out (slow on CPUs without bf16 units) and so is fp16 (CUDA only)."""
    fast = ["--fast", "--compile"]
    exact = ["--amp", "fp16", "--channels-last", "--deterministic"]
    checks = []
    for script in ("main_cifar", "main_imagenet", "main_moco_mcl", "main_lincls"):
        checks.append(script_check(script, fast, ["--channels-last", "--compile"],
                                   " (torch.compile's eager backend; no bf16)"))
        checks.append(script_check(script, exact, ["--channels-last", "--deterministic"], " (fp16 needs CUDA)"))
    for check in checks[1:]:
        check.in_quick = False  # --quick: main_cifar --fast --compile only
    return checks


def check_nccl(ctx: Context) -> Result:
    out = ctx.run("nccl one rank", [ctx.python, WORKERS_SCRIPT, "nccl", "--work-dir", ctx.work,
                                    "--port", str(free_port())], timeout=420)
    return worker_result(out)


def worker_result(out: subprocess.CompletedProcess) -> Result:
    """The RESULT line a worker printed, else a FAIL with its error."""
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("RESULT "):
            found = json.loads(line[len("RESULT "):])
            return Result(found["status"], found["reason"])
    return Result("FAIL", f"exit code {out.returncode}: {last_error_line(out)}")


def two_process_check(script: str, cuda_flags: List[str], cpu_flags: List[str], compare_one_process: bool,
                      in_quick: bool = True) -> Check:
    """``script`` in two processes of one gloo group on the same device; its state must be equal across ranks
    (and, with ``compare_one_process`` on CUDA, close to one process on the whole batch)."""

    def run(ctx: Context) -> Result:
        flags = cuda_flags if ctx.cuda else cpu_flags
        run_dir = ctx.path("runs", slug(f"two_{script}"))
        argv = script_flags(script, ctx, run_dir) + flags
        port = free_port()
        outs: Dict[int, Any] = {}
        threads = []
        for rank in range(2):
            cmd = [ctx.python, WORKERS_SCRIPT, "two", "--rank", str(rank), "--port", str(port),
                   "--script", script, "--work-dir", ctx.work, "--", *argv]
            threads.append(threading.Thread(target=_run_rank, args=(outs, rank, ctx, f"two processes {script}", cmd)))
            threads[-1].start()
        for thread in threads:
            thread.join()
        failed = [o for o in outs.values() if isinstance(o, Exception)]
        if failed:
            return Result("FAIL", str(failed[0]))
        result = worker_result(outs[0])
        if result.status != "PASS" or outs[1].returncode != 0:
            return result if result.status != "PASS" else Result("FAIL", f"rank 1: {last_error_line(outs[1])}")
        if compare_one_process and ctx.cuda:
            result.reason += "; " + compare_with_one_process(ctx, script, argv, run_dir)
        elif compare_one_process:
            result.reason += "; the comparison with one process needs --sync-bn, which needs CUDA"
        if not ctx.cuda and cuda_flags != cpu_flags:
            result.reason += f"; CPU dry run: {' '.join(cpu_flags) or 'no flags'} for {' '.join(cuda_flags)}"
        return result

    label = " ".join([script, *cuda_flags])
    return Check(f"two processes on one device (gloo) {label}", run, in_quick=in_quick)


def _run_rank(outs: Dict[int, Any], rank: int, ctx: Context, name: str, cmd: List[str]) -> None:
    try:
        outs[rank] = ctx.run(f"{name} rank {rank}", cmd, timeout=420)
    except Exception as err:  # a timeout: the other rank is stuck too
        outs[rank] = err


def compare_with_one_process(ctx: Context, script: str, argv: List[str], two_dir: str) -> str:
    """Train ``script`` in one process on the same global batches; its weights must be close to rank 0's."""
    from utils.checkpoint import load_checkpoint

    one_dir = two_dir + "_one_process"
    parent, name = os.path.dirname(one_dir), os.path.basename(one_dir)
    flags = [a for a in argv if a != "--sync-bn"]
    flags[flags.index("--run-name") + 1] = name
    flags[flags.index("--checkpoint-dir") + 1] = parent
    out = ctx.run(f"two processes {script} one process", [ctx.python, f"{script}.py", *flags], timeout=300)
    if out.returncode != 0:
        raise CheckFailed(f"one process: exit code {out.returncode}: {last_error_line(out)}")
    one = load_checkpoint(os.path.join(one_dir, "checkpoint.pth.tar"))
    two = load_checkpoint(os.path.join(two_dir, "checkpoint.pth.tar"))
    worst, where = 0.0, ""
    for part in ("model", "heads"):
        for key, a in (one[part] or {}).items():
            b = two[part][key]
            if a.is_floating_point():
                diff = float((a - b).abs().max() / (a.abs().max() + 1e-6))
                if diff > worst:
                    worst, where = diff, f"{part}.{key}"
    if worst > 1e-3:
        raise CheckFailed(f"two processes with --sync-bn differ from one process: relative {worst:.2g} in {where}")
    return f"as one process on the whole batch (largest relative difference {worst:.1g}, in {where or '-'})"


def check_stop_resume(ctx: Context) -> Result:
    """An uninterrupted --deterministic run; one stopped by SIGTERM after step 2, then resumed: equal bitwise."""
    import torch
    from utils.checkpoint import load_checkpoint

    base = cifar_flags(ctx) + ["--deterministic", "--data-path", "tensor"]
    runs = ctx.path("runs", "stop_resume")

    def train(name: str, *extra: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        flags = base + ["--checkpoint-dir", runs, "--run-name", name, *extra]
        return ctx.run(f"stop and resume {name}", [ctx.python, "main_cifar.py", *flags], timeout=300, env=env)

    for out in (train("whole"), train("stopped", env={"MCL_DEBUG_SIGNAL_AFTER_STEPS": "2:TERM"})):
        if out.returncode != 0:
            return Result("FAIL", f"exit code {out.returncode}: {last_error_line(out)}")
    stopped = load_checkpoint(os.path.join(runs, "stopped", "checkpoint.pth.tar"))
    if (stopped["epoch"], stopped["step"], stopped["finished"]) != (0, 2, False):
        return Result("FAIL", f"SIGTERM after step 2 saved epoch {stopped['epoch']} step {stopped['step']}")
    out = train("stopped", "--resume")
    if out.returncode != 0:
        return Result("FAIL", f"resume: exit code {out.returncode}: {last_error_line(out)}")
    whole, resumed = (flat_tensors({p: ckpt[p] for p in ("model", "heads", "optimizer")}) for ckpt in (
        load_checkpoint(os.path.join(runs, name, "checkpoint.pth.tar")) for name in ("whole", "stopped")))
    differ = [k for k in whole if k not in resumed or not torch.equal(whole[k], resumed[k])]
    if differ:
        return Result("FAIL", f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[0]}")
    return Result("PASS", "stopped after step 2 of 6, resumed: weights, heads and optimizer bitwise equal to the "
                          f"uninterrupted run ({ctx.device}, --deterministic)")


def flat_tensors(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """{dotted key: tensor} of every tensor in nested dicts and lists."""
    import torch

    out: Dict[str, Any] = {}
    if torch.is_tensor(tree):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flat_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flat_tensors(v, f"{prefix}[{i}]"))
    return out


def check_syncs(ctx: Context) -> Result:
    out = ctx.run("host synchronisations", [ctx.python, WORKERS_SCRIPT, "syncs", "--work-dir", ctx.work],
                  timeout=300)
    return worker_result(out)


def warm_compile_cache(ctx: Context, arch: str, number_net: int) -> None:
    """Compile benchmark.py's fast_compile step once (not timed, not a check line) while the other checks
    run, so that the timed benchmark, run alone later, finds its kernels in inductor's cache."""
    ctx.run(f"benchmark {arch} x{number_net} compile warm-up", [
        ctx.python, "scripts/benchmark.py", "--device", "cuda", "--arch", arch, "--number-net", str(number_net),
        "--modes", "fast_compile", "--steps", "1", "--warmup", "1", "--repeats", "1"], timeout=300)


def benchmark_check(arch: str, number_net: int, in_quick: bool) -> Check:
    def run(ctx: Context) -> Result:
        if ctx.cuda:
            flags = ["--device", "cuda", "--steps", "20", "--warmup", "3", "--repeats", "3"]
            env: Dict[str, str] = {}
        else:
            flags = ["--device", "cpu", "--steps", "1", "--warmup", "1", "--repeats", "1", "--batch-size", "8",
                     "--synthetic-size", "64", "--synthetic-classes", "4", "--threads", "1",
                     "--modes", "reference,fast,fast_compile"]
            env = {"MCL_COMPILE_BACKEND": "eager"}
        out = ctx.run(f"benchmark {arch} x{number_net}", [ctx.python, "scripts/benchmark.py", "--arch", arch,
                                                           "--number-net", str(number_net), *flags], timeout=400,
                      env=env)
        if out.returncode != 0:
            return Result("FAIL", f"exit code {out.returncode}: {last_error_line(out)}")
        lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        return Result("PASS", json.dumps(benchmark_line(lines, ctx)))

    return Check(f"benchmark {arch} x{number_net}", run, alone=True, in_quick=in_quick)


def benchmark_line(lines: List[Dict[str, Any]], ctx: Context) -> Dict[str, Any]:
    """One JSON object from benchmark.py's lines: images/s and peak memory per mode, the ratios."""
    modes = {line["mode"]: line for line in lines if "mode" in line and not line.get("profile")}
    summary = next(line for line in lines if line.get("summary"))
    out = {"arch": summary["arch"], "number_net": summary["number_net"], "topology": summary["topology"],
           "device": summary.get("gpu", summary["device"]), "batch_size": summary["batch_size"],
           "images_per_s": {m: round(v["images_per_s"], 1) for m, v in modes.items()},
           "peak_memory_mb": {m: v["peak_memory_mb"] for m, v in modes.items()},
           "data_s_per_step": {m: round(v["data_s_per_step"], 4) for m, v in modes.items()},
           "reference_num_workers": summary.get("reference_num_workers")}
    out.update({k: round(v, 3) for k, v in summary.items() if k.startswith("ratio_fast")})
    if not ctx.cuda:
        out["note"] = "CPU dry run, tiny settings: not a speed figure"
    return out


def all_checks() -> List[Check]:
    no_cuda = "needs CUDA (no GPU here: CPU dry run)"
    checks = [Check("test suite on CUDA", check_cuda_tests, cuda_only=no_cuda)]
    checks += script_checks()
    checks.append(Check("one-rank NCCL group, DDP, main_cifar --sync-bn --compile", check_nccl,
                        cuda_only="NCCL needs CUDA"))
    checks.append(two_process_check("main_cifar", ["--sync-bn", "--data-path", "tensor"], ["--data-path", "tensor"],
                                    compare_one_process=True, in_quick=False))
    checks.append(two_process_check("main_imagenet", [], [], compare_one_process=False, in_quick=False))
    checks.append(two_process_check("main_moco_mcl", ["--compile"], [], compare_one_process=False))
    checks.append(Check("SIGTERM stop and resume bitwise equal", check_stop_resume))
    checks.append(Check("host synchronisations per fast-path step", check_syncs, cuda_only=no_cuda))
    checks += [benchmark_check(arch, n, in_quick=(arch, n) == BENCHMARKS[0]) for arch, n in BENCHMARKS]
    return checks


# ============================================================================ running them

def run_check(check: Check, ctx: Context) -> Result:
    if check.cuda_only and not ctx.cuda:
        return Result("SKIP", check.cuda_only)
    if ctx.quick and not check.in_quick:
        return Result("SKIP", "left out by --quick")
    if time.monotonic() > ctx.deadline:
        return Result("SKIP", "not started: the time budget (--budget) was used up")
    try:
        return check.run(ctx)
    except (CheckFailed, CheckTimeout) as err:
        return Result("FAIL", str(err))
    except Exception as err:  # a bug of the check itself: still one line
        with open(ctx.path("logs", f"{slug(check.name)}.log"), "a") as f:
            f.write(traceback.format_exc())
        return Result("FAIL", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300])


def report(check: Check, result: Result, lock: threading.Lock, results: List[Result]) -> None:
    reason = " ".join(result.reason.split())  # one line
    with lock:
        results.append(result)
        print(f"{result.status} {check.name}: {reason}", flush=True)


def run_all(checks: List[Check], ctx: Context, jobs: int) -> List[Result]:
    """The checks that may share the machine, ``jobs`` at a time (with the benchmarks' compile warm-ups on
    CUDA), then the ``alone`` ones one by one; each line is printed when its check ends."""
    lock, results = threading.Lock(), []  # type: ignore[var-annotated]
    first = [c for c in checks if not c.alone]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        if ctx.cuda:
            for arch, number_net in BENCHMARKS[:1] if ctx.quick else BENCHMARKS:
                if any(c.name == f"benchmark {arch} x{number_net}" for c in checks):
                    pool.submit(_quietly, warm_compile_cache, ctx, arch, number_net)
        futures = {pool.submit(run_check, c, ctx): c for c in first}
        for future in concurrent.futures.as_completed(futures):
            report(futures[future], future.result(), lock, results)
    for check in (c for c in checks if c.alone):
        report(check, run_check(check, ctx), lock, results)
    return results


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    """A preparation whose failure shows in the check that needs it (its log says why)."""
    try:
        fn(*args)
    except Exception:
        pass


def detect_device(requested: str) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device here")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"),
                   help="auto: CUDA when there is a GPU, else the CPU dry run")
    p.add_argument("--quick", action="store_true",
                   help="one variant per script, two-process check of MoCo only, one benchmark (the CPU test's "
                        "settings)")
    p.add_argument("--jobs", type=int, default=0, help="checks run at the same time (0: 6 on CUDA, 2 on CPU)")
    p.add_argument("--only", default="", help="run only the checks whose name contains this text")
    p.add_argument("--budget", type=float, default=400.0,
                   help="seconds from the start (of gpu_check.sh, the install included) after which no further "
                        "check starts; a running one is stopped 50 s later")
    p.add_argument("--started-at", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--install", default="", help=argparse.SUPPRESS)  # the install's check line, from the .sh
    p.add_argument("--work-dir", default="", help="where runs and logs go (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (by default only the logs stay)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    started = args.started_at if args.started_at is not None else time.time()
    deadline = time.monotonic() + args.budget - (time.time() - started)
    work = args.work_dir or tempfile.mkdtemp(prefix="mcl_gpu_check_")
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    os.makedirs(os.path.join(work, "runs"), exist_ok=True)
    device = detect_device(args.device)
    import torch

    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU dry run (CUDA checks SKIP)"
    print(f"gpu_check: {where}; torch {torch.__version__}; work directory {work}", file=sys.stderr, flush=True)
    env = {"PYTHONUNBUFFERED": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    ctx = Context(device=device, work=work, quick=args.quick, deadline=deadline, env=env)
    write_image_folder(ctx.path("images"))
    checks = [c for c in all_checks() if args.only in c.name]
    results: List[Result] = []
    if args.install:
        status, _, reason = args.install.partition(" ")
        results.append(Result(status, reason))
        print(args.install, flush=True)
    jobs = args.jobs or (6 if ctx.cuda else 2)
    results += run_all(checks, ctx, jobs)
    if not args.keep:
        for dirpath, _, files in os.walk(ctx.path("runs")):
            for name in files:
                if name.endswith(".pth.tar"):
                    os.remove(os.path.join(dirpath, name))
    counts = collections.Counter(r.status for r in results)
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
