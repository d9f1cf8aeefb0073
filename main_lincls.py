#!/usr/bin/env python
"""Linear evaluation of a pre-trained encoder (SPEC section 4): frozen backbone, fresh fc.

    python main_lincls.py -a resnet18 --lr 30.0 --batch-size 256 \\
        --pretrained ./checkpoint/checkpoint_0199.pth.tar \\
        --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 \\
        --gpu-ids 0,1,2,3,4,5,6,7

--pretrained takes a main_moco_mcl.py checkpoint (query encoder --net-index, default 0),
a main_imagenet.py checkpoint (network --net-index of the supervised cohort), or a
checkpoint of the original MoCo-MCL code ('state_dict' with module.encoder_q_<i>.*).
Everything but the fc is frozen and kept in eval mode (BatchNorm statistics too); the
fc is re-initialised with N(0, 0.01) weights and zero bias. After every epoch the
frozen weights are compared with the loaded ones (an error if any changed). Top-1 and
top-5 on --data/val each epoch; checkpoint.pth.tar (last) and best.pth.tar in
--checkpoint, plus config.json, metrics.jsonl and summary.json.
"""
import argparse
import itertools
import math
import os
import platform
import signal
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tv_models

from data.moco_aug import ShuffledBatchSampler, center_crop_transform, image_folder, linear_train_transform
from data.samplers import ShardedEvalSampler
from main_moco_mcl import (GracefulStop, add_distributed_args, add_smoke_args, broadcast_state,
                           decorrelate_ranks, launch, limit_cpu_threads, per_process, prepare_run_dir,
                           processes_on_this_node, setup_process)
from models.moco import encoder_names
from utils import distributed as du
from utils.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, atomic_save, capture_rng_state,
                              load_checkpoint, restore_rng_state, seed_everything)
from utils.cli import run_main
from utils.engine import NonFiniteLossError
from utils.errors import CheckpointError, ConfigError
from utils.logging import RunLogger
from utils.metrics import AccuracyCounter, SumMeter
from utils.run import configure_determinism, load_for_run, resolve_resume
from utils.schedule import lr_at_epoch, set_lr

DEFAULT_ARCH = "resnet50"
FC_KEYS = ("fc.weight", "fc.bias")


class FrozenWeightsChanged(RuntimeError):
    """A weight outside the fc changed during linear evaluation: a bug, not a user error."""


