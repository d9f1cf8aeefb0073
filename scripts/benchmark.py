#!/usr/bin/env python
"""Steady-state training speed: the original's way against the project's fast path.

    python scripts/benchmark.py --arch resnet32 --number-net 2

All modes train the same cohort with the same MCL objective (the paper's weights by
default) inside ONE process, interleaved (reference, fast, reference, fast, ...) after
a warm-up, so all see the same machine load; figures are medians over the repeats.

- ``reference``: the original's execution. float32, NCHW, torchvision's PIL transforms
  (RandomCrop(32, padding=4), flip, ToTensor, Normalize) per image through a DataLoader
  with the m-per-class sampler flattened into indices (on CPU ``--num-workers`` 0, what the
  original's loader ran with: its flag never reached it), networks one after another, projection heads and losses.mcl.sup_mcl_losses,
  SGD Nesterov, and the original's per-step ``.item()`` logging and accuracy counts.
- ``fast``: exactly what ``main_cifar.py --fast`` runs: the same builders as
  main_cifar.py (data.pipeline with the tensor path, CohortWithHeads in channels_last,
  build_sgd, InBatchContrast) and the run loop's own ``RunLoop.train_step`` under
  ``Precision("bf16", channels_last=True)``. No re-implementation, so a change to the
  engine changes this number.
- ``fast_compile``: ``main_cifar.py --fast --compile``, the same with the step's module and
  the MCL losses through torch.compile (utils/step_module.py); its warm-up steps compile.

Default modes: reference and fast on CPU; all three with ``--device cuda``, where the
reference's PIL path gets the original's DataLoader workers (8, the default of the
original's ``--num-workers``, which main_cifar.py passes to its loader; at most the
machine's cores) so that its decoding overlaps the GPU, and pinned memory. Every timed block ends with
``torch.cuda.synchronize``, so the GPU's queued work is inside the time. With workers,
the loader prefetches (2 batches per worker) while the other modes run: a reference round
shorter than that prefetch hides a data-bound reference (``data_s_per_step`` shows the wait).

Output: one JSON line per mode, then one line with the ratios (fast/reference and, with
fast_compile, fast_compile/reference and fast_compile/fast), the reference's workers, the
command, the hardware and the versions. ``peak_memory_mb`` is CUDA's max allocated
memory of that mode on a GPU; on CPU it is the process's maximum resident set size
(resource.getrusage), which is shared by the modes of the one process (an upper bound
for each, not a per-mode figure).

``--convolutions`` then profiles each mode (torch.profiler) and prints, per mode, the
milliseconds per step spent in convolutions (forward and backward) and their fraction of
the step; the summary adds the convolution speed-up and the ratio the fast path would reach
if everything but its convolutions cost nothing.

Data: a synthetic CIFAR-shaped set (100 classes, ``--synthetic-size`` images) by
default, so nothing is downloaded; ``--dataset cifar100 --data DIR`` uses the real one.
"""
import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

import models  # noqa: E402
from data.augment import reference_cifar_transforms  # noqa: E402
from data.pipeline import ArrayData, build_cifar_loaders, load_arrays  # noqa: E402
from data.samplers import MPerClassBatchSampler  # noqa: E402
from losses.mcl import build_projection_heads, sup_mcl_losses  # noqa: E402
from utils.args import HelpFormatter, parse_flags
from utils import distributed as du  # noqa: E402
from utils.contrast import InBatchContrast  # noqa: E402
from utils.loop import LoopConfig, RunLoop  # noqa: E402
from utils.precision import Precision  # noqa: E402
from utils.supervised import CohortWithHeads, Objective, SupervisedMethod  # noqa: E402
from utils.run_files import RunLogger  # noqa: E402
from utils.metrics import topk_correct  # noqa: E402
from utils.script_setup import build_sgd, configure_determinism  # noqa: E402
from utils.step_module import compiled_function, step_module  # noqa: E402

MODES = ("reference", "fast", "fast_compile")
DEFAULT_MODES = {"cpu": "reference,fast", "cuda": "reference,fast,fast_compile"}
ORIGINAL_WORKERS = 8  # the original main_cifar.py's --num-workers default
Step = Callable[[], float]  # runs one training step, returns the seconds spent waiting for data


