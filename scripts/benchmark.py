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

``--method lmcl`` times L-MCL (Yang et al., TPAMI 2023; docs/method.md §11) against MCL
instead, all three in float32 NCHW on the same pre-drawn batches (no augmentation, no data
loading: pure training compute), built from the pieces main_cifar.py ``--method lmcl``
uses:

- ``mcl``: one MCL step (the cohort, its projection heads, losses.mcl.sup_mcl_losses,
  Nesterov SGD), the paper's MCL(xN) with the same networks;
- ``lmcl``: L-MCL's normal update (networks with auxiliary branches, one projection head
  per stage, utils.lmcl_step.main_losses with the aggregator and the weight network,
  Nesterov SGD);
- ``lmcl_meta``: the meta step (utils.lmcl_step.meta_step: ``--times`` virtual steps and
  the hypergradient, the authors' recursion unless ``--exact-hypergradient``) and the
  weight network's step; ``--meta-steps`` of them per repeat.

The summary gives the cost of an L-MCL iteration, the normal update plus the meta step
averaged over ``--meta-freq`` iterations, relative to an MCL step; on CPU also from the
process's CPU time (``cpu_*`` keys), which other processes on a loaded machine disturb
far less than the wall clock (with ``--threads 1``).

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
from torch import nn  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

import models  # noqa: E402
from data.augment import reference_cifar_transforms  # noqa: E402
from data.pipeline import ArrayData, build_cifar_loaders, load_arrays  # noqa: E402
from data.samplers import MPerClassBatchSampler  # noqa: E402
from losses.lmcl import StageProjectionHeads  # noqa: E402
from losses.mcl import build_projection_heads, sup_mcl_losses  # noqa: E402
from models.lmcl import build_lmcl_cohort  # noqa: E402
from models.lmcl_modules import Aggregator, LossWeightNetwork  # noqa: E402
from utils.args import AT_LEAST_1, HelpFormatter, parse_flags  # noqa: E402
from utils import distributed as du  # noqa: E402
from utils.contrast import InBatchContrast  # noqa: E402
from utils.lmcl_step import (CohortWithStageHeads, LMCLObjective, apply_hypergradient,  # noqa: E402
                             functional_forward, main_losses, meta_step, nesterov_sgd)
from utils.loop import LoopConfig, RunLoop  # noqa: E402
from utils.precision import Precision  # noqa: E402
from utils.supervised import CohortWithHeads, Objective, SupervisedMethod  # noqa: E402
from utils.run_files import RunLogger  # noqa: E402
from utils.metrics import topk_correct  # noqa: E402
from utils.script_setup import build_sgd, configure_determinism  # noqa: E402
from utils.step_module import compiled_function, step_module  # noqa: E402
from utils.machine import cpu_flags, cpu_name  # noqa: E402

MODES = ("reference", "fast", "fast_compile")
DEFAULT_MODES = {"cpu": "reference,fast", "cuda": "reference,fast,fast_compile"}
ORIGINAL_WORKERS = 8  # the original main_cifar.py's --num-workers default
LMCL_MODES = ("mcl", "lmcl", "lmcl_meta")
METHOD_MODES = {"mcl": MODES, "lmcl": LMCL_MODES}
# Rules of this script's own numeric flags (parse_flags overrides; utils.args.NUMERIC_RULES has the shared ones).
NUMERIC_RULE_OVERRIDES = {"meta_freq": AT_LEAST_1, "times": AT_LEAST_1, "meta_steps": AT_LEAST_1}
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
                   help="comma-separated subset of the method's modes: --method mcl: " + ", ".join(MODES)
                        + " (default: reference,fast on CPU, all three on CUDA); --method lmcl: "
                        + ", ".join(LMCL_MODES) + " (default: all)")
    p.add_argument("--method", default="mcl", choices=tuple(METHOD_MODES),
                   help="mcl: the original's way against the fast path; lmcl: an L-MCL iteration (normal "
                        "update and meta step timed apart) against an MCL step, all float32")
    p.add_argument("--meta-freq", type=int, default=50,
                   help="--method lmcl: one meta step every this many iterations (the authors' CIFAR 50); "
                        "the summary averages the meta step over it")
    p.add_argument("--times", type=int, default=2, help="--method lmcl: virtual steps on the MCL objective")
    p.add_argument("--meta-steps", type=int, default=1, help="--method lmcl: timed meta steps per repeat")
    p.add_argument("--exact-hypergradient", action="store_true",
                   help="--method lmcl: time the exact hypergradient (autograd through the virtual steps) "
                        "instead of the authors' recursion")
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


