"""The training engine shared by main_cifar.py and main_imagenet.py.

One step: forward every network of the cohort, project the features with the
per-network heads, and sum per-network cross-entropy, the weighted MCL terms and
(optionally) logit distillation from the ensemble. One epoch: steps over the
training batches, then top-1/top-5 of every network and of the ensemble on the
test set. The run loop adds the schedule, checkpoints (latest, best and every
``save_every_steps``), the run directory's files, graceful stop on SIGTERM/SIGINT,
and resume from a checkpoint at any step.

Method-specific parts come in as a *contrast* object: ``contrast(embeddings, batch)
-> MCLLosses`` (in-batch for CIFAR, memory bank for ImageNet), with optional
``after_step(embeddings, batch)`` and ``state_dict``/``load_state_dict``.
"""
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses.ensemble import ensemble_distill_loss, ensemble_logits
from losses.mcl import MCLLosses
from utils import distributed as du
from utils.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, RunDirCheckpoints, atomic_save,
                              capture_rng_state, restore_rng_state)
from utils.errors import UserError
from utils.logging import RunLogger
from utils.metrics import AccuracyCounter, SumMeter
from utils.schedule import lr_at_epoch, set_lr

AMP_MODES = ("none", "bf16", "fp16")
TERMS = ("loss", "loss_cls", "loss_kd", "vcl", "soft_vcl", "icl", "soft_icl")

# Test hook: "N" or "N:SIGNAME" (default KILL) makes the process send itself that
# signal right after its N-th training step (counted from the start of the process),
# to test recovery from kill -9 and graceful stops at a chosen step.
SIGNAL_ENV = "MCL_DEBUG_SIGNAL_AFTER_STEPS"


def _debug_signal() -> Optional[tuple]:
    value = os.environ.get(SIGNAL_ENV)
    if not value:
        return None
    steps, _, name = value.partition(":")
    return int(steps), getattr(signal, "SIG" + (name or "KILL").upper().removeprefix("SIG"))


class NonFiniteLossError(UserError):
    exit_code = 3


@dataclass
class Batch:
    """One training batch on the device: inputs (B, 3, H, W), targets (B,), extras."""

    inputs: torch.Tensor
    targets: torch.Tensor
    extras: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    """Weights of the loss terms (SPEC sections 2, 3, 5)."""

    alpha: float = 0.0  # VCL
    gamma: float = 0.0  # soft VCL
    beta: float = 0.0  # ICL
    lam: float = 0.0  # soft ICL
    logit_distill: bool = False
    kd_T: float = 3.0
    kd_all_students_when_two: bool = True  # CIFAR: both nets when N == 2; ImageNet: last only
    kd_detach_ensemble: bool = True  # the original's ImageNet script does not detach

    @property
    def uses_contrast(self) -> bool:
        return any(w != 0 for w in (self.alpha, self.gamma, self.beta, self.lam))


class CohortWithHeads(nn.Module):
    """The cohort and its projection heads as one module (one DDP wrapper, one state)."""

    def __init__(self, cohort: nn.Module, heads: Optional[nn.ModuleList]) -> None:
        super().__init__()
        self.cohort = cohort
        self.heads = heads

    def forward(self, x: torch.Tensor):
        logits, features = self.cohort(x)
        if self.heads is None:
            return logits, features, None
        embeddings = [head(f) for head, f in zip(self.heads, features)]  # float32 (ProjectionHead)
        return logits, features, embeddings


