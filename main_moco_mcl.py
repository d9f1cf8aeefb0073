#!/usr/bin/env python
"""Self-supervised MCL on MoCo (SPEC section 4): N query/key encoder pairs, one queue each.

    python main_moco_mcl.py -a resnet18 --lr 0.03 --batch-size 256 --number-net 2 \\
        --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 \\
        --gpu-ids 0,1,2,3,4,5,6,7

pre-trains MCL(x2) on ImageNet as the paper did (add --mlp --aug-plus --cos for MoCo v2).
Other ways to start it: ``torchrun --nproc_per_node=K main_moco_mcl.py ...`` or a single
process (on CPU or one GPU). --batch-size is the total over the processes of one node.
In a single process the key batch is not shuffled: BatchNorm then sees the whole batch
at once and a permutation changes nothing (shuffled BN needs several processes).

The run directory (--checkpoint) receives checkpoint.pth.tar after every epoch (with
the key encoders, queues and pointers), checkpoint_<last epoch>.pth.tar at the end
(the name main_lincls.py's README command uses), config.json, metrics.jsonl and
summary.json. SIGTERM/SIGINT finish the current step, save and exit (0 / 130);
``--resume`` continues exactly there.
"""
import argparse
import itertools
import math
import os
import platform
import random
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from data.moco_aug import (ShuffledBatchSampler, TwoCropsTransform, center_crop_transform, image_folder,
                           moco_augmentation)
from losses.moco import instance_logits, moco_mcl_losses
from models.moco import MoCoMCL, check_queue_size, encoder_names, pooled_features
from utils import distributed as du
from utils.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save, capture_rng_state,
                              restore_rng_state, seed_everything)
from utils.cli import run_main
from utils.engine import NonFiniteLossError, StopRequest
from utils.errors import CheckpointError, ConfigError, UserError
from utils.logging import RunLogger, ensure_writable_dir
from utils.metrics import AccuracyCounter, SumMeter
from utils.run import configure_determinism, load_for_run, resolve_resume
from utils.schedule import lr_at_epoch, set_lr

TERMS = ("loss", "vcl", "soft_vcl", "icl", "soft_icl")


# ============================================================================ flags

def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The original's process-group flags (shared with main_lincls.py)."""
    parser.add_argument("--world-size", default=-1, type=int, help="number of nodes for distributed training")
    parser.add_argument("--rank", default=-1, type=int, help="node rank for distributed training")
    parser.add_argument("--dist-url", default="tcp://224.66.41.62:23456", type=str,
                        help="url used to set up distributed training")
    parser.add_argument("--dist-backend", default=None, type=str,
                        help="distributed backend (default: nccl on CUDA, gloo on CPU; the original: nccl)")
    parser.add_argument("--seed", default=None, type=int, help="seed for initializing training")
    parser.add_argument("--gpu", default=None, type=int, help="GPU id to use (one process, no data parallelism)")
    parser.add_argument("--gpu-ids", default=None, type=str,
                        help="GPU ids to use, e.g. 0,1,2,3 (--multiprocessing-distributed starts one process "
                             "per id; unset: every visible GPU)")
    parser.add_argument("--multiprocessing-distributed", action="store_true",
                        help="launch one process per GPU of this node (the original's way); the total "
                             "--world-size becomes nodes x processes per node")