def mcl_objective(cohort: nn.Module, heads: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  args: argparse.Namespace) -> Tuple[torch.Tensor, List[torch.Tensor], Tuple[torch.Tensor, ...]]:
    """The original's MCL objective on one batch: (total loss, logits per network, (loss_cls, vcl,
    soft_vcl, icl, soft_icl)) with the paper's weights from ``args``."""
    logits, features = cohort(inputs)
    embeddings = [head(f) for head, f in zip(heads, features)]
    loss_cls = sum(F.cross_entropy(z, targets) for z in logits)
    vcl, soft_vcl, icl, soft_icl = sup_mcl_losses(embeddings, targets, args.tau, args.kd_T)
    loss = loss_cls + args.alpha * vcl + args.gamma * soft_vcl + args.beta * icl + args.lam * soft_icl
    return loss, logits, (loss_cls, vcl, soft_vcl, icl, soft_icl)


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
        loss, logits, terms = mcl_objective(cohort, heads, inputs, targets, args)
        loss.backward()
        optimizer.step()
        for term in (loss, *terms):  # the original logs every term
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


# ---------------------------------------------------------------- L-MCL against MCL (float32, compute only)


Batch = Tuple[torch.Tensor, torch.Tensor]


def fixed_batches(args: argparse.Namespace, data: ArrayData, device: torch.device, count: int = 4) -> List[Batch]:
    """``count`` m-per-class batches, normalised float32 NCHW on the device, no augmentation."""
    sampler = MPerClassBatchSampler(data.train_labels, args.m_per_class, args.batch_size, seed=args.seed)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    batches = []
    for indices in sampler:
        images = torch.from_numpy(data.train_images[indices]).permute(0, 3, 1, 2).float() / 255
        labels = torch.from_numpy(np.asarray(data.train_labels[indices], dtype=np.int64))
        batches.append((((images - mean) / std).to(device), labels.to(device)))
        if len(batches) == count:
            break
    return batches


def cycling(batches: List[Batch]) -> Callable[[], Batch]:
    state = {"next": 0}

    def next_batch() -> Batch:
        batch = batches[state["next"] % len(batches)]
        state["next"] += 1
        return batch

    return next_batch


def lmcl_objective(args: argparse.Namespace) -> LMCLObjective:
    return LMCLObjective(tau=args.tau, kd_T=args.kd_T, alpha=args.alpha, gamma=args.gamma, beta=args.beta,
                         lam=args.lam)


def mcl_compute_step_fn(args: argparse.Namespace, batches: List[Batch], num_classes: int,
                        device: torch.device) -> Step:
    """One MCL step in float32 on the fixed batches: cohort, heads, the four terms, Nesterov SGD."""
    torch.manual_seed(args.seed)
    cohort = models.build_cohort(args.arch, args.number_net, num_classes, args.cohort).to(device).train()
    heads = build_projection_heads(cohort.feature_dims, args.feat_dim).to(device).train()
    optimizer = nesterov_sgd(list(cohort.parameters()) + list(heads.parameters()), args.init_lr,
                             weight_decay=args.weight_decay)
    next_batch = cycling(batches)

    def step() -> float:
        inputs, targets = next_batch()
        optimizer.zero_grad()
        loss, _, _ = mcl_objective(cohort, heads, inputs, targets, args)
        loss.backward()
        optimizer.step()
        return 0.0

    return step


class LMCLParts:
    """An L-MCL cohort with its stage heads, weight network, aggregator and two optimizers (float32)."""

    def __init__(self, args: argparse.Namespace, num_classes: int, device: torch.device) -> None:
        torch.manual_seed(args.seed)
        cohort = build_lmcl_cohort(args.arch, args.number_net, num_classes)
        stages = cohort.number_stage
        heads = StageProjectionHeads(cohort.feature_dims, stages, args.feat_dim)
        self.model = CohortWithStageHeads(cohort, heads).to(device).train()
        self.weight_net = LossWeightNetwork([[d] * stages for d in cohort.feature_dims]).to(device)
        self.aggregator = Aggregator(cohort.feature_dims, stages).to(device)
        self.optimizer = nesterov_sgd(list(self.model.parameters()) + list(self.aggregator.parameters()),
                                      args.init_lr, weight_decay=args.weight_decay)
        self.weight_optimizer = nesterov_sgd(self.weight_net.parameters(), args.init_lr,
                                             weight_decay=args.weight_decay)
        self.objective = lmcl_objective(args)