# ============================================================================ flags

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", metavar="DIR", default="./data/ImageNet/", type=str,
                        help="path to dataset (an ImageFolder with train/ and val/)")
    parser.add_argument("-a", "--arch", metavar="ARCH", default=None, choices=encoder_names(),
                        help="model architecture: " + " | ".join(encoder_names()) +
                             f" (default: the --pretrained checkpoint's, else {DEFAULT_ARCH})")
    parser.add_argument("-j", "--workers", default=32, type=int, metavar="N",
                        help="number of data loading workers (default: 32, split over the processes of a node)")
    parser.add_argument("--epochs", default=100, type=int, metavar="N", help="number of total epochs to run")
    parser.add_argument("--start-epoch", default=0, type=int, metavar="N",
                        help="manual epoch number (useful on restarts)")
    parser.add_argument("-b", "--batch-size", default=256, type=int, metavar="N",
                        help="mini-batch size (default: 256), the total over the processes of this node")
    parser.add_argument("--lr", "--learning-rate", default=30.0, type=float, metavar="LR",
                        help="initial learning rate", dest="lr")
    parser.add_argument("--schedule", default=[60, 80], nargs="*", type=int,
                        help="learning rate schedule (when to drop lr by 10x)")
    parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help="momentum")
    parser.add_argument("--wd", "--weight-decay", default=0.0, type=float, metavar="W",
                        help="weight decay (default: 0.)", dest="weight_decay")
    parser.add_argument("-p", "--print-freq", default=10, type=int, metavar="N", help="print frequency (default: 10)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="resume from PATH; alone: the latest checkpoint of --checkpoint (default: none)")
    parser.add_argument("-e", "--evaluate", dest="evaluate", action="store_true",
                        help="evaluate model on validation set")
    add_distributed_args(parser)
    parser.add_argument("--pretrained", default="", type=str, help="path to moco pretrained checkpoint")
    parser.add_argument("--checkpoint", default="./checkpoint/", type=str, help="run directory")
    add_smoke_args(parser)
    g = parser.add_argument_group("more additions")
    g.add_argument("--net-index", default=0, type=int,
                   help="which network of the pre-trained cohort to evaluate (0 = query encoder 0)")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    return parser


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for flag, value in {"--epochs": args.epochs, "--batch-size": args.batch_size,
                        "--print-freq": args.print_freq}.items():
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1 (got {value})")
    if args.net_index < 0:
        raise ConfigError(f"--net-index must be >= 0 (got {args.net_index})")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0 (got {args.workers})")
    return args


# ============================================================================ pre-trained weights

def _strip(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _cohort_member_state(model_state: Dict[str, torch.Tensor], index: int) -> Dict[str, torch.Tensor]:
    """Torchvision key names of network ``index`` of a main_imagenet.py cohort state."""
    state: Dict[str, torch.Tensor] = {}
    if any(k.startswith("nets.") for k in model_state):  # independent cohort
        net = _strip(model_state, f"nets.{index}.")
        for part in ("stem.", "branch."):
            state.update(_strip(net, part))
    else:  # branched cohort: shared stem, one branch per network
        state.update(_strip(model_state, "stem."))
        state.update(_strip(model_state, f"branches.{index}."))
    # torchvision-only architectures sit inside a TorchvisionBody as ``model.``
    return {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}


def _count_networks(ckpt: Dict[str, Any]) -> int:
    return int(ckpt.get("number_net") or 1)


def backbone_state(ckpt: Dict[str, Any], net_index: int,
                   path: str) -> Tuple[Dict[str, torch.Tensor], Optional[str], str]:
    """(torchvision state without fc, architecture or None, description) of one pre-trained network."""
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        script = ckpt.get("script")
        number_net = _count_networks(ckpt)
        if net_index >= number_net:
            raise ConfigError(f"--net-index {net_index} but {path} holds {number_net} networks (0..{number_net - 1})")
        archs = [a.strip() for a in str(ckpt.get("arch", "")).split(",") if a.strip()]
        arch = archs[net_index] if len(archs) == number_net else (archs[0] if archs else None)
        if script == "main_moco_mcl":
            state, what = _strip(ckpt["model"], f"encoders_q.{net_index}."), f"query encoder {net_index}"
        elif script == "main_imagenet":
            state, what = _cohort_member_state(ckpt["model"], net_index), f"supervised network {net_index}"
        else:
            raise CheckpointError(f"{path} was written by {script}.py; --pretrained takes a checkpoint of "
                                  "main_moco_mcl.py or main_imagenet.py")
    else:  # the original code's MoCo-MCL checkpoint
        if not isinstance(ckpt.get("state_dict"), dict):
            raise CheckpointError(f"{path} is neither a checkpoint of this project nor of the original MoCo-MCL code")
        prefix = f"module.encoder_q_{net_index}."
        state = _strip(ckpt["state_dict"], prefix)
        if not state:
            raise ConfigError(f"--net-index {net_index}: {path} has no {prefix}* weights")
        arch, what = ckpt.get("arch"), f"query encoder {net_index} (original code)"
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if not state:
        raise CheckpointError(f"{path} holds no weights for network {net_index}")
    return state, arch, what


def read_pretrained(path: str) -> Dict[str, Any]:
    """Our checkpoint format, or the original code's dict with a 'state_dict'."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--pretrained {path} does not exist; pass a checkpoint of main_moco_mcl.py")
    try:
        return load_checkpoint(path)
    except CheckpointError:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:
            raise CheckpointError(f"--pretrained {path} is truncated or not a checkpoint") from None
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise CheckpointError(f"--pretrained {path} is not a checkpoint of main_moco_mcl.py, "
                                  "main_imagenet.py or the original code") from None
        return ckpt


def load_backbone(model: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    """Load ``state`` into everything but the fc; CheckpointError when the shapes or names do not fit."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(f"{path} does not fit this architecture ({first}); pass the matching -a") from None
    missing = sorted(set(result.missing_keys) - set(FC_KEYS))
    if missing or result.unexpected_keys:
        bad = (missing + list(result.unexpected_keys))[:3]
        raise CheckpointError(f"{path} does not fit this architecture (e.g. {', '.join(bad)}); pass the matching -a")


# ============================================================================ the linear classifier

def reset_fc(model: nn.Module) -> None:
    """fc weight ~ N(0, 0.01), bias 0 (the original's)."""
    nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.fc.bias)


def freeze_all_but_fc(model: nn.Module) -> List[nn.Parameter]:
    """requires_grad only for fc.weight and fc.bias; returns those two."""
    for name, param in model.named_parameters():
        param.requires_grad_(name in FC_KEYS)
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2, "only fc.weight and fc.bias should be trainable"
    return trainable


def frozen_snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Copy (on CPU) of every state entry but the fc: parameters and BatchNorm buffers."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in FC_KEYS}


def check_frozen_unchanged(model: nn.Module, reference: Dict[str, torch.Tensor]) -> None:
    """FrozenWeightsChanged naming the first entry outside the fc that differs from ``reference``."""
    state = model.state_dict()
    for name, ref in reference.items():
        if not torch.equal(state[name].detach().cpu(), ref):
            raise FrozenWeightsChanged(f"{name} changed during linear classification; only the fc may change")


def build_classifier(arch: str, num_classes: int) -> nn.Module:
    model = tv_models.get_model(arch, weights=None, num_classes=num_classes)
    reset_fc(model)
    return model


# ============================================================================ loops

class LinearRun:
    """Epochs of fc training on a frozen backbone, evaluation, checkpoints, graceful stop."""

    def __init__(self, args, ctx, model, ddp_model, optimizer, train_loader, sampler, val_loader, reference,
                 logger: RunLogger, run_dir: str, meta: Dict[str, Any]) -> None:
        self.args, self.ctx = args, ctx
        self.model, self.ddp_model, self.optimizer = model, ddp_model, optimizer
        self.train_loader, self.sampler, self.val_loader = train_loader, sampler, val_loader
        self.reference = reference
        self.logger, self.run_dir, self.meta = logger, run_dir, meta
        self.epoch, self.step = args.start_epoch, 0
        self.best_acc, self.best_epoch, self.finished = 0.0, -1, False
        self.meter, self.acc = SumMeter(), AccuracyCounter(1)
        self.elapsed = 0.0
        self.stop = GracefulStop()

    @property
    def latest_path(self) -> str:
        return os.path.join(self.run_dir, "checkpoint.pth.tar")

    @property
    def best_path(self) -> str:
        return os.path.join(self.run_dir, "best.pth.tar")

    def checkpoint(self) -> Dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **self.meta,
            "model": self.model.state_dict(), "heads": None, "optimizer": self.optimizer.state_dict(),
            "scaler": None, "epoch": self.epoch, "step": self.step, "finished": self.finished,
            "best_acc": self.best_acc, "best_epoch": self.best_epoch, "rng": capture_rng_state(),
            "sampler": {"seed": self.sampler.seed, "epoch": self.epoch, "start_batch": self.step},
            "meters": {"train": self.meter.state_dict(), "train_acc": self.acc.state_dict(), "elapsed": self.elapsed},
            "extra": {"net_index": self.args.net_index, "pretrained": self.args.pretrained},
        }

    def save(self, path: Optional[str] = None) -> None:
        if self.ctx.is_main:
            atomic_save(self.checkpoint(), path or self.latest_path)

    def restore(self, ckpt: Dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.best_acc, self.best_epoch = float(ckpt["best_acc"]), int(ckpt["best_epoch"])
        meters = ckpt.get("meters") or {}
        if meters and self.step > 0:
            self.meter.load_state_dict(meters["train"])
            self.acc.load_state_dict(meters["train_acc"])
            self.elapsed = float(meters["elapsed"])
        restore_rng_state(ckpt.get("rng"))
        decorrelate_ranks(self.ctx)

    def train_epoch(self) -> bool:
        args, ctx = self.args, self.ctx
        # eval mode: linear evaluation must not touch BatchNorm statistics of the frozen backbone.
        self.ddp_model.eval()
        lr = lr_at_epoch(self.epoch, args.lr, "multistep", args.epochs, args.schedule)
        set_lr(self.optimizer, lr)
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start_batch(self.step)
        total = self.sampler.num_batches()
        if args.max_train_batches:
            total = min(total, args.max_train_batches)
        tic = time.perf_counter()
        for images, targets in itertools.islice(self.train_loader, max(total - self.step, 0)):
            images = images.to(ctx.device, non_blocking=True)
            targets = targets.to(ctx.device, non_blocking=True)
            logits = self.ddp_model(images)
            loss = F.cross_entropy(logits, targets)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise NonFiniteLossError(f"non-finite loss at epoch {self.epoch} step {self.step}; lower --lr "
                                         f"(latest good checkpoint: {self.latest_path})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.meter.update({"loss": value}, images.size(0))
            self.acc.update([logits.detach()], targets)
            self.step += 1
            if ctx.is_main and (self.step % args.print_freq == 0 or self.step == 1):
                print(f"Epoch: [{self.epoch}][{self.step}/{total}] lr {lr:.4f} loss {value:.4f}", flush=True)
            if self.stop.agreed(ctx.device) is not None:
                self.elapsed += time.perf_counter() - tic
                self.save()
                return False
        self.elapsed += time.perf_counter() - tic
        return True

    def end_epoch(self) -> None:
        check_frozen_unchanged(self.model, self.reference)
        lr = self.optimizer.param_groups[0]["lr"]
        train = reduce_counts(self.acc, self.meter, self.ctx)
        test = evaluate(self.model, self.val_loader, self.ctx, self.args.max_eval_batches)
        is_best = test["top1"][0] > self.best_acc or self.best_epoch < 0
        if is_best:
            self.best_acc, self.best_epoch = test["top1"][0], self.epoch
        record = {"epoch": self.epoch, "epochs": self.args.epochs, "lr": lr, "time_s": self.elapsed,
                  "train": train, "test": test, "best_single_top1": test["top1"][0],
                  "best_acc": self.best_acc, "best_epoch": self.best_epoch}
        self.epoch, self.step = self.epoch + 1, 0
        self.meter, self.acc, self.elapsed = SumMeter(), AccuracyCounter(1), 0.0
        self.save()
        if is_best:
            self.save(self.best_path)
        self.logger.log_epoch(record)
        self.logger.text(f"epoch {record['epoch'] + 1}/{record['epochs']} lr={lr:.4f} loss={train['loss']:.4f} | "
                         f"test top-1 {test['top1'][0]:.2f} top-5 {test['top5'][0]:.2f} | "
                         f"best {self.best_acc:.2f} (epoch {self.best_epoch + 1})")

    def fit(self) -> int:
        self.logger.keep_epochs_before(self.epoch)
        self.stop.install()
        try:
            while self.epoch < self.args.epochs:
                if not self.train_epoch():
                    return self.stopped()
                self.end_epoch()
            check_frozen_unchanged(self.model, self.reference)
            self.finished = True
            self.save()
            if self.ctx.is_main:
                self.logger.text("=> sanity check passed: no weight outside the fc changed")
                self.logger.write_summary(self.summary())
            return 0
        finally:
            self.stop.restore()
            self.logger.close()

    def stopped(self) -> int:
        name = signal.Signals(self.stop.signum or signal.SIGTERM).name
        if self.ctx.is_main:
            print(f"{name} received: saved {self.latest_path} at epoch {self.epoch + 1} step {self.step}. "
                  f"Resume with the same command plus --resume.", file=sys.stderr, flush=True)
        du.barrier()
        return 130 if self.stop.signum == signal.SIGINT else 0

    def summary(self) -> Dict[str, Any]:
        from utils.logging import read_metrics

        records = read_metrics(self.logger.metrics_path)
        last = records[-1]["test"] if records else {"top1": [None], "top5": [None]}
        return {"finished": True, "epochs": self.args.epochs, "best_acc": self.best_acc,
                "best_epoch": self.best_epoch, "last_top1": last["top1"], "last_top5": last["top5"],
                "last_mean_top1": last["top1"][0]}


def reduce_counts(acc: AccuracyCounter, meter: SumMeter, ctx: du.DistContext) -> Dict[str, Any]:
    """Training loss and top-1/top-5 summed over ranks."""
    packed = torch.tensor([acc.top1[0], acc.top5[0], acc.total, meter.sums.get("loss", 0.0), meter.count],
                          dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    du.all_reduce_sum(packed)
    top1, top5, total, loss_sum, count = packed.tolist()
    return {"loss": loss_sum / max(count, 1.0), "top1": [100.0 * top1 / max(total, 1.0)],
            "top5": [100.0 * top5 / max(total, 1.0)]}


@torch.no_grad()
def evaluate(model: nn.Module, loader, ctx: du.DistContext, max_batches: int = 0) -> Dict[str, Any]:
    """Top-1/top-5 (%) and mean loss over the whole val split (every rank evaluates its shard)."""
    model.eval()
    acc, meter = AccuracyCounter(1), SumMeter()
    for i, (images, targets) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        images, targets = images.to(ctx.device), targets.to(ctx.device)
        logits = model(images)
        meter.update({"loss": float(F.cross_entropy(logits, targets))}, images.size(0))
        acc.update([logits], targets)
    result = reduce_counts(acc, meter, ctx)
    return {"top1": result["top1"], "top5": result["top5"], "loss": result["loss"]}


# ============================================================================ set-up

def build_loaders(args, ctx, batch: int, workers: int, seed: int):
    train_set = image_folder(args.data, "train", linear_train_transform(args.image_size))
    val_set = image_folder(args.data, "val", center_crop_transform(args.image_size))
    if train_set.classes != val_set.classes:
        raise ConfigError(f"{args.data}/train and {args.data}/val have different class folders")
    sampler = ShuffledBatchSampler(len(train_set), batch, ctx.rank, ctx.world_size, seed, drop_last=False)
    pin = ctx.device.type == "cuda"
    train_loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=workers, pin_memory=pin)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch, num_workers=workers, pin_memory=pin,
                                             sampler=ShardedEvalSampler(len(val_set), ctx.rank, ctx.world_size))
    return train_loader, sampler, val_loader, len(train_set.classes)


def pretrained_backbone(args) -> Tuple[Optional[Dict[str, torch.Tensor]], str, str]:
    """(backbone state or None, architecture, description) from --pretrained, -a and --net-index."""
    pre_arch, state, what = None, None, "random weights (no --pretrained)"
    if args.pretrained:
        ckpt = read_pretrained(args.pretrained)
        state, pre_arch, what = backbone_state(ckpt, args.net_index, args.pretrained)
        what = f"{what} of {args.pretrained}"
    if args.arch and pre_arch and args.arch != pre_arch:
        raise CheckpointError(f"--pretrained {args.pretrained} holds a {pre_arch} but -a is {args.arch}; "
                              f"pass -a {pre_arch} (or drop -a)")
    return state, args.arch or pre_arch or DEFAULT_ARCH, what


def prepare_model(arch: str, state: Optional[Dict[str, torch.Tensor]], num_classes: int, path: str) -> nn.Module:
    """Classifier with the pre-trained backbone loaded and a fresh fc."""
    model = build_classifier(arch, num_classes)
    if state is not None:
        load_backbone(model, state, path)
    return model


def worker(local_rank: int, args: argparse.Namespace, nprocs: int) -> int:
    ctx = setup_process(args, local_rank, nprocs)
    try:
        return run(args, ctx, nprocs)
    finally:
        du.cleanup()


def run(args: argparse.Namespace, ctx: du.DistContext, nprocs: int) -> int:
    configure_determinism(args.deterministic, ctx.device)
    node_procs = processes_on_this_node(args, ctx, nprocs)
    limit_cpu_threads(ctx, node_procs)
    batch = per_process(args.batch_size, node_procs, "--batch-size")
    workers = (args.workers + node_procs - 1) // node_procs
    run_dir = args.checkpoint
    if ctx.is_main and not args.evaluate:
        prepare_run_dir(run_dir)
    seed = args.seed if args.seed is not None else 0
    seed_everything(seed)
    resume_path = resolve_resume(args.resume, None, run_dir)
    ckpt = load_for_run(resume_path) if resume_path else None
    if ckpt is not None and ckpt.get("script") != "main_lincls":
        raise ConfigError(f"--resume {resume_path} is not a main_lincls.py checkpoint (use --pretrained for encoders)")
    if ckpt is not None and ckpt.get("finished") and int(ckpt["epoch"]) >= args.epochs and not args.evaluate:
        if ctx.is_main:
            print(f"{resume_path}: this run already finished its {ckpt['epoch']} epochs; nothing to do")
        return 0
    state, arch, what = pretrained_backbone(args)
    train_loader, sampler, val_loader, num_classes = build_loaders(args, ctx, batch, workers, seed)
    model = prepare_model(arch, state, num_classes, args.pretrained)
    if ckpt is not None and (ckpt.get("arch") != arch or ckpt.get("num_classes") != num_classes):
        raise CheckpointError(f"{resume_path} is a {ckpt.get('arch')} with {ckpt.get('num_classes')} classes; "
                              f"this run has {arch} with {num_classes}")
    model = model.to(ctx.device)
    broadcast_state(model)
    reference = frozen_snapshot(model)
    params = freeze_all_but_fc(model)
    ddp_model: nn.Module = model
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    optimizer = torch.optim.SGD(params, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    logger = RunLogger(run_dir, enabled=ctx.is_main and not args.evaluate)
    config = dict(vars(args), script="main_lincls", arch=arch, num_classes=num_classes,
                  versions={"python": platform.python_version(), "torch": torch.__version__})
    meta = {"script": "main_lincls", "config": config, "arch": arch, "number_net": 1,
            "topology": "independent", "num_classes": num_classes, "net_index": args.net_index}
    runner = LinearRun(args, ctx, model, ddp_model, optimizer, train_loader, sampler, val_loader, reference,
                       logger, run_dir, meta)
    if ckpt is not None:
        runner.restore(ckpt)
        if not args.pretrained:  # random backbone: the reference is the one the run has trained with
            runner.reference = frozen_snapshot(model)
    if args.evaluate:
        result = evaluate(model, val_loader, ctx, args.max_eval_batches)
        if ctx.is_main:
            print(f" * Acc@1 {result['top1'][0]:.3f} Acc@5 {result['top5'][0]:.3f} ({arch}, {what})")
        return 0
    if ctx.is_main:
        logger.write_config(config)
        start = f"resuming {resume_path} at epoch {runner.epoch + 1} step {runner.step}" if ckpt else "starting"
        logger.text(f"linear evaluation of {arch}: {what}; {num_classes} classes, {len(train_loader.dataset)} train / "
                    f"{len(val_loader.dataset)} val images; batch {batch} per process x {ctx.world_size}; "
                    f"run directory {run_dir}; {start}")
    return runner.fit()


def main(argv: Optional[List[str]] = None) -> int:
    return launch(worker, parse_args(argv))


if __name__ == "__main__":
    run_main(main)
