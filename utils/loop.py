"""The one run loop of the four scripts: epochs of steps, evaluation, checkpoints, stop and resume.

A training method brings only what is its own, as a :class:`Method`: how a loader batch
reaches the device, the forward pass and loss of one step (a :class:`StepResult`), its
evaluation, its extra state (memory banks, queue pointers, ...) and its summary. The
loop does the rest the same way for every method:

- the learning-rate schedule of each epoch, the epoch's batches from the resumable
  train data (``set_epoch``, ``set_start_batch``, ``len`` = batches left), progress;
- one optimizer step (through the fp16 gradient scaler under ``--amp fp16``) that never
  waits for the device: its logged values stay there until the loop reads them all at
  once (utils/step_log.py), every ``LoopConfig.read_every`` steps, every ``log_freq`` steps
  (the dashboards' step values), before a checkpoint and at the epoch's end. That read is the loop's one host synchronisation; it also checks the
  values for NaN and infinity and agrees on a stop signal over all ranks, so every rank
  stops after the same step (a NaN of one rank stops them all, exit code 3);
- checkpoints: the latest after every epoch, every ``save_every_steps`` steps and on
  SIGTERM/SIGINT; ``best.pth.tar`` at the best epoch; exact resume at any step;
- the run directory's metrics.jsonl, log.txt and summary.json, and the dashboards (TensorBoard, W&B:
  utils/dashboard.py): the epoch's values, the step's loss terms every ``log_freq`` steps, one grid
  of training images, the final metrics; the epoch line ends with the whole run's ETA.

Epochs are numbered from 1 wherever a person reads them: the console, metrics.jsonl's
"epoch", summary.json's and checkpoints' "best_epoch", TensorBoard's steps and export's
messages. A checkpoint's "epoch" counts the epochs already completed (0 before the first
ends), which is also the index from which training continues.
"""
import itertools
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from utils import distributed as du
from utils.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, RunDirCheckpoints, atomic_save,
                              capture_rng_state, restore_rng_state, seed_everything)
from utils.dashboard import epoch_scalars, step_scalars
from utils.errors import UserError
from utils.method import Method
from utils.metrics import AccuracyCounter, SumMeter, reduced_means
from utils.precision import Precision, backward_and_step, make_grad_scaler
from utils.progress import format_duration
from utils.run_files import RunLogger, read_metrics, unlock_run_dir
from utils.schedule import lr_at_epoch, set_lr
from utils.step_log import PendingSteps, Reading
from utils.stop import StopRequest, debug_signal


class NonFiniteLossError(UserError):
    exit_code = 3


def first_non_finite(tensors: Dict[str, Any], prefix: str = "") -> Optional[str]:
    """The name of the first floating-point tensor with a NaN or infinity in a nested dict of
    tensors (a state dict, an optimizer state), or None when every value is finite."""
    for key, value in tensors.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found = first_non_finite(value, name + ".")
            if found is not None:
                return found
        elif torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


DEFAULT_READ_EVERY = 10  # steps between reads of the logged values without --print-freq


@dataclass
class LoopConfig:
    """How the run loop runs (everything but the maths)."""

    epochs: int
    init_lr: float
    lr_type: str
    milestones: Sequence[int]
    save_every_steps: int = 0
    max_train_batches: int = 0  # 0 = no cap
    progress: bool = True  # a tqdm bar when stdout is a terminal
    print_freq: int = 0  # a progress line every N steps (0 = none)
    log_freq: int = 0  # the step's loss terms to the dashboards every N steps (0 = none)

    @property
    def read_every(self) -> int:
        """Steps between two reads of the logged values (utils/step_log.py): the console's --print-freq,
        else 10 (the dashboards' ``log_freq`` steps are read as well)."""
        return self.print_freq or DEFAULT_READ_EVERY

    @classmethod
    def from_flags(cls, args: Any) -> "LoopConfig":
        """From a script's flags: the supervised scripts' --init-lr --lr-type --milestones, or the MoCo
        scripts' --lr --schedule (--cos where there is one). --print-freq: the dashboards' step values in
        every script, console lines in the MoCo scripts only (as in the original; the supervised scripts
        print one line per epoch)."""
        supervised = hasattr(args, "init_lr")
        freq = getattr(args, "print_freq", 0)
        return cls(epochs=args.epochs, init_lr=args.init_lr if supervised else args.lr,
                   lr_type=args.lr_type if supervised else ("cosine" if getattr(args, "cos", False) else "multistep"),
                   milestones=args.milestones if supervised else args.schedule,
                   save_every_steps=getattr(args, "save_every_steps", 0), max_train_batches=args.max_train_batches,
                   progress=not getattr(args, "no_progress", True), print_freq=0 if supervised else freq,
                   log_freq=freq)