def add_cohort_args(p: argparse.ArgumentParser, arch_help: str = "architecture") -> None:
    """The cohort, batch and MCL weights timed (the paper's MCL x2 command by default)."""
    p.add_argument("--arch", default="resnet32", help=arch_help)
    p.add_argument("--number-net", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lam", type=float, default=1.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_cohort_args(p)
    p.add_argument("--cohort", default="auto", help="auto | independent | branched (auto: the original's choice)")
    p.add_argument("--m-per-class", type=int, default=2)
    p.add_argument("--tau", type=float, default=0.1)
    p.add_argument("--kd_T", type=float, default=3.0)
    p.add_argument("--feat-dim", type=int, default=128)
    p.add_argument("--init-lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat and mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the figures are medians over them")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--modes", default=None,
                   help="comma-separated subset of: " + ", ".join(MODES) + " (default: reference,fast on CPU, "
                        "all three on CUDA)")
    p.add_argument("--dataset", default="synthetic", choices=("synthetic", "cifar100", "cifar10"))
    p.add_argument("--data", default="./data/", help="CIFAR directory for --dataset cifar100/cifar10")
    p.add_argument("--synthetic-size", type=int, default=5000)
    p.add_argument("--synthetic-classes", type=int, default=100)
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers of the reference's PIL path (default: 0 on CPU, where the workers "
                        "would take the cores the step uses; on CUDA the original's 8, at most the cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--convolutions", action="store_true",
                   help="after the timing, profile --steps steps of each mode and print the time spent in "
                        "convolutions (forward + backward): how far bf16 can take a step on this machine")
    return p


# ---------------------------------------------------------------- the original's way


class PILTrainSet(torch.utils.data.Dataset):
    """(image (3, 32, 32) float32, label) through the original's PIL Compose, like torchvision's CIFAR."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class FlatSampler(torch.utils.data.Sampler):
    """The m-per-class batches as one stream of indices, as the original passed ``sampler=``."""

    def __init__(self, batches: MPerClassBatchSampler) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[int]:
        for indices in self.batches:
            yield from indices

    def __len__(self) -> int:
        return len(self.batches) * self.batches.batch_size


def endless(loader: Any, set_epoch: Callable[[int], None]) -> Iterator[Any]:
    """Batches of epoch 0, 1, 2, ... without end."""
    epoch = 0
    while True:
        set_epoch(epoch)
        yield from loader
        epoch += 1


def reference_step_fn(args: argparse.Namespace, data: ArrayData, device: torch.device) -> Step:
    """One step of the original's training loop (float32, NCHW, PIL data, per-step .item())."""
    torch.manual_seed(args.seed)
    cohort = models.build_cohort(args.arch, args.number_net, data.num_classes, args.cohort).to(device)
    heads = build_projection_heads(cohort.feature_dims, args.feat_dim).to(device)
    params = list(cohort.parameters()) + list(heads.parameters())
    optimizer = torch.optim.SGD(params, lr=args.init_lr, momentum=0.9, weight_decay=args.weight_decay,
                                nesterov=True)
    batches = MPerClassBatchSampler(data.train_labels, args.m_per_class, args.batch_size, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        PILTrainSet(data.train_images, data.train_labels, reference_cifar_transforms(data.mean, data.std)),
        batch_size=args.batch_size, sampler=FlatSampler(batches), num_workers=args.num_workers,
        pin_memory=device.type == "cuda")
    stream = endless(loader, batches.set_epoch)
    cohort.train()
    heads.train()
    counts = {"top1": [0] * args.number_net, "top5": [0] * args.number_net}

    def step() -> float:
        tic = time.perf_counter()
        inputs, targets = next(stream)
        inputs, targets = inputs.float().to(device), targets.to(device)
        data_s = time.perf_counter() - tic
        optimizer.zero_grad()
        logits, features = cohort(inputs)
        embeddings = [head(f) for head, f in zip(heads, features)]
        loss_cls = sum(F.cross_entropy(z, targets) for z in logits)
        vcl, soft_vcl, icl, soft_icl = sup_mcl_losses(embeddings, targets, args.tau, args.kd_T)
        loss = loss_cls + args.alpha * vcl + args.gamma * soft_vcl + args.beta * icl + args.lam * soft_icl
        loss.backward()
        optimizer.step()
        for term in (loss, loss_cls, vcl, soft_vcl, icl, soft_icl):  # the original logs every term
            term.item()
        for i, z in enumerate(logits):
            top1, top5 = topk_correct(z.detach(), targets)
            counts["top1"][i] += top1
            counts["top5"][i] += top5
        return data_s

    return step