def lmcl_normal_step_fn(args: argparse.Namespace, batches: List[Batch], num_classes: int,
                        device: torch.device) -> Step:
    """L-MCL's normal update: stage and aggregated CE, aggregate KD, weighted layer-wise MCL, one SGD step."""
    parts = LMCLParts(args, num_classes, device)
    next_batch = cycling(batches)

    def step() -> float:
        inputs, targets = next_batch()
        parts.optimizer.zero_grad()
        logits, features, embeddings = parts.model(inputs)
        loss = main_losses(logits, features, embeddings, targets, parts.weight_net, parts.aggregator,
                           parts.objective).loss
        loss.backward()
        parts.optimizer.step()
        return 0.0

    return step


def lmcl_meta_step_fn(args: argparse.Namespace, batches: List[Batch], num_classes: int,
                      device: torch.device) -> Step:
    """L-MCL's meta step: the weight network's hypergradient through the virtual steps, then its SGD step."""
    parts = LMCLParts(args, num_classes, device)
    forward = functional_forward(parts.model)
    next_batch = cycling(batches)

    def step() -> float:
        inputs, targets = next_batch()
        result = meta_step(forward, dict(parts.model.named_parameters()), dict(parts.model.named_buffers()),
                           inputs, targets, parts.weight_net, parts.objective, args.init_lr, times=args.times,
                           weight_decay=args.weight_decay, exact_hypergradient=args.exact_hypergradient)
        apply_hypergradient(parts.weight_net, parts.weight_optimizer, result)
        return 0.0

    return step


def lmcl_summary(results: Dict[str, Dict[str, Any]], meta_freq: int, clock: str = "s_per_step") -> Dict[str, float]:
    """An L-MCL iteration (normal update + meta step / meta_freq) against an MCL step: seconds and ratios.

    clock: "s_per_step" (wall) or "cpu_s_per_step" (this process's CPU time; the keys get a ``cpu_`` prefix).
    """
    prefix = "cpu_" if clock == "cpu_s_per_step" else ""
    seconds = {mode: result[clock] for mode, result in results.items()}
    out: Dict[str, float] = {}
    if "lmcl" in seconds and "lmcl_meta" in seconds:
        iteration = seconds["lmcl"] + seconds["lmcl_meta"] / meta_freq
        out[prefix + "lmcl_s_per_iteration"] = iteration
        out[prefix + "ratio_meta_over_normal_update"] = seconds["lmcl_meta"] / seconds["lmcl"]
        if "mcl" in seconds:
            out[prefix + "ratio_lmcl_iteration_over_mcl"] = iteration / seconds["mcl"]
    if "mcl" in seconds:
        for mode, key in (("lmcl", "ratio_normal_update_over_mcl"), ("lmcl_meta", "ratio_meta_step_over_mcl")):
            if mode in seconds:
                out[prefix + key] = seconds[mode] / seconds["mcl"]
    return out


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


def time_steps(step: Step, steps: int, device: torch.device) -> Tuple[float, float, float]:
    """(wall seconds, seconds waiting for data, CPU seconds of this process) of ``steps`` steps,
    device work included."""
    synchronize(device)
    tic, cpu_tic = time.perf_counter(), time.process_time()
    data_s = 0.0
    for _ in range(steps):
        data_s += step()
    synchronize(device)
    return time.perf_counter() - tic, data_s, time.process_time() - cpu_tic


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_interleaved(steps_by_mode: Dict[str, Step], args: argparse.Namespace, device: torch.device,
                    step_counts: Optional[Dict[str, Tuple[int, int]]] = None) -> Dict[str, Dict[str, Any]]:
    """Warm up every mode, then time them in turn ``repeats`` times; medians per mode.

    step_counts: mode -> (warm-up steps, timed steps per repeat); default (--warmup, --steps).
    """
    counts = {mode: (step_counts or {}).get(mode, (args.warmup, args.steps)) for mode in steps_by_mode}
    for mode, step in steps_by_mode.items():
        time_steps(step, counts[mode][0], device)
    rounds: Dict[str, List[Tuple[float, float, float]]] = {mode: [] for mode in steps_by_mode}
    memory = {mode: 0.0 for mode in steps_by_mode}
    for _ in range(args.repeats):
        for mode, step in steps_by_mode.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rounds[mode].append(time_steps(step, counts[mode][1], device))
            memory[mode] = max(memory[mode], peak_memory_mb(device))
    results = {}
    for mode, timings in rounds.items():
        steps = counts[mode][1]
        per_round = [args.batch_size * steps / wall for wall, _, _ in timings]
        results[mode] = {
            "images_per_s": statistics.median(per_round),
            "images_per_s_rounds": [round(v, 2) for v in per_round],
            "images_per_s_best": max(per_round),
            "s_per_step": statistics.median(wall / steps for wall, _, _ in timings),
            "data_s_per_step": statistics.median(d / steps for _, d, _ in timings),
            "cpu_s_per_step": statistics.median(cpu / steps for _, _, cpu in timings),
            "timed_steps": steps,
            "peak_memory_mb": round(memory[mode], 1),
        }
    return results