@dataclass
class RunState:
    """What a checkpoint restores besides weights and optimizer."""

    epoch: int = 0
    step: int = 0  # batches of ``epoch`` already done
    best_acc: float = 0.0
    best_epoch: int = 0  # number (from 1) of the best epoch; 0 = none yet
    finished: bool = False
    train_meter: SumMeter = field(default_factory=SumMeter)
    train_acc: Optional[AccuracyCounter] = None
    elapsed: float = 0.0  # training seconds of ``epoch`` so far
    images: int = 0  # training images of ``epoch`` so far (global)


def decorrelate_ranks(ctx: du.DistContext) -> None:
    """After every rank restored rank 0's RNG states: derive a different stream per rank."""
    if ctx.world_size > 1:
        seed_everything(int(torch.randint(2 ** 31 - 1, ())) + ctx.rank)


def wrap_ddp(model: nn.Module, ctx: du.DistContext, not_broadcast: Sequence[str] = ()) -> nn.Module:
    """``model`` in DistributedDataParallel when there is a process group, else itself.

    ``not_broadcast``: names in ``model.state_dict()`` of buffers that every rank already
    updates identically (MoCo's queues); DDP leaves them out of its start-up sync and of
    the buffer broadcast before every forward. Other buffers (BatchNorm) are broadcast.
    """
    if not ctx.distributed:
        return model
    if not_broadcast:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(not_broadcast))
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