# ---------------------------------------------------------------- the fast path


def fast_step_fn(args: argparse.Namespace, data: ArrayData, ctx: du.DistContext, compile: bool = False) -> Step:
    """One step of ``main_cifar.py --fast`` (``--fast --compile``), built with main_cifar.py's own builders."""
    device = ctx.device
    torch.manual_seed(args.seed)
    cohort = models.build_cohort(args.arch, args.number_net, data.num_classes, args.cohort)
    objective = Objective.from_flags(args)
    heads = build_projection_heads(cohort.feature_dims, args.feat_dim) if objective.uses_contrast else None
    model = CohortWithHeads(cohort, heads).to(device).to(memory_format=torch.channels_last)
    optimizer = build_sgd(model.parameters(), args.init_lr, args.weight_decay)
    train_data, test_data = build_cifar_loaders(
        data, path="tensor", batch_size=args.batch_size, eval_batch_size=2 * args.batch_size,
        m_per_class=args.m_per_class, visit_all=False, seed=args.seed, rank=0, world_size=1, device=device,
        num_workers=0, channels_last=True)
    precision = Precision("bf16", channels_last=True)
    contrast = InBatchContrast(args.tau, args.kd_T)
    contrast.losses = compiled_function(contrast.losses, compile)
    step_model = step_module(model, ctx, compile=compile)
    method = SupervisedMethod(model, step_model, objective, contrast, test_data, device, precision)
    config = LoopConfig(epochs=1, init_lr=args.init_lr, lr_type="cosine", milestones=(), progress=False)
    trainer = RunLoop(method, optimizer, train_data, ctx, config, precision, RunLogger("", enabled=False), "", {})
    model.train()
    stream = endless(train_data, train_data.set_epoch)

    def step() -> float:
        tic = time.perf_counter()
        raw = next(stream)
        data_s = time.perf_counter() - tic
        trainer.train_step(raw)
        return data_s

    return step


# ---------------------------------------------------------------- where the time goes