def add_smoke_args(parser: argparse.ArgumentParser) -> None:
    """Additions for CPU runs and smoke tests (shared with main_lincls.py)."""
    g = parser.add_argument_group("additions")
    g.add_argument("--device", default="auto", choices=du.DEVICES, help="auto = CUDA when available")
    g.add_argument("--image-size", default=224, type=int, help="crop size of the augmentations")
    g.add_argument("--max-train-batches", default=0, type=int, help="cap on training batches per epoch (0 = none)")
    g.add_argument("--max-eval-batches", default=0, type=int, help="cap on evaluation batches (0 = none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", metavar="DIR", default="./data/ImageNet/", type=str,
                        help="path to dataset (an ImageFolder with train/)")
    parser.add_argument("-a", "--arch", metavar="ARCH", default="resnet50", choices=encoder_names(),
                        help="encoder architecture: " + " | ".join(encoder_names()) + " (default: resnet50)")
    parser.add_argument("-j", "--workers", default=32, type=int, metavar="N",
                        help="number of data loading workers (default: 32, split over the processes of a node)")
    parser.add_argument("--epochs", default=200, type=int, metavar="N", help="number of total epochs to run")
    parser.add_argument("--start-epoch", default=0, type=int, metavar="N",
                        help="manual epoch number (useful on restarts)")
    parser.add_argument("-b", "--batch-size", default=256, type=int, metavar="N",
                        help="mini-batch size (default: 256), the total over the processes of this node")
    parser.add_argument("--lr", "--learning-rate", default=0.03, type=float, metavar="LR",
                        help="initial learning rate", dest="lr")
    parser.add_argument("--schedule", default=[120, 160], nargs="*", type=int,
                        help="learning rate schedule (when to drop lr by 10x)")
    parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help="momentum of SGD solver")
    parser.add_argument("--wd", "--weight-decay", default=1e-4, type=float, metavar="W",
                        help="weight decay (default: 1e-4)", dest="weight_decay")
    parser.add_argument("-p", "--print-freq", default=10, type=int, metavar="N", help="print frequency (default: 10)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="resume from PATH; alone: the latest checkpoint of --checkpoint (default: none)")
    add_distributed_args(parser)
    parser.add_argument("--number-net", default=2, type=int, metavar="N", help="number of peer networks")
    parser.add_argument("--moco-dim", default=128, type=int, help="feature dimension (default: 128)")
    parser.add_argument("--moco-k", default=65536, type=int,
                        help="queue size; number of negative keys (default: 65536); need not be a "
                             "multiple of the batch (the queue wraps around)")
    parser.add_argument("--moco-m", default=0.999, type=float,
                        help="moco momentum of updating key encoder (default: 0.999)")
    parser.add_argument("--moco-t", default=0.07, type=float, help="softmax temperature (default: 0.07)")
    parser.add_argument("--checkpoint", default="./checkpoint/", type=str, help="run directory")
    parser.add_argument("--mlp", action="store_true", help="use mlp head (MoCo v2: Linear, ReLU, Linear)")
    parser.add_argument("--aug-plus", action="store_true", help="use moco v2 data augmentation")
    parser.add_argument("--cos", action="store_true", help="use cosine lr schedule")
    add_smoke_args(parser)
    g = parser.add_argument_group("more additions")
    g.add_argument("--kd-T", default=3.0, type=float, help="temperature of the soft (KL) terms (the original's 3)")
    g.add_argument("--knn-data", default="", type=str,
                   help="small labelled ImageFolder with train/ and val/: after every epoch, weighted kNN "
                        "top-1 of each query encoder's pooled features (off when empty)")
    g.add_argument("--knn-k", default=200, type=int, help="neighbours of the kNN monitor")
    g.add_argument("--knn-t", default=0.1, type=float, help="temperature of the kNN monitor's weights")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    return parser


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    positive = {"--epochs": args.epochs, "--batch-size": args.batch_size, "--number-net": args.number_net,
                "--moco-dim": args.moco_dim, "--moco-k": args.moco_k, "--print-freq": args.print_freq}
    for flag, value in positive.items():
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1 (got {value})")
    if not 0.0 <= args.moco_m < 1.0:
        raise ConfigError(f"--moco-m must be in [0, 1) (got {args.moco_m})")
    if args.moco_t <= 0 or args.kd_T <= 0:
        raise ConfigError("--moco-t and --kd-T must be positive")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0 (got {args.workers})")
    return args


# ============================================================================ processes

def processes_per_node(args: argparse.Namespace) -> int:
    """--multiprocessing-distributed: one process per listed (or visible) GPU; 1 otherwise."""
    if not args.multiprocessing_distributed:
        return 1
    ids = du.parse_gpu_ids(args.gpu_ids)
    if ids:
        return len(ids)
    count = torch.cuda.device_count() if args.device != "cpu" else 0
    return max(count, 1)


def setup_process(args: argparse.Namespace, local_rank: int, nprocs: int) -> du.DistContext:
    """Join the process group the flags (or torchrun) describe; pick the device."""
    if args.multiprocessing_distributed:
        nodes = max(args.world_size, 1)
        node_rank = max(args.rank, 0)
        return du.setup_distributed(args.device, args.gpu_ids, args.dist_backend, args.dist_url,
                                    world_size=nodes * nprocs, rank=node_rank * nprocs + local_rank,
                                    local_rank=local_rank)
    gpu_ids = str(args.gpu) if args.gpu is not None else args.gpu_ids
    rank = args.rank
    if args.dist_url == "env://" and rank == -1:
        rank = int(os.environ.get("RANK", "0"))
    # One process per node here (torchrun's LOCAL_RANK, if any, takes precedence).
    return du.setup_distributed(args.device, gpu_ids, args.dist_backend, args.dist_url, args.world_size, rank,
                                local_rank=0)


def processes_on_this_node(args: argparse.Namespace, ctx: du.DistContext, nprocs: int) -> int:
    """How many processes share this node's --batch-size and --workers."""
    if not ctx.distributed:
        return 1
    if args.multiprocessing_distributed:
        return nprocs
    return int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))