# ---------------------------------------------------------------- reporting


def bf16_cpu_flags() -> List[str]:
    """The instruction-set extensions that decide bf16 speed (AVX-512 BF16, AMX)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return [flag for flag in cpu_flags() if flag in wanted]


def environment(device: torch.device, argv: List[str]) -> Dict[str, Any]:
    env = {
        "command": shlex.join(["python", "scripts/benchmark.py"] + argv),
        "cpu": cpu_name(),
        "cpu_flags": bf16_cpu_flags(),
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


def parse_modes(text: Optional[str], device: torch.device, method: str = "mcl") -> List[str]:
    allowed = METHOD_MODES[method]
    if text is None:
        text = DEFAULT_MODES[device.type] if method == "mcl" else ",".join(allowed)
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in allowed]
    if unknown or not modes:
        raise SystemExit(f"error: --modes of --method {method} takes a comma-separated subset of "
                         f"{', '.join(allowed)}; got {text!r}")
    return modes


def build_steps(args: argparse.Namespace, modes: List[str], data: ArrayData,
                ctx: du.DistContext) -> Dict[str, Step]:
    """The step function of every requested mode, in the order given."""
    device = ctx.device
    if args.method == "lmcl":
        batches = fixed_batches(args, data, device)
        builders = {"mcl": mcl_compute_step_fn, "lmcl": lmcl_normal_step_fn, "lmcl_meta": lmcl_meta_step_fn}
        return {mode: builders[mode](args, batches, data.num_classes, device) for mode in modes}
    builders = {"reference": lambda: reference_step_fn(args, data, device),
                "fast": lambda: fast_step_fn(args, data, ctx),
                "fast_compile": lambda: fast_step_fn(args, data, ctx, compile=True)}
    return {mode: builders[mode]() for mode in modes}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_flags(build_parser(), argv, NUMERIC_RULE_OVERRIDES)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = du.setup_distributed(device=args.device)
    device = ctx.device
    modes = parse_modes(args.modes, device, args.method)
    if args.num_workers is None:
        args.num_workers = min(ORIGINAL_WORKERS, os.cpu_count() or 1) if device.type == "cuda" else 0
    configure_determinism(False, device)  # cudnn.benchmark on CUDA, as the original set it
    load_before = [round(v, 2) for v in os.getloadavg()]
    data = load_arrays(args.dataset, args.data, args.synthetic_size, args.synthetic_classes, args.seed)
    steps = build_steps(args, modes, data, ctx)
    topology = models.build_cohort(args.arch, args.number_net, data.num_classes, args.cohort).topology
    step_counts = {"lmcl_meta": (min(args.warmup, 1), args.meta_steps)}
    results = run_interleaved(steps, args, device, step_counts)
    common = {"method": args.method, "arch": args.arch, "number_net": args.number_net, "topology": topology,
              "batch_size": args.batch_size, "torch": torch.__version__, "device": str(device),
              "threads": torch.get_num_threads(),
              "memory_measure": "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"}
    for mode in modes:
        print(json.dumps({"mode": mode, **common, **results[mode]}), flush=True)
    summary: Dict[str, Any] = {"summary": True, **common, "steps": args.steps, "warmup": args.warmup,
                               "repeats": args.repeats, "dataset": args.dataset,
                               "reference_num_workers": args.num_workers}
    if args.method == "lmcl":
        summary.update(meta_freq=args.meta_freq, times=args.times, meta_steps=args.meta_steps,
                       exact_hypergradient=args.exact_hypergradient, precision="float32",
                       **lmcl_summary(results, args.meta_freq))
        if device.type == "cpu":  # CPU time: robust to other processes on a shared machine (one thread)
            summary.update(lmcl_summary(results, args.meta_freq, clock="cpu_s_per_step"))
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