def convolution_share(step: Step, steps: int, device: torch.device) -> Dict[str, float]:
    """Profile ``steps`` training steps: milliseconds per step in all, and in convolution kernels.

    Convolution time is the self time of every profiled op whose name contains
    "convolution" (forward and backward), on the CPU or, on CUDA, on the device.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    tic = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    wall = time.perf_counter() - tic
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    conv_us = sum(getattr(e, attribute) for e in prof.key_averages() if "convolution" in e.key)
    step_ms, conv_ms = 1000 * wall / steps, conv_us / 1000 / steps
    return {"profiled_ms_per_step": step_ms, "convolution_ms_per_step": conv_ms,
            "convolution_fraction": conv_ms / step_ms}


# ---------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Step, steps: int, device: torch.device) -> Tuple[float, float]:
    """(wall seconds, seconds waiting for data) of ``steps`` steps, device work included."""
    synchronize(device)
    tic = time.perf_counter()
    data_s = 0.0
    for _ in range(steps):
        data_s += step()
    synchronize(device)
    return time.perf_counter() - tic, data_s


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_interleaved(steps_by_mode: Dict[str, Step], args: argparse.Namespace,
                    device: torch.device) -> Dict[str, Dict[str, Any]]:
    """Warm up every mode, then time them in turn ``repeats`` times; medians per mode."""
    for step in steps_by_mode.values():
        time_steps(step, args.warmup, device)
    rounds: Dict[str, List[Tuple[float, float]]] = {mode: [] for mode in steps_by_mode}
    memory = {mode: 0.0 for mode in steps_by_mode}
    for _ in range(args.repeats):
        for mode, step in steps_by_mode.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rounds[mode].append(time_steps(step, args.steps, device))
            memory[mode] = max(memory[mode], peak_memory_mb(device))
    results = {}
    for mode, timings in rounds.items():
        per_round = [args.batch_size * args.steps / wall for wall, _ in timings]
        results[mode] = {
            "images_per_s": statistics.median(per_round),
            "images_per_s_rounds": [round(v, 2) for v in per_round],
            "images_per_s_best": max(per_round),
            "s_per_step": statistics.median(wall / args.steps for wall, _ in timings),
            "data_s_per_step": statistics.median(d / args.steps for _, d in timings),
            "peak_memory_mb": round(memory[mode], 1),
        }
    return results


# ---------------------------------------------------------------- reporting


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    """The instruction-set extensions that decide bf16 speed (AVX-512 BF16, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                    return [flag for flag in line.split(":", 1)[1].split() if flag in wanted]
    except OSError:
        pass
    return []


def environment(device: torch.device, argv: List[str]) -> Dict[str, Any]:
    env = {
        "command": shlex.join(["python", "scripts/benchmark.py"] + argv),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "load_avg_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def ratios(results: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """fast / reference (median, paired median, best over best) and, with fast_compile, its ratios."""
    out: Dict[str, float] = {}
    if "reference" in results and "fast" in results:
        fast, ref = results["fast"], results["reference"]
        out["ratio_fast_over_reference"] = fast["images_per_s"] / ref["images_per_s"]
        # Each fast round against the reference round just before it: robust to slow load drifts.
        out["ratio_paired_median"] = statistics.median(
            f / r for f, r in zip(fast["images_per_s_rounds"], ref["images_per_s_rounds"]))
        out["ratio_best_over_best"] = fast["images_per_s_best"] / ref["images_per_s_best"]
    for base in ("reference", "fast"):
        if "fast_compile" in results and base in results:
            out[f"ratio_fast_compile_over_{base}"] = (results["fast_compile"]["images_per_s"]
                                                      / results[base]["images_per_s"])
    return out


def parse_modes(text: Optional[str], device: torch.device) -> List[str]:
    text = text or DEFAULT_MODES[device.type]
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"error: --modes takes a comma-separated subset of {', '.join(MODES)}; got {text!r}")
    return modes


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_flags(build_parser(), argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = du.setup_distributed(device=args.device)
    device = ctx.device
    modes = parse_modes(args.modes, device)
    if args.num_workers is None:
        args.num_workers = min(ORIGINAL_WORKERS, os.cpu_count() or 1) if device.type == "cuda" else 0
    configure_determinism(False, device)  # cudnn.benchmark on CUDA, as the original set it
    load_before = [round(v, 2) for v in os.getloadavg()]
    data = load_arrays(args.dataset, args.data, args.synthetic_size, args.synthetic_classes, args.seed)
    builders = {"reference": lambda: reference_step_fn(args, data, device),
                "fast": lambda: fast_step_fn(args, data, ctx),
                "fast_compile": lambda: fast_step_fn(args, data, ctx, compile=True)}
    steps = {mode: builders[mode]() for mode in modes}
    topology = models.build_cohort(args.arch, args.number_net, data.num_classes, args.cohort).topology
    results = run_interleaved(steps, args, device)
    common = {"arch": args.arch, "number_net": args.number_net, "topology": topology,
              "batch_size": args.batch_size, "torch": torch.__version__, "device": str(device),
              "threads": torch.get_num_threads(),
              "memory_measure": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"}
    for mode in modes:
        print(json.dumps({"mode": mode, **common, **results[mode]}), flush=True)
    summary: Dict[str, Any] = {"summary": True, **common, "steps": args.steps, "warmup": args.warmup,
                               "repeats": args.repeats, "dataset": args.dataset,
                               "reference_num_workers": args.num_workers}
    summary.update(ratios(results))
    if args.convolutions:
        shares = {mode: convolution_share(step, args.steps, device) for mode, step in steps.items()}
        for mode, share in shares.items():
            print(json.dumps({"mode": mode, "profile": True, **common, **share}), flush=True)
        if "reference" in shares and "fast" in shares:
            ref_conv, fast_conv = (shares[m]["convolution_ms_per_step"] for m in ("reference", "fast"))
            summary["convolution_ratio"] = ref_conv / fast_conv
            # The ratio if everything but the convolutions cost nothing in the fast path. The
            # profiler slows a step down, so the fast path's convolution time is its profiled
            # fraction of the timed (unprofiled) step.
            summary["ratio_bound_convolutions_only"] = results["reference"]["s_per_step"] / (
                results["fast"]["s_per_step"] * shares["fast"]["convolution_fraction"])
    summary.update(environment(device, argv), load_avg_before=load_before)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