def limit_cpu_threads(ctx: du.DistContext, node_procs: int) -> None:
    """Several CPU processes on one node share its cores instead of oversubscribing them."""
    if ctx.device.type == "cpu" and node_procs > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // node_procs))


def per_process(total: int, nprocs: int, flag: str) -> int:
    if total < nprocs:
        raise ConfigError(f"{flag} {total} is smaller than the {nprocs} processes of this node; raise it")
    return total // nprocs


def _worker_entry(local_rank: int, worker, args: argparse.Namespace, nprocs: int, codes) -> None:
    """Body of a spawned process: exit codes go through ``codes``; user errors are one line."""
    try:
        codes[local_rank] = worker(local_rank, args, nprocs) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        codes[local_rank] = err.exit_code
        sys.exit(err.exit_code)


def launch(worker, args: argparse.Namespace) -> int:
    """Run ``worker(local_rank, args, nprocs)`` in this process or in one spawned process per GPU.

    Returns the exit code (the largest of the workers'). A SIGTERM or SIGINT that reaches
    this parent process is passed on to the workers as SIGTERM: they finish their step,
    rank 0 saves, and the parent exits 130 after SIGINT, 0 after SIGTERM. (A Ctrl-C in a
    terminal reaches the workers directly too; Python runs their SIGINT handler first, so
    the forwarded SIGTERM does not count as a second Ctrl-C.)
    """
    nprocs = processes_per_node(args)
    if nprocs == 1 and not args.multiprocessing_distributed:
        return worker(0, args, 1) or 0
    codes = mp.get_context("spawn").Array("i", [0] * nprocs)
    context = mp.start_processes(_worker_entry, args=(worker, args, nprocs, codes), nprocs=nprocs,
                                 join=False, start_method="spawn")
    received: List[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for proc in context.processes:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as err:
        return max(err.exit_code if err.exit_code and err.exit_code > 0 else 1, max(codes[:]))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = max(codes[:])
    return 130 if signal.SIGINT in received and code == 0 else code


# ============================================================================ data

def build_train_loader(args: argparse.Namespace, ctx: du.DistContext, batch: int, workers: int,
                       sampler_seed: int) -> Tuple[torch.utils.data.DataLoader, ShuffledBatchSampler]:
    dataset = image_folder(args.data, "train", TwoCropsTransform(moco_augmentation(args.aug_plus, args.image_size)))
    global_batch = batch * ctx.world_size
    if len(dataset) < global_batch:
        raise ConfigError(f"{args.data}/train has {len(dataset)} images, fewer than one global batch "
                          f"({global_batch}); lower --batch-size")
    sampler = ShuffledBatchSampler(len(dataset), batch, ctx.rank, ctx.world_size, sampler_seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         pin_memory=ctx.device.type == "cuda", persistent_workers=False)
    return loader, sampler


def build_knn_loaders(args: argparse.Namespace, batch: int, workers: int):
    """(train loader, val loader, classes) of --knn-data, evaluation transform, fixed order."""
    transform = center_crop_transform(args.image_size)
    loaders = []
    for split in ("train", "val"):
        ds = image_folder(args.knn_data, split, transform)
        loaders.append(torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers))
    return loaders[0], loaders[1], len(loaders[0].dataset.classes)


# ============================================================================ kNN monitor

