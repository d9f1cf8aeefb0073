"""The epoch loop shared by MoCo pre-training (utils/moco_engine.py) and linear
evaluation (utils/lincls.py): steps over a ShuffledBatchSampler's batches, exact
checkpoints at any step (utils.engine.RunState), graceful stop on SIGTERM/SIGINT.

A subclass gives the step (:meth:`EpochLoop.train_step`), the progress line, what an
epoch's end records, the summary, and the ``meters``/``extra`` parts of its checkpoint.
"""
import itertools
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from utils import distributed as du
from utils.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, RunDirCheckpoints, atomic_save,
                              capture_rng_state, restore_rng_state, seed_everything)
from utils.engine import (Precision, RunState, StopRequest, backward_and_step, make_grad_scaler, reduce_accuracy,
                          report_stop)
from utils.errors import ConfigError
from utils.logging import RunLogger, ensure_writable_dir
from utils.metrics import AccuracyCounter, SumMeter
from utils.schedule import lr_at_epoch, set_lr


def prepare_run_dir(path: str) -> None:
    """Create the --checkpoint directory; ConfigError naming that flag when it is not writable."""
    try:
        ensure_writable_dir(path)
    except ConfigError:
        raise ConfigError(f"cannot write to {path}; pass a writable --checkpoint directory") from None


def decorrelate_ranks(ctx: du.DistContext) -> None:
    """After every rank restored rank 0's RNG states: derive a different stream per rank."""
    if ctx.world_size > 1:
        seed_everything(int(torch.randint(2 ** 31 - 1, ())) + ctx.rank)


def already_finished(ckpt: Optional[Dict[str, Any]], epochs: int, path: Optional[str], is_main: bool,
                     hint: str = "") -> bool:
    """True (and a note on rank 0) when the resumed checkpoint has already run its ``epochs``."""
    if ckpt is None or not ckpt.get("finished") or int(ckpt["epoch"]) < epochs:
        return False
    if is_main:
        print(f"{path}: this run already finished its {ckpt['epoch']} epochs; nothing to do{hint}")
    return True


def wrap_ddp(model: nn.Module, ctx: du.DistContext) -> nn.Module:
    """``model`` in DistributedDataParallel when there is a process group, else itself."""
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def reduced_means(acc: AccuracyCounter, meter: SumMeter, keys: Sequence[str],
                  device: torch.device) -> Dict[str, Any]:
    """{key: mean over all ranks' samples for each of ``keys``, "top1": [%], "top5": [%]} in one reduction."""
    sums = [meter.sums.get(k, 0.0) for k in keys]
    top1, top5, _, extras = reduce_accuracy(acc, device, sums + [meter.count])
    count = max(extras[-1], 1.0)
    record: Dict[str, Any] = {k: extras[i] / count for i, k in enumerate(keys)}
    record.update(top1=top1, top5=top5)
    return record