class RunLoop(RunDirCheckpoints):
    """Runs a :class:`Method` for ``config.epochs`` epochs with exact checkpoints; see the module docstring."""

    def __init__(self, method: Method, optimizer: torch.optim.Optimizer, train_data: Any, ctx: du.DistContext,
                 config: LoopConfig, precision: Precision, logger: RunLogger, run_dir: str,
                 meta: Dict[str, Any], sampler_seed: Optional[int] = None) -> None:
        self.method, self.optimizer, self.train_data = method, optimizer, train_data
        self.ctx, self.config, self.precision = ctx, config, precision
        self.logger, self.run_dir, self.meta = logger, run_dir, meta
        self.sampler_seed = sampler_seed
        self.state = RunState(train_acc=AccuracyCounter(method.num_heads))
        self.scaler = make_grad_scaler(precision.amp)
        self.stop = StopRequest()
        self.pending = PendingSteps(method.terms)
        self.stop_signum: Optional[int] = None  # the stop signal the ranks agreed on
        self.last_saved: Optional[str] = None  # the newest checkpoint this run wrote or resumed from
        self._steps_this_process = 0
        self._debug_signal = debug_signal(ctx.rank)
        self._epoch_costs: List[float] = []  # seconds of each epoch ended in this process (training + evaluation)
        self._bar = None  # the epoch's progress bar, while it runs

    # ----- checkpoints -------------------------------------------------------
    def checkpoint(self, for_best: bool = False) -> Dict[str, Any]:
        s = self.state
        sampler = {"epoch": s.epoch, "start_batch": s.step}
        if self.sampler_seed is not None:
            sampler["seed"] = self.sampler_seed
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **self.meta,
            **self.method.model_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": s.epoch, "step": s.step, "finished": s.finished,
            "best_acc": s.best_acc, "best_epoch": s.best_epoch,
            "rng": capture_rng_state(), "sampler": sampler,
            "meters": {"train": s.train_meter.state_dict(), "train_acc": s.train_acc.state_dict(),
                       "elapsed": s.elapsed, "images": s.images},
            "extra": self.method.extra_state(for_best),
        }

    def save(self, path: Optional[str] = None, for_best: bool = False) -> None:
        """Write the latest checkpoint (or ``path``) on rank 0, never one holding a NaN or infinity.

        Every rank calls it, at the same point; when rank 0 cannot save (a non-finite weight, a full
        disk), every rank stops with its error.
        """
        du.decided_on_main(lambda: self._write(path, for_best))
        if path is None:
            self.last_saved = self.latest_path

    def _write(self, path: Optional[str], for_best: bool) -> None:
        self.check_finite_state()
        atomic_save(self.checkpoint(for_best), path or self.latest_path)

    def check_finite_state(self) -> None:
        """NonFiniteLossError when a weight, buffer or optimizer state holds a NaN or infinity."""
        state = {"model": self.method.model_state(), "optimizer": self.optimizer.state_dict()["state"]}
        bad = first_non_finite(state)
        if bad is not None:
            s = self.state
            raise NonFiniteLossError(f"non-finite value in {bad} at epoch {s.epoch + 1} step {s.step}; "
                                     f"{self._good_checkpoint_hint()}")

    def _good_checkpoint_hint(self) -> str:
        if self.last_saved is None:
            return f"no checkpoint was written; lower {self.method.lr_flag}"
        return f"the latest good checkpoint is {self.last_saved}; lower {self.method.lr_flag}"

    def restore(self, ckpt: Dict[str, Any], path: Optional[str] = None) -> None:
        """Continue from ``ckpt`` (read from ``path``) exactly where it was written."""
        self.method.load_model_state(ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.method.load_extra_state(ckpt.get("extra") or {})
        s = self.state
        s.epoch, s.step = int(ckpt["epoch"]), int(ckpt["step"])
        s.best_acc, s.best_epoch = float(ckpt["best_acc"]), int(ckpt["best_epoch"])
        if int(ckpt.get("version", 1)) < 2:  # version 1 numbered the best epoch from 0 (-1 = none)
            s.best_epoch += 1
        s.finished = bool(ckpt.get("finished", False))
        meters = ckpt.get("meters") or {}
        if meters and s.step > 0:
            s.train_meter.load_state_dict(meters["train"])
            s.train_acc.load_state_dict(meters["train_acc"])
            s.elapsed, s.images = float(meters["elapsed"]), int(meters.get("images", 0))
        restore_rng_state(ckpt.get("rng"))
        self.last_saved = path
        if self.method.rank_streams:
            decorrelate_ranks(self.ctx)

    def announce(self, config: Dict[str, Any], intro: str, resumed_from: Optional[str]) -> None:
        """Rank 0: write config.json and log ``intro`` with where the run starts (or resumes)."""
        if not self.ctx.is_main:
            return
        self.logger.write_config(config)
        self.logger.text(f"{intro}; {self.start_point(resumed_from)}")

    def start_point(self, resumed_from: Optional[str]) -> str:
        s = self.state
        return f"resuming {resumed_from} at epoch {s.epoch + 1} step {s.step}" if resumed_from else "starting"

    # ----- one step / one epoch ---------------------------------------------
    def train_step(self, raw: Any) -> int:
        """One optimizer step on one loader batch, without waiting for the device: its logged values
        join ``pending`` (a non-finite one is found when they are read). Returns the local batch size."""
        method = self.method
        inputs, targets = method.to_device(raw)
        if self._steps_this_process == 0 and self.logger.wants_sample_images:
            self.logger.log_sample_images(method.sample_images(inputs))
        self.optimizer.zero_grad(set_to_none=True)
        out = method.forward(inputs, targets)
        batch = int(out.targets.size(0))
        self.pending.add(self.state.step, torch.stack([out.terms[k].detach().float() for k in method.terms]), batch)
        backward_and_step(out.terms["loss"], self.optimizer, self.scaler)
        if out.after_update is not None:
            out.after_update()
        self.state.train_acc.update(out.logits, out.targets)
        return batch

    def read_pending(self, lr: float, total: int) -> Optional[int]:
        """Read the queued step values (utils/step_log.py): into the epoch's meter, the progress line;
        NonFiniteLossError on every rank when any rank's values hold a NaN or infinity (nothing is
        saved after such a step). Returns the stop signal the ranks agreed on, or None."""
        reading = self.pending.read(self.stop.requested(), self.ctx.device)
        if reading.non_finite:
            raise self._non_finite_error(reading)
        for step, named, batch in reading.steps:
            self.state.train_meter.update(named, batch)
            self._log_step(step + 1, named, lr, total)
        if reading.steps:
            self._show_values(reading.steps[-1][1], lr, total)
        self.stop_signum = reading.signum
        return reading.signum

    def _log_step(self, done: int, named: Dict[str, float], lr: float, total: int) -> None:
        """The dashboards' values of the epoch's ``done``-th step, every ``log_freq`` steps (read then: see
        ``_read_due``)."""
        if self.config.log_freq and done % self.config.log_freq == 0:
            self.logger.log_steps(step_scalars(named, lr), self.state.epoch * total + done)

    def _non_finite_error(self, reading: Reading) -> NonFiniteLossError:
        s, hint = self.state, self._good_checkpoint_hint()
        for step, named, _ in reading.steps:
            if not all(math.isfinite(v) for v in named.values()):
                detail = ", ".join(f"{k}={v:.6g}" for k, v in named.items())
                return NonFiniteLossError(
                    f"non-finite loss at epoch {s.epoch + 1} step {step}: {detail}; {hint}"
                    + (" or use --amp none" if self.precision.amp != "none" else ""))
        return NonFiniteLossError(f"non-finite loss in another process by epoch {s.epoch + 1} step {s.step}; {hint}")

    def train_epoch(self) -> bool:
        """Train the rest of ``state.epoch``; False when stopped by a signal."""
        s, cfg, ctx = self.state, self.config, self.ctx
        self.method.train_mode()
        lr = lr_at_epoch(s.epoch, cfg.init_lr, cfg.lr_type, cfg.epochs, cfg.milestones)
        set_lr(self.optimizer, lr)
        total = self._epoch_batches()
        bar = _progress(total, s.step, f"epoch {s.epoch + 1}/{cfg.epochs}", cfg.progress and ctx.is_main)
        tic = time.perf_counter()
        stopped = False
        self._bar = bar
        for raw in itertools.islice(self.train_data, max(total - s.step, 0)):
            local_b = self.train_step(raw)
            s.images += local_b * ctx.world_size
            s.step += 1
            self._steps_this_process += 1
            if self._debug_signal is not None and self._steps_this_process == self._debug_signal[0]:
                os.kill(os.getpid(), self._debug_signal[1])
            periodic = bool(s.step < total and cfg.save_every_steps and s.step % cfg.save_every_steps == 0)
            # One process stops after the step a signal came in; a group, at the next read, all together.
            alone_stopping = ctx.world_size == 1 and self.stop.requested() is not None
            if periodic or alone_stopping or self._read_due(total):
                stopped = self.read_pending(lr, total) is not None
            if bar is not None:
                bar.update(1)
            if stopped or periodic:
                s.elapsed += time.perf_counter() - tic
                tic = time.perf_counter()
                self.save()
            if stopped:
                break
        s.elapsed += time.perf_counter() - tic
        if len(self.pending):  # the loader ended before ``total`` (after the same step on every rank)
            stopped = self.read_pending(lr, total) is not None
            if stopped:
                self.save()
        if bar is not None:
            bar.close()
        self._bar = None
        return not stopped

    def _epoch_batches(self) -> int:
        """Point the train data at ``state.epoch`` and ``state.step``; the epoch's number of batches."""
        s = self.state
        self.train_data.set_epoch(s.epoch)
        self.train_data.set_start_batch(s.step)
        total = len(self.train_data) + s.step
        return min(total, self.config.max_train_batches) if self.config.max_train_batches else total

    def _read_due(self, total: int) -> bool:
        """Whether the values are read after this step: the first, every ``read_every``-th, every
        ``log_freq``-th (the dashboards' step values), the last of the epoch (the same steps on every rank)."""
        step, log_freq = self.state.step, self.config.log_freq
        return (step == 1 or step % self.config.read_every == 0 or bool(log_freq and step % log_freq == 0)
                or step == total)

    def _show_values(self, named: Dict[str, float], lr: float, total: int) -> None:
        """The progress bar's figures or the progress line, after a read (``named``: the last step's)."""
        s, bar = self.state, self._bar
        if bar is not None:
            acc = 100.0 * s.train_acc.top1[0] / max(s.train_acc.total, 1)  # right after the read: no wait
            bar.set_postfix(loss=f"{named['loss']:.3f}", top1=f"{acc:.1f}")
        elif self.ctx.is_main and self.config.print_freq and (s.step % self.config.print_freq == 0 or s.step == 1):
            print(self.method.progress_line(s.epoch, s.step, total, lr, named, s.train_acc), flush=True)

    def end_epoch(self) -> None:
        """Evaluate, record, advance to the next epoch; write best.pth.tar, the metrics line, then the latest
        checkpoint (in that order: a kill between two of them leaves the latest checkpoint of before this
        epoch's end, so a resume redoes the epoch and writes all three again), and log."""
        s = self.state
        self.method.check()
        du.decided_on_main(self.check_finite_state)  # before evaluating and recording weights that overflowed
        lr = self.optimizer.param_groups[0]["lr"]
        train = reduced_means(s.train_acc, s.train_meter, self.method.terms, self.ctx.device)
        record: Dict[str, Any] = {
            "epoch": s.epoch + 1, "epochs": self.config.epochs, "lr": lr, "time_s": s.elapsed,
            "images_per_s": s.images / s.elapsed if s.elapsed > 0 else 0.0,
            "train": self.method.train_record(train)}
        tic = time.perf_counter()
        evaluation, score = self.method.evaluate()
        record.update(evaluation)
        record["eval_s"] = time.perf_counter() - tic
        is_best = score is not None and (score > s.best_acc or s.best_epoch == 0)
        if is_best:
            s.best_acc, s.best_epoch = score, s.epoch + 1
        if score is not None:
            record.update(best_acc=s.best_acc, best_epoch=s.best_epoch)
        # Advance before saving, so the checkpoint says "start the next epoch".
        s.epoch, s.step = s.epoch + 1, 0
        s.train_meter, s.train_acc = SumMeter(), AccuracyCounter(self.method.num_heads)
        s.elapsed, s.images = 0.0, 0
        if du.decided_on_main(lambda: is_best and self.method.saves_best):  # save() needs every rank
            self.save(self.best_path, for_best=True)
        self.logger.log_epoch(record, epoch_scalars(record, self.method.train_accuracy_prefix))
        self.save()
        self._epoch_costs.append(record["time_s"] + record["eval_s"])
        self.logger.text(self.method.format_epoch(record) + self._eta(record["epoch"]))

    def _eta(self, epochs_done: int) -> str:
        """`` | ETA 1h02m`` for the epochs left of the whole run (mean cost of this process's epochs so far)."""
        left = self.config.epochs - epochs_done
        if left <= 0 or not self._epoch_costs:
            return ""
        return f" | ETA {format_duration(left * sum(self._epoch_costs) / len(self._epoch_costs))}"

    # ----- the run ------------------------------------------------------------
    def fit(self) -> int:
        """Train to the last epoch (or until a signal); returns the process exit code."""
        s = self.state
        self.logger.begin(s.epoch, s.epoch * self._epoch_batches() + s.step)
        self.logger.remove_summary()
        self.stop.install()
        try:
            while s.epoch < self.config.epochs:
                if not self.train_epoch():
                    return self._stopped()
                self.end_epoch()
            self.method.check()
            s.finished = True
            summary: Dict[str, Any] = {}
            if self.ctx.is_main:  # the summary before the finished checkpoint, for the reason end_epoch gives
                summary = self.method.summary(s, read_metrics(self.logger.metrics_path), self.config.epochs)
                self.logger.write_summary(summary)
            self.save()
            if self.ctx.is_main:
                self.method.on_finished(self, summary)
                self._finish_dashboards()
            return 0
        finally:
            self.stop.restore()
            self.logger.close()
            unlock_run_dir(self.run_dir)

    def _finish_dashboards(self) -> None:
        """Rank 0, a finished run: the final metrics beside the configuration, the method's extras."""
        records = read_metrics(self.logger.metrics_path)
        if records:
            self.logger.log_final(epoch_scalars(records[-1], self.method.train_accuracy_prefix))
        self.method.on_finished_dashboards(self)

    def _stopped(self) -> int:
        """Say where the stopped run was saved and how to resume; the exit code (130 for SIGINT)."""
        signum = self.stop_signum or self.stop.signum or signal.SIGTERM
        name = signal.Signals(signum).name
        if self.ctx.is_main:
            print(f"{name} received: saved {self.latest_path} at epoch {self.state.epoch + 1} step "
                  f"{self.state.step}. Resume with the same command plus --resume (or --resume "
                  f"{self.latest_path}).", file=sys.stderr, flush=True)
        du.barrier()  # nobody leaves before rank 0 has saved
        return 130 if signum == signal.SIGINT else 0


def already_finished(ckpt: Optional[Dict[str, Any]], epochs: int, path: Optional[str], is_main: bool,
                     hint: str = "") -> bool:
    """True (and a note on rank 0) when the resumed checkpoint has already run its ``epochs``."""
    if ckpt is None or not ckpt.get("finished") or int(ckpt["epoch"]) < epochs:
        return False
    if is_main:
        print(f"{path}: this run already finished its {ckpt['epoch']} epochs; nothing to do{hint}")
    return True


def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled or not sys.stdout.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)