@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device: torch.device, max_batches: int = 0):
    """L2-normalised pooled features (M, F) and labels (M,) of ``loader``."""
    feats, labels = [], []
    for i, (images, targets) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        feats.append(F.normalize(pooled_features(encoder, images.to(device)).float(), dim=1).cpu())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def weighted_knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                         num_classes: int, k: int = 200, t: float = 0.1, chunk: int = 256) -> torch.Tensor:
    """InstDisc's weighted kNN: class votes sum exp(cos / t) over the k nearest train features.

    train_feats (M, F), test_feats (Q, F) normalised -> predicted classes (Q,).
    """
    k = min(k, train_feats.size(0))
    preds = []
    for start in range(0, test_feats.size(0), chunk):
        sim = test_feats[start:start + chunk] @ train_feats.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.size(0), num_classes)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / t).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(model: MoCoMCL, knn, device: torch.device, max_batches: int, k: int, t: float) -> List[float]:
    """Weighted kNN top-1 (%) of every query encoder on --knn-data val."""
    train_loader, val_loader, num_classes = knn
    result = []
    for encoder in model.encoders_q:
        was_training = encoder.training
        encoder.eval()
        tr_f, tr_y = extract_features(encoder, train_loader, device, max_batches)
        va_f, va_y = extract_features(encoder, val_loader, device, max_batches)
        encoder.train(was_training)
        pred = weighted_knn_predict(tr_f, tr_y, va_f, num_classes, k, t)
        result.append(100.0 * float((pred == va_y).float().mean()))
    return result


# ============================================================================ training

class GracefulStop(StopRequest):
    """StopRequest that keeps the first signal's name: a SIGTERM forwarded by the launcher
    after a terminal Ctrl-C does not turn the SIGINT (exit 130) into a SIGTERM (exit 0)."""

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGTERM and self.signum is not None:
            return
        super()._handle(signum, frame)


def decorrelate_ranks(ctx: du.DistContext) -> None:
    """After every rank restored rank 0's RNG states: derive a different stream per rank."""
    if ctx.world_size > 1:
        seed_everything(int(torch.randint(2 ** 31 - 1, ())) + ctx.rank)