class EpochLoop(RunDirCheckpoints):
    """Epochs of steps with exact checkpoints and graceful stop; see the module docstring."""

    lr_type = "multistep"

    def __init__(self, args, ctx: du.DistContext, model: nn.Module, ddp_model: nn.Module,
                 optimizer: torch.optim.Optimizer, loader, sampler, logger: RunLogger, run_dir: str,
                 meta: Dict[str, Any], num_heads: int, stop: Optional[StopRequest] = None) -> None:
        self.args, self.ctx = args, ctx
        self.model, self.ddp_model, self.optimizer = model, ddp_model, optimizer
        self.loader, self.sampler = loader, sampler
        self.logger, self.run_dir, self.meta = logger, run_dir, meta
        self.num_heads = num_heads
        self.state = RunState(epoch=args.start_epoch, train_acc=AccuracyCounter(num_heads))
        self.stop = stop if stop is not None else StopRequest()
        self.precision = Precision(args.amp, args.channels_last)
        self.scaler = make_grad_scaler(args.amp)

    def announce(self, config: Dict[str, Any], intro: str, resume_path: Optional[str]) -> None:
        """Rank 0: write config.json and log ``intro`` with where the run starts (or resumes)."""
        if not self.ctx.is_main:
            return
        self.logger.write_config(config)
        s = self.state
        start = f"resuming {resume_path} at epoch {s.epoch + 1} step {s.step}" if resume_path else "starting"
        self.logger.text(f"{intro}; {start}")

    # ----- checkpoints ----------------------------------------------------------
    def meters_state(self) -> Dict[str, Any]:
        """The running meters of the epoch in progress (the checkpoint's "meters")."""
        s = self.state
        return {"train": s.train_meter.state_dict(), "train_acc": s.train_acc.state_dict(), "elapsed": s.elapsed}

    def extra_state(self) -> Dict[str, Any]:
        """The checkpoint's "extra"."""
        return {}

    def checkpoint(self) -> Dict[str, Any]:
        s = self.state
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **self.meta,
            "model": self.model.state_dict(), "heads": None, "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None, "epoch": s.epoch, "step": s.step, "finished": s.finished,
            "best_acc": s.best_acc, "best_epoch": s.best_epoch, "rng": capture_rng_state(),
            "sampler": {"seed": self.sampler.seed, "epoch": s.epoch, "start_batch": s.step},
            "meters": self.meters_state(), "extra": self.extra_state(),
        }

    def save(self, path: Optional[str] = None) -> None:
        """Write the latest checkpoint (or ``path``), on rank 0 only."""
        if self.ctx.is_main:
            atomic_save(self.checkpoint(), path or self.latest_path)

    def restore(self, ckpt: Dict[str, Any]) -> None:
        """Continue from ``ckpt`` exactly where it was written."""
        s = self.state
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        s.epoch, s.step = int(ckpt["epoch"]), int(ckpt["step"])
        s.best_acc, s.best_epoch = float(ckpt["best_acc"]), int(ckpt["best_epoch"])
        meters = ckpt.get("meters") or {}
        if meters and s.step > 0:
            s.train_meter.load_state_dict(meters["train"])
            s.train_acc.load_state_dict(meters["train_acc"])
            s.elapsed = float(meters["elapsed"])
            s.images = int(meters.get("images", 0))
        restore_rng_state(ckpt.get("rng"))
        decorrelate_ranks(self.ctx)

    # ----- one epoch ------------------------------------------------------------
    def set_mode(self) -> None:
        """Train or eval mode of ``ddp_model`` for the training steps."""
        self.ddp_model.train()

    def to_device(self, raw: Any) -> Tuple[Any, Any]:
        """(inputs, targets) of one loader batch, on this process's device."""
        raise NotImplementedError

    def train_step(self, inputs: Any, targets: Any) -> Tuple[Dict[str, float], int]:
        """One optimizer step -> (named loss values, local batch size); updates ``state.train_acc``."""
        raise NotImplementedError

    def optimize(self, loss: torch.Tensor) -> None:
        """Zero the gradients, backward, step (through the fp16 gradient scaler under --amp fp16)."""
        self.optimizer.zero_grad(set_to_none=True)
        backward_and_step(loss, self.optimizer, self.scaler)

    def progress_line(self, lr: float, total: int, named: Dict[str, float]) -> str:
        raise NotImplementedError

    def train_epoch(self) -> bool:
        """Train the rest of ``state.epoch``; False when a signal stopped it."""
        args, ctx, s = self.args, self.ctx, self.state
        self.set_mode()
        lr = lr_at_epoch(s.epoch, args.lr, self.lr_type, args.epochs, args.schedule)
        set_lr(self.optimizer, lr)
        self.sampler.set_epoch(s.epoch)
        self.sampler.set_start_batch(s.step)
        total = self.sampler.num_batches()
        if args.max_train_batches:
            total = min(total, args.max_train_batches)
        tic = time.perf_counter()
        for raw in itertools.islice(self.loader, max(total - s.step, 0)):
            named, local_batch = self.train_step(*self.to_device(raw))
            s.train_meter.update(named, local_batch)
            s.images += local_batch * ctx.world_size
            s.step += 1
            if ctx.is_main and (s.step % args.print_freq == 0 or s.step == 1):
                print(self.progress_line(lr, total, named), flush=True)
            if self.stop.agreed(ctx.device) is not None:
                s.elapsed += time.perf_counter() - tic
                self.save()
                return False
        s.elapsed += time.perf_counter() - tic
        return True

    def next_epoch(self) -> None:
        """Advance to the next epoch with fresh meters (before saving: the checkpoint then
        says "start the next epoch")."""
        s = self.state
        s.epoch, s.step = s.epoch + 1, 0
        s.train_meter, s.train_acc = SumMeter(), AccuracyCounter(self.num_heads)
        s.elapsed, s.images = 0.0, 0

    def end_epoch(self) -> None:
        """Records, best, :meth:`next_epoch`, save."""
        raise NotImplementedError

    # ----- the run ----------------------------------------------------------------
    def before_finish(self) -> None:
        """Checks after the last epoch, before the final save."""

    def on_finished(self) -> None:
        """Rank 0, after the final save: summary and last words."""

    def fit(self) -> int:
        """Train to --epochs (or until a signal); returns the exit code."""
        self.logger.keep_epochs_before(self.state.epoch)
        self.stop.install()
        try:
            while self.state.epoch < self.args.epochs:
                if not self.train_epoch():
                    return self.stopped()
                self.end_epoch()
            self.before_finish()
            self.state.finished = True
            self.save()
            if self.ctx.is_main:
                self.on_finished()
            return 0
        finally:
            self.stop.restore()
            self.logger.close()

    def stopped(self) -> int:
        code = report_stop(self.stop, self.latest_path, self.state, self.ctx.is_main)
        du.barrier()  # nobody leaves before rank 0 has saved
        return code