@dataclass
class Precision:
    """Mixed precision and memory format of the fast path."""

    amp: str = "none"
    channels_last: bool = False

    def autocast(self, device: torch.device):
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)

    def prepare_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def make_grad_scaler(amp: str) -> Optional["torch.amp.GradScaler"]:
    """fp16 needs a gradient scaler (its exponent range is small); bf16 and float32 do not."""
    return torch.amp.GradScaler("cuda") if amp == "fp16" else None


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: Optional["torch.amp.GradScaler"]) -> None:
    """``loss.backward()`` then ``optimizer.step()``, through ``scaler`` when there is one."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def validate_precision(amp: str, device: torch.device) -> None:
    if amp not in AMP_MODES:
        raise UserError(f"--amp {amp!r} is not one of {', '.join(AMP_MODES)}")
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA (its gradient scaler is CUDA-only here); use --amp bf16 on CPU")


def compute_loss(
    logits: List[torch.Tensor],
    embeddings: Optional[List[torch.Tensor]],
    batch: Batch,
    objective: Objective,
    contrast: Optional[Callable[[List[torch.Tensor], Batch], MCLLosses]],
) -> Dict[str, torch.Tensor]:
    """All loss terms of one step; ``loss`` is their weighted sum (weights applied)."""
    zero = logits[0].new_zeros(()).float()
    loss_cls = sum(F.cross_entropy(z.float(), batch.targets) for z in logits)
    loss_kd = zero
    if objective.logit_distill:
        loss_kd = ensemble_distill_loss([z.float() for z in logits], objective.kd_T,
                                        objective.kd_all_students_when_two, objective.kd_detach_ensemble)
    terms = MCLLosses(zero, zero, zero, zero)
    if objective.uses_contrast and contrast is not None and embeddings is not None:
        terms = contrast(embeddings, batch)
    vcl = objective.alpha * terms.vcl
    soft_vcl = objective.gamma * terms.soft_vcl
    icl = objective.beta * terms.icl
    soft_icl = objective.lam * terms.soft_icl
    loss = loss_cls + loss_kd + vcl + soft_vcl + icl + soft_icl
    # Terms are logged weighted, as the original logs them.
    return {"loss": loss, "loss_cls": loss_cls, "loss_kd": loss_kd, "vcl": vcl, "soft_vcl": soft_vcl,
            "icl": icl, "soft_icl": soft_icl}


def reduce_accuracy(counter: AccuracyCounter, device: torch.device, extras: Sequence[float] = ()):
    """Sum hit counts (and ``extras``) over ranks -> (top1 %, top5 %, total, summed extras)."""
    packed = torch.tensor(counter.top1 + counter.top5 + [counter.total] + list(extras), dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")  # NCCL needs CUDA tensors
    du.all_reduce_sum(packed)
    vals = packed.tolist()
    n = len(counter.top1)
    total = max(vals[2 * n], 1.0)
    return ([100.0 * v / total for v in vals[:n]], [100.0 * v / total for v in vals[n:2 * n]],
            int(vals[2 * n]), vals[2 * n + 1:])


@torch.no_grad()
def evaluate_cohort(cohort: nn.Module, eval_data: Iterable, device: torch.device, precision: "Precision",
                    to_batch: Callable[[Any, torch.device], Batch], max_batches: int = 0) -> Dict[str, Any]:
    """Test top-1/top-5 (%) of every network and of the ensemble, and the mean CE, over all ranks."""
    cohort.eval()
    counter = AccuracyCounter(cohort.number_net + 1)
    loss_sum = 0.0
    for i, raw in enumerate(eval_data):
        if max_batches and i >= max_batches:
            break
        batch = to_batch(raw, device)
        with precision.autocast(device):
            logits, _ = cohort(precision.prepare_inputs(batch.inputs))
        logits = [z.float() for z in logits]
        loss_sum += float(sum(F.cross_entropy(z, batch.targets, reduction="sum") for z in logits))
        counter.update(logits + [ensemble_logits(logits)], batch.targets)
    top1, top5, total, (loss_total,) = reduce_accuracy(counter, device, [loss_sum])
    return {"top1": top1[:-1], "top5": top5[:-1], "ens_top1": top1[-1], "ens_top5": top5[-1],
            "loss": loss_total / max(total, 1) / cohort.number_net, "images": total}


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, device: torch.device) -> Optional[int]:
        """The signal seen by any rank (so all ranks stop after the same step)."""
        if du.world_size() == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=device)
        du.all_reduce_max(flag)
        return int(flag.item()) or None


def report_stop(stop: StopRequest, latest_path: str, state: "RunState", is_main: bool) -> int:
    """Say where the stopped run was saved and how to resume; the exit code (130 for SIGINT)."""
    name = signal.Signals(stop.signum or signal.SIGTERM).name
    if is_main:
        print(f"{name} received: saved {latest_path} at epoch {state.epoch + 1} step {state.step}. "
              f"Resume with the same command plus --resume (or --resume {latest_path}).",
              file=sys.stderr, flush=True)
    return 130 if stop.signum == signal.SIGINT else 0


@dataclass
class LoopConfig:
    """How the run loop runs (everything but the maths)."""

    epochs: int
    init_lr: float
    lr_type: str
    milestones: Sequence[int]
    save_every_steps: int = 0
    max_train_batches: int = 0  # 0 = no cap
    max_eval_batches: int = 0
    progress: bool = True


@dataclass
class RunState:
    """What a checkpoint restores besides weights and optimizer."""

    epoch: int = 0
    step: int = 0  # batches of ``epoch`` already done
    best_acc: float = 0.0
    best_epoch: int = -1
    finished: bool = False
    train_meter: SumMeter = field(default_factory=SumMeter)
    train_acc: Optional[AccuracyCounter] = None
    elapsed: float = 0.0  # training seconds of ``epoch`` so far
    images: int = 0  # training images of ``epoch`` so far (global)


class Trainer(RunDirCheckpoints):
    """Runs epochs of training and evaluation for a cohort; saves and resumes exactly."""

    def __init__(
        self,
        model: CohortWithHeads,
        optimizer: torch.optim.Optimizer,
        objective: Objective,
        contrast: Optional[Any],
        train_data: Any,
        eval_data: Any,
        ctx: du.DistContext,
        loop: LoopConfig,
        precision: Precision,
        logger: RunLogger,
        run_dir: str,
        checkpoint_meta: Dict[str, Any],
        to_batch: Callable[[Any, torch.device], Batch],
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.objective = objective
        self.contrast = contrast
        self.train_data = train_data
        self.eval_data = eval_data
        self.ctx = ctx
        self.loop = loop
        self.precision = precision
        self.logger = logger
        self.run_dir = run_dir
        self.meta = checkpoint_meta
        self.to_batch = to_batch
        self.number_net = model.cohort.number_net
        self.state = RunState(train_acc=AccuracyCounter(self.number_net + 1))
        self.scaler = make_grad_scaler(precision.amp)
        self.ddp_model: nn.Module = model
        if ctx.distributed:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        self.stop = StopRequest()
        self._steps_this_process = 0
        self._debug_signal = _debug_signal()

    # ----- checkpoints -------------------------------------------------------
    def checkpoint(self, include_contrast: bool = True) -> Dict[str, Any]:
        """Everything needed to continue; ``include_contrast=False`` leaves out memory
        banks and the like, which evaluation and export never need (best.pth.tar)."""
        s = self.state
        contrast = self.contrast if include_contrast else None
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            **self.meta,
            "model": self.model.cohort.state_dict(),
            "heads": self.model.heads.state_dict() if self.model.heads is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": s.epoch,
            "step": s.step,
            "finished": s.finished,
            "best_acc": s.best_acc,
            "best_epoch": s.best_epoch,
            "rng": capture_rng_state(),
            "sampler": {"epoch": s.epoch, "start_batch": s.step},
            "meters": {"train": s.train_meter.state_dict(), "train_acc": s.train_acc.state_dict(),
                       "elapsed": s.elapsed, "images": s.images},
            "extra": {"contrast": contrast.state_dict() if hasattr(contrast, "state_dict") else None},
        }

    def save(self, path: Optional[str] = None) -> None:
        """Write the latest checkpoint (rank 0 only)."""
        if self.ctx.is_main:
            atomic_save(self.checkpoint(), path or self.latest_path)

    def restore(self, ckpt: Dict[str, Any]) -> None:
        """Continue from ``ckpt`` exactly where it was written."""
        self.model.cohort.load_state_dict(ckpt["model"])
        if self.model.heads is not None and ckpt.get("heads") is not None:
            self.model.heads.load_state_dict(ckpt["heads"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        contrast_state = (ckpt.get("extra") or {}).get("contrast")
        if contrast_state is not None and hasattr(self.contrast, "load_state_dict"):
            self.contrast.load_state_dict(contrast_state)
        s = self.state
        s.epoch, s.step = int(ckpt["epoch"]), int(ckpt["step"])
        s.best_acc, s.best_epoch = float(ckpt["best_acc"]), int(ckpt["best_epoch"])
        s.finished = bool(ckpt.get("finished", False))
        meters = ckpt.get("meters") or {}
        if meters and s.step > 0:
            s.train_meter.load_state_dict(meters["train"])
            s.train_acc.load_state_dict(meters["train_acc"])
            s.elapsed, s.images = float(meters["elapsed"]), int(meters["images"])
        restore_rng_state(ckpt.get("rng"))

    # ----- one step / one epoch ---------------------------------------------
    def train_step(self, batch: Batch) -> Dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast(self.ctx.device):
            logits, _, embeddings = self.ddp_model(self.precision.prepare_inputs(batch.inputs))
        terms = compute_loss(logits, embeddings, batch, self.objective, self.contrast)
        values = torch.stack([terms[k].detach().float() for k in TERMS]).tolist()  # one sync per step
        named = dict(zip(TERMS, values))
        if not all(math.isfinite(v) for v in values):
            detail = ", ".join(f"{k}={v:.6g}" for k, v in named.items())
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.state.epoch} step {self.state.step}: {detail}; "
                f"the latest good checkpoint is {self.latest_path}; lower --init-lr or use --amp none"
            )
        backward_and_step(terms["loss"], self.optimizer, self.scaler)
        if self.contrast is not None and embeddings is not None and hasattr(self.contrast, "after_step"):
            self.contrast.after_step([e.detach() for e in embeddings], batch)
        detached = [z.detach().float() for z in logits]
        self.state.train_acc.update(detached + [ensemble_logits(detached)], batch.targets)
        return named

    def train_epoch(self) -> bool:
        """Train the rest of ``state.epoch``; False when stopped by a signal."""
        s = self.state
        model = self.ddp_model
        model.train()
        lr = lr_at_epoch(s.epoch, self.loop.init_lr, self.loop.lr_type, self.loop.epochs, self.loop.milestones)
        set_lr(self.optimizer, lr)
        self.train_data.set_epoch(s.epoch)
        self.train_data.set_start_batch(s.step)
        total = len(self.train_data) + s.step
        if self.loop.max_train_batches:
            total = min(total, self.loop.max_train_batches)
        bar = _progress(total, s.step, f"epoch {s.epoch + 1}/{self.loop.epochs}",
                        self.loop.progress and self.ctx.is_main)
        tic = time.perf_counter()
        for raw in self.train_data:
            if s.step >= total:
                break
            batch = self.to_batch(raw, self.ctx.device)
            named = self.train_step(batch)
            local_b = int(batch.targets.size(0))
            s.train_meter.update(named, local_b)
            s.images += local_b * self.ctx.world_size
            s.step += 1
            self._steps_this_process += 1
            if bar is not None:
                if s.step % 10 == 0 or s.step == total:  # reading the counts waits for the GPU
                    acc = 100.0 * s.train_acc.top1[0] / max(s.train_acc.total, 1)
                    bar.set_postfix(loss=f"{named['loss']:.3f}", top1=f"{acc:.1f}")
                bar.update(1)
            if self._debug_signal is not None and self._steps_this_process == self._debug_signal[0]:
                os.kill(os.getpid(), self._debug_signal[1])
            stop = self.stop.agreed(self.ctx.device)
            last = s.step >= total
            if stop is not None or (not last and self.loop.save_every_steps
                                    and s.step % self.loop.save_every_steps == 0):
                s.elapsed += time.perf_counter() - tic
                tic = time.perf_counter()
                self.save()
            if stop is not None:
                if bar is not None:
                    bar.close()
                return False
        s.elapsed += time.perf_counter() - tic
        if bar is not None:
            bar.close()
        return True

    @torch.no_grad()
    def evaluate(self) -> Dict[str, Any]:
        """Top-1/top-5 of every network and of the ensemble, reduced over ranks."""
        # DDP broadcasts BatchNorm statistics from rank 0 before each training forward, so
        # after the last step every rank holds its own; evaluate (and save) rank 0's.
        du.broadcast_buffers(self.model)
        return evaluate_cohort(self.model.cohort, self.eval_data, self.ctx.device, self.precision, self.to_batch,
                               self.loop.max_eval_batches)

    def _train_record(self) -> Dict[str, Any]:
        top1, top5, _, _ = reduce_accuracy(self.state.train_acc, self.ctx.device)
        record = {k: float(v) for k, v in self.state.train_meter.averages().items()}
        record.update(top1=top1[:-1], top5=top5[:-1], ens_top1=top1[-1], ens_top5=top5[-1])
        return record

    # ----- the run ------------------------------------------------------------
    def fit(self) -> int:
        """Train to the last epoch (or until a signal); returns the process exit code."""
        s = self.state
        self.logger.keep_epochs_before(s.epoch)
        self.logger.remove_summary()
        self.stop.install()
        try:
            while s.epoch < self.loop.epochs:
                completed = self.train_epoch()
                if not completed:
                    return self._stopped()
                self._end_epoch()
            s.finished = True
            self.save()
            summary = self.summary()
            self.logger.write_summary(summary)
            self._print_summary(summary)
            return 0
        finally:
            self.stop.restore()
            self.logger.close()

    def _end_epoch(self) -> None:
        s = self.state
        lr = self.optimizer.param_groups[0]["lr"]
        train = self._train_record()
        test = self.evaluate()
        best_single = max(test["top1"])
        is_best = best_single > s.best_acc or s.best_epoch < 0
        if is_best:
            s.best_acc, s.best_epoch = best_single, s.epoch
        record = {
            "epoch": s.epoch, "epochs": self.loop.epochs, "lr": lr, "time_s": s.elapsed,
            "images_per_s": s.images / s.elapsed if s.elapsed > 0 else 0.0,
            "train": train, "test": {k: v for k, v in test.items() if k != "images"},
            "best_single_top1": best_single, "best_acc": s.best_acc, "best_epoch": s.best_epoch,
        }
        # Advance before saving, so the checkpoint says "start the next epoch".
        s.epoch += 1
        s.step = 0
        s.train_meter = SumMeter()
        s.train_acc = AccuracyCounter(self.number_net + 1)
        s.elapsed, s.images = 0.0, 0
        self.save()
        if is_best and self.ctx.is_main:
            atomic_save(self.checkpoint(include_contrast=False), self.best_path)
        self.logger.log_epoch(record)
        self.logger.text(format_epoch(record))

    def _stopped(self) -> int:
        return report_stop(self.stop, self.latest_path, self.state, self.ctx.is_main)

    def summary(self) -> Dict[str, Any]:
        """SPEC section 8: the paper's metric and the honest last-epoch figures."""
        from utils.logging import read_metrics

        records = read_metrics(self.logger.metrics_path) if self.logger.enabled else []
        last = records[-1]["test"] if records else {"top1": [], "ens_top1": None}
        return {
            "finished": True, "epochs": self.loop.epochs, "best_acc": self.state.best_acc,
            "best_epoch": self.state.best_epoch, "last_top1": last["top1"],
            "last_mean_top1": sum(last["top1"]) / len(last["top1"]) if last["top1"] else None,
            "last_ens_top1": last.get("ens_top1"),
        }

    def _print_summary(self, summary: Dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        last = ", ".join(f"{v:.2f}" for v in summary["last_top1"])
        self.logger.text(
            f"best single-network top-1 (the paper's metric): {summary['best_acc']:.2f} "
            f"at epoch {summary['best_epoch'] + 1}\n"
            f"last-epoch top-1 per network: [{last}], mean {summary['last_mean_top1'] or 0:.2f}, "
            f"ensemble {summary['last_ens_top1'] or 0:.2f}"
        )


def format_epoch(record: Dict[str, Any]) -> str:
    """One readable line per epoch."""
    t = record["test"]
    tr = record["train"]
    nets = " ".join(f"{v:.2f}" for v in t["top1"])
    terms = " ".join(f"{k}={tr[k]:.4f}" for k in TERMS if k in tr)
    return (f"epoch {record['epoch'] + 1}/{record['epochs']} lr={record['lr']:.5f} {terms} | "
            f"test top-1 [{nets}] ens {t['ens_top1']:.2f} | best {record['best_acc']:.2f} | "
            f"{record['time_s']:.1f}s {record['images_per_s']:.0f} img/s")


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled or not sys.stdout.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