class MocoRun:
    """Epoch loop of MoCo-MCL pre-training with exact checkpoints and graceful stop."""

    def __init__(self, args, ctx, model: MoCoMCL, ddp_model: nn.Module, optimizer, loader, sampler, knn,
                 logger: RunLogger, run_dir: str, meta: Dict[str, Any]) -> None:
        self.args, self.ctx = args, ctx
        self.model, self.ddp_model, self.optimizer = model, ddp_model, optimizer
        self.loader, self.sampler, self.knn = loader, sampler, knn
        self.logger, self.run_dir, self.meta = logger, run_dir, meta
        self.epoch, self.step = args.start_epoch, 0
        self.best_acc, self.best_epoch, self.finished = 0.0, -1, False
        self.meter, self.acc = SumMeter(), AccuracyCounter(model.number_net)
        self.elapsed, self.images = 0.0, 0
        self.stop = GracefulStop()

    # ----- checkpoints ----------------------------------------------------------
    @property
    def latest_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoint.pth.tar")

    def checkpoint(self) -> Dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **self.meta,
            "model": self.model.state_dict(), "heads": None, "optimizer": self.optimizer.state_dict(),
            "scaler": None, "epoch": self.epoch, "step": self.step, "finished": self.finished,
            "best_acc": self.best_acc, "best_epoch": self.best_epoch, "rng": capture_rng_state(),
            "sampler": {"seed": self.sampler.seed, "epoch": self.epoch, "start_batch": self.step},
            "meters": {"train": self.meter.state_dict(), "train_acc": self.acc.state_dict(),
                       "elapsed": self.elapsed, "images": self.images},
            "extra": {"queue_ptr": self.model.queue_ptr.tolist(),
                      "queues": "model['queue'] (N, moco_dim, moco_k), model['queue_ptr'] (N,)"},
        }

    def save(self) -> None:
        if self.ctx.is_main:
            atomic_save(self.checkpoint(), self.latest_path)

    def restore(self, ckpt: Dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.best_acc, self.best_epoch = float(ckpt["best_acc"]), int(ckpt["best_epoch"])
        meters = ckpt.get("meters") or {}
        if meters and self.step > 0:
            self.meter.load_state_dict(meters["train"])
            self.acc.load_state_dict(meters["train_acc"])
            self.elapsed, self.images = float(meters["elapsed"]), int(meters["images"])
        restore_rng_state(ckpt.get("rng"))
        decorrelate_ranks(self.ctx)

    # ----- one step -------------------------------------------------------------
    def train_step(self, im_q: torch.Tensor, im_k: torch.Tensor) -> Dict[str, float]:
        args = self.args
        queries, keys = self.ddp_model(im_q, im_k)
        # The losses read the queues as they were before this step's keys; enqueue comes after backward.
        terms = moco_mcl_losses(queries, keys, self.model.queue, args.moco_t, args.kd_T)
        loss = terms.vcl + terms.soft_vcl + terms.icl + terms.soft_icl
        values = torch.stack([loss.detach(), *(t.detach() for t in terms)]).float().tolist()
        named = dict(zip(TERMS, values))
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteLossError(f"non-finite loss at epoch {self.epoch} step {self.step}: {named}; "
                                     f"the latest good checkpoint is {self.latest_path}; lower --lr")
        logits = instance_logits(queries, keys, self.model.queue, args.moco_t)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.enqueue(keys)
        targets = torch.zeros(im_q.size(0), dtype=torch.long, device=im_q.device)
        self.acc.update(logits, targets)
        return named

    def train_epoch(self) -> bool:
        """Train the rest of ``self.epoch``; False when a signal stopped it."""
        args, ctx = self.args, self.ctx
        self.ddp_model.train()
        milestones = args.schedule
        lr = lr_at_epoch(self.epoch, args.lr, "cosine" if args.cos else "multistep", args.epochs, milestones)
        set_lr(self.optimizer, lr)
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start_batch(self.step)
        total = self.sampler.num_batches()
        if args.max_train_batches:
            total = min(total, args.max_train_batches)
        tic = time.perf_counter()
        for images, _ in itertools.islice(self.loader, max(total - self.step, 0)):
            im_q = images[0].to(ctx.device, non_blocking=True)
            im_k = images[1].to(ctx.device, non_blocking=True)
            named = self.train_step(im_q, im_k)
            self.meter.update(named, im_q.size(0))
            self.images += im_q.size(0) * ctx.world_size
            self.step += 1
            if ctx.is_main and (self.step % args.print_freq == 0 or self.step == 1):
                acc = 100.0 * self.acc.top1[0] / max(self.acc.total, 1)
                print(f"Epoch: [{self.epoch}][{self.step}/{total}] lr {lr:.5f} "
                      + " ".join(f"{k} {v:.4f}" for k, v in named.items()) + f" acc@1(net0) {acc:.2f}",
                      flush=True)
            if self.stop.agreed(ctx.device) is not None:
                self.elapsed += time.perf_counter() - tic
                self.save()
                return False
        self.elapsed += time.perf_counter() - tic
        return True

    # ----- epochs ---------------------------------------------------------------
    def reduced_train_record(self) -> Dict[str, Any]:
        n = self.model.number_net
        acc = self.acc
        sums = [self.meter.sums.get(k, 0.0) for k in TERMS]
        packed = torch.tensor(acc.top1 + acc.top5 + [acc.total] + sums + [self.meter.count], dtype=torch.float64,
                              device=self.ctx.device if self.ctx.device.type == "cuda" else "cpu")
        du.all_reduce_sum(packed)
        vals = packed.tolist()
        total = max(vals[2 * n], 1.0)
        count = max(vals[-1], 1.0)
        record = {k: vals[2 * n + 1 + i] / count for i, k in enumerate(TERMS)}
        record["top1"] = [100.0 * v / total for v in vals[:n]]
        record["top5"] = [100.0 * v / total for v in vals[n:2 * n]]
        return record

    def monitor(self) -> Optional[List[float]]:
        """kNN top-1 per network on rank 0 (the other ranks wait), or None without --knn-data."""
        if not self.args.knn_data:
            return None
        result = None
        if self.knn is not None:
            result = knn_top1(self.model, self.knn, self.ctx.device, self.args.max_eval_batches,
                              self.args.knn_k, self.args.knn_t)
        du.barrier()
        return result

    def end_epoch(self) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        train = self.reduced_train_record()
        knn = self.monitor()
        record = {"epoch": self.epoch, "epochs": self.args.epochs, "lr": lr, "time_s": self.elapsed,
                  "images_per_s": self.images / self.elapsed if self.elapsed > 0 else 0.0, "train": train}
        if knn is not None:
            if max(knn) > self.best_acc or self.best_epoch < 0:
                self.best_acc, self.best_epoch = max(knn), self.epoch
            record["knn"] = {"top1": knn}
            record.update(best_acc=self.best_acc, best_epoch=self.best_epoch)
        self.epoch += 1
        self.step = 0
        self.meter, self.acc = SumMeter(), AccuracyCounter(self.model.number_net)
        self.elapsed, self.images = 0.0, 0
        self.save()
        self.logger.log_epoch(record)
        self.logger.text(format_epoch(record))

    def fit(self) -> int:
        """Train to --epochs (or until a signal); returns the exit code."""
        self.logger.keep_epochs_before(self.epoch)
        self.stop.install()
        try:
            while self.epoch < self.args.epochs:
                if not self.train_epoch():
                    return self.stopped()
                self.end_epoch()
            self.finished = True
            self.save()
            if self.ctx.is_main:
                final = os.path.join(self.run_dir, f"checkpoint_{self.args.epochs - 1:04d}.pth.tar")
                atomic_save(self.checkpoint(), final)
                self.logger.write_summary(self.summary())
                self.logger.text(f"finished {self.args.epochs} epochs; encoders for main_lincls.py: {final}")
            return 0
        finally:
            self.stop.restore()
            self.logger.close()

    def stopped(self) -> int:
        name = signal.Signals(self.stop.signum or signal.SIGTERM).name
        if self.ctx.is_main:
            print(f"{name} received: saved {self.latest_path} at epoch {self.epoch + 1} step {self.step}. "
                  f"Resume with the same command plus --resume.", file=sys.stderr, flush=True)
        du.barrier()  # nobody leaves before rank 0 has saved
        return 130 if self.stop.signum == signal.SIGINT else 0

    def summary(self) -> Dict[str, Any]:
        from utils.logging import read_metrics

        records = read_metrics(self.logger.metrics_path)
        last = records[-1] if records else {}
        monitored = self.best_epoch >= 0  # best_acc is the kNN monitor's; none without --knn-data
        return {"finished": True, "epochs": self.args.epochs, "best_acc": self.best_acc if monitored else None,
                "best_epoch": self.best_epoch if monitored else None, "last_train": last.get("train"),
                "last_knn_top1": (last.get("knn") or {}).get("top1")}


def format_epoch(record: Dict[str, Any]) -> str:
    tr = record["train"]
    terms = " ".join(f"{k}={tr[k]:.4f}" for k in TERMS)
    acc = " ".join(f"{v:.2f}" for v in tr["top1"])
    line = (f"epoch {record['epoch'] + 1}/{record['epochs']} lr={record['lr']:.5f} {terms} | "
            f"instance top-1 [{acc}] | {record['time_s']:.1f}s {record['images_per_s']:.0f} img/s")
    if "knn" in record:
        line += " | kNN top-1 [" + " ".join(f"{v:.2f}" for v in record["knn"]["top1"]) + "]"
    return line


# ============================================================================ set-up

def load_resume_checkpoint(path: str, args: argparse.Namespace) -> Dict[str, Any]:
    """A main_moco_mcl.py checkpoint whose model has the shape this run builds."""
    ckpt = load_for_run(path, arch=args.arch, number_net=args.number_net)
    if ckpt.get("script") != "main_moco_mcl":
        raise CheckpointError(f"{path} was written by {ckpt.get('script')}.py, not main_moco_mcl.py")
    stored = ckpt.get("config") or {}
    for key in ("mlp", "moco_dim", "moco_k"):
        if key in stored and stored[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"{path} was trained with {flag} {stored[key]} but this run has "
                                  f"{getattr(args, key)}; pass the same {flag}")
    return ckpt


def prepare_run_dir(path: str) -> None:
    """Create the --checkpoint directory; ConfigError naming that flag when it is not writable."""
    try:
        ensure_writable_dir(path)
    except ConfigError:
        raise ConfigError(f"cannot write to {path}; pass a writable --checkpoint directory") from None


def sampler_seed_for(args: argparse.Namespace, ckpt: Optional[Dict[str, Any]]) -> int:
    """The data order's seed: --seed, else the resumed run's, else a fresh one shared by all ranks."""
    if ckpt is not None and (ckpt.get("sampler") or {}).get("seed") is not None:
        return int(ckpt["sampler"]["seed"])
    if args.seed is not None:
        return args.seed
    return int(du.broadcast_object(random.SystemRandom().randrange(2 ** 31)))


def run_config(args: argparse.Namespace, ctx: du.DistContext, batch: int) -> Dict[str, Any]:
    config = dict(vars(args))
    config.update(script="main_moco_mcl", world_size_total=ctx.world_size, batch_per_process=batch,
                  versions={"python": platform.python_version(), "torch": torch.__version__})
    return config


@torch.no_grad()
def broadcast_state(module: nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (key encoders and queues included)."""
    if du.world_size() > 1:
        for tensor in module.state_dict().values():
            torch.distributed.broadcast(tensor, src=0)


def worker(local_rank: int, args: argparse.Namespace, nprocs: int) -> int:
    ctx = setup_process(args, local_rank, nprocs)
    try:
        return train(args, ctx, nprocs)
    finally:
        du.cleanup()


def train(args: argparse.Namespace, ctx: du.DistContext, nprocs: int) -> int:
    configure_determinism(args.deterministic, ctx.device)
    node_procs = processes_on_this_node(args, ctx, nprocs)
    limit_cpu_threads(ctx, node_procs)
    batch = per_process(args.batch_size, node_procs, "--batch-size")
    workers = (args.workers + node_procs - 1) // node_procs
    check_queue_size(args.moco_k, batch * ctx.world_size)
    run_dir = args.checkpoint
    if ctx.is_main:
        prepare_run_dir(run_dir)
    resume_path = resolve_resume(args.resume, None, run_dir)
    ckpt = load_resume_checkpoint(resume_path, args) if resume_path else None
    if ckpt is not None and ckpt.get("finished") and int(ckpt["epoch"]) >= args.epochs:
        if ctx.is_main:
            print(f"{resume_path}: this run already finished its {ckpt['epoch']} epochs; nothing to do "
                  "(raise --epochs to train longer)")
        return 0
    if args.seed is not None:
        seed_everything(args.seed)
    model = MoCoMCL(args.arch, args.number_net, args.moco_dim, args.moco_k, args.moco_m, args.mlp,
                    rank=ctx.rank, world_size=ctx.world_size).to(ctx.device)
    broadcast_state(model)
    if args.seed is not None:
        seed_everything(args.seed + ctx.rank)  # same weights everywhere, different augmentations per rank
    ddp_model: nn.Module = model
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    loader, sampler = build_train_loader(args, ctx, batch, workers, sampler_seed_for(args, ckpt))
    knn = build_knn_loaders(args, batch, workers) if args.knn_data and ctx.is_main else None
    logger = RunLogger(run_dir, enabled=ctx.is_main)
    config = run_config(args, ctx, batch)
    meta = {"script": "main_moco_mcl", "config": config, "arch": args.arch, "number_net": args.number_net,
            "topology": "independent", "num_classes": args.moco_dim}
    run = MocoRun(args, ctx, model, ddp_model, optimizer, loader, sampler, knn, logger, run_dir, meta)
    if ckpt is not None:
        run.restore(ckpt)
    if ctx.is_main:
        logger.write_config(config)
        where = f"{ctx.world_size} processes, shuffled BN" if ctx.distributed else \
            f"{ctx.device}, one process (key batch not shuffled)"
        start = f"resuming {resume_path} at epoch {run.epoch + 1} step {run.step}" if ckpt else "starting"
        logger.text(f"MoCo-MCL: {args.number_net} x {args.arch}{' + MLP head' if args.mlp else ''}, "
                    f"K={args.moco_k}, m={args.moco_m}, T={args.moco_t}; {len(loader.dataset)} images, "
                    f"batch {batch} per process; {where}; run directory {run_dir}; {start}")
    return run.fit()


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    return launch(worker, args)


if __name__ == "__main__":
    run_main(main)
