"""Supervised Mutual Contrastive Learning on CIFAR-100 / CIFAR-10.

    python main_cifar.py --arch resnet32 --number-net 2 --alpha 0.1 --gamma 1. --beta 0.1 --lam 1.

trains MCL(x2) on CIFAR-100 as the paper did. Several processes:
``torchrun --nproc_per_node=K main_cifar.py ...`` (--batch-size stays the global batch).
"""
import argparse
import os
import platform
from typing import Any, Dict, List, Optional

import torch

import models
from models.cohort import parse_arch_names, resolve_topology
from data.pipeline import DATASETS, build_cifar_loaders, load_arrays
from losses.mcl import build_projection_heads
from utils import distributed as du
from utils.args import HelpFormatter, add_common_additions, add_original_training_args
from utils.checkpoint import load_checkpoint, seed_everything
from utils.cli import run_main
from utils.contrast import InBatchContrast
from utils.engine import (Batch, CohortWithHeads, LoopConfig, Objective, Precision, Trainer,
                          validate_precision)
from utils.errors import ConfigError
from utils.logging import RunLogger, ensure_writable_dir
from utils.run import (build_sgd, cohort_description, configure_determinism, default_run_name,
                       evaluate_saved_cohort, load_for_run, resolve_resume, run_in_process_group,
                       validate_cohort_args)

IMAGE_SHAPE = (1, 3, 32, 32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__ + "\nFaithful quirks of the original (kept on purpose): --tau defaults to 0.1 "
        "(the code since 2022-02; the paper era used 0.07); N != 2 builds the branched network; the "
        "in-batch ICL never treats the same image seen by the other network as a positive; an "
        "m-per-class epoch is len(train)/B independent batch draws (see --visit-all).",
        formatter_class=HelpFormatter)
    add_original_training_args(parser, data="./data/", dataset="cifar100",
                               dataset_help="cifar100, cifar10 (official pickle layout under --data) or synthetic "
                                            "(generated, no download)", arch="resnet32", weight_decay=5e-4,
                               lr_type="cosine", milestones=(150, 225), epochs=300, batch_size=128,
                               num_workers=8, tau=0.1)
    g = add_common_additions(parser)
    g.add_argument("--m-per-class", type=int, default=2,
                   help="images per class in a batch (the original's 2; CIFAR-10 at batch 128 needs e.g. 16)")
    g.add_argument("--visit-all", action="store_true",
                   help="visit every training image once per epoch while keeping m per class "
                        "(off: the original's independent batch draws)")
    g.add_argument("--data-path", default="pil", choices=("pil", "tensor"),
                   help="pil: the original's per-image PIL transforms in DataLoader workers; tensor: the "
                        "whole uint8 set on the device, augmented in batches (same pixels)")
    g.add_argument("--fast", action="store_true",
                   help="the fast path: --amp bf16 --channels-last --data-path tensor")
    g.add_argument("--synthetic-size", type=int, default=5000,
                   help="--dataset synthetic: training images (test: a fifth)")
    g.add_argument("--synthetic-classes", type=int, default=10, help="--dataset synthetic: classes")
    parser.set_defaults(dataset_choices=DATASETS)
    return parser


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.fast:
        args.amp = "bf16" if args.amp == "none" else args.amp
        args.channels_last = True
        args.data_path = "tensor"
    if args.dataset not in DATASETS:
        raise ConfigError(f"--dataset {args.dataset!r} is not one of {', '.join(DATASETS)}")
    validate_cohort_args(args.number_net, args.alpha, args.gamma, args.beta, args.lam, args.logit_distill)
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1 (got {args.epochs})")
    return args


def build_cohort(arch: str, number_net: int, num_classes: int, cohort: str):
    try:
        return models.build_cohort(arch, number_net, num_classes, cohort)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def cohort_topology(arch: str, number_net: int, cohort: str) -> str:
    """The topology the flags ask for (ConfigError for unknown names or impossible requests)."""
    return resolve_topology(cohort, parse_arch_names(arch, number_net))


def to_batch(raw, device: torch.device) -> Batch:
    inputs, targets = raw
    return Batch(inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True))


def run_config(args: argparse.Namespace, topology: str, num_classes: int, world_size: int) -> Dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k != "dataset_choices"}
    config.update(script="main_cifar", topology=topology, num_classes=num_classes, world_size=world_size,
                  versions={"python": platform.python_version(), "torch": torch.__version__})
    return config


def evaluate_checkpoint(args: argparse.Namespace, ctx: du.DistContext, path: str) -> int:
    """--evaluate: test top-1/top-5 of every network and of the ensemble of a saved run."""
    ckpt = load_checkpoint(path)
    data = load_arrays(args.dataset, args.data, args.synthetic_size, args.synthetic_classes)
    if ckpt["num_classes"] != data.num_classes:
        raise ConfigError(f"{path} was trained for {ckpt['num_classes']} classes but --dataset {args.dataset} "
                          f"has {data.num_classes}")
    eval_bs = args.eval_batch_size or 2 * args.batch_size
    _, test = build_cifar_loaders(data, path=args.data_path, batch_size=args.m_per_class, eval_batch_size=eval_bs,
                                  m_per_class=args.m_per_class, visit_all=False, seed=args.manual_seed,
                                  rank=ctx.rank, world_size=ctx.world_size, device=ctx.device,
                                  num_workers=args.num_workers, channels_last=args.channels_last)
    return evaluate_saved_cohort(ckpt, path, test, ctx.device, Precision(args.amp, args.channels_last), to_batch,
                                 args.max_eval_batches, f"{args.dataset} test images", ctx.is_main)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    return run_in_process_group(args.gpu_id, args.device, lambda ctx: train_or_evaluate(args, ctx))


def train_or_evaluate(args: argparse.Namespace, ctx: du.DistContext) -> int:
    validate_precision(args.amp, ctx.device)
    configure_determinism(args.deterministic, ctx.device)
    seed_everything(args.manual_seed)
    topology = cohort_topology(args.arch, args.number_net, args.cohort)
    run_name = args.run_name or default_run_name(args.dataset, args.arch, args.number_net, topology, args.alpha,
                                                 args.gamma, args.beta, args.lam, args.logit_distill,
                                                 args.manual_seed)
    run_dir = os.path.join(args.checkpoint_dir, run_name)
    if args.evaluate:
        return evaluate_checkpoint(args, ctx, args.evaluate_checkpoint or os.path.join(run_dir, "best.pth.tar"))
    if ctx.is_main:
        ensure_writable_dir(run_dir)
    resume_path = resolve_resume(args.resume, args.resume_checkpoint, run_dir)
    ckpt = None
    if resume_path is not None:
        ckpt = load_for_run(resume_path, arch=args.arch, number_net=args.number_net, topology=topology)
        if ckpt.get("finished"):
            if ctx.is_main:
                print(f"{resume_path}: this run already finished all {ckpt['config']['epochs']} epochs; nothing to do")
            return 0

    data = load_arrays(args.dataset, args.data, args.synthetic_size, args.synthetic_classes)
    if ckpt is not None and ckpt["num_classes"] != data.num_classes:
        raise ConfigError(f"{resume_path} was trained for {ckpt['num_classes']} classes but --dataset "
                          f"{args.dataset} has {data.num_classes}")
    seed_everything(args.manual_seed)
    cohort = build_cohort(args.arch, args.number_net, data.num_classes, args.cohort)
    objective = Objective(args.alpha, args.gamma, args.beta, args.lam, args.logit_distill, args.kd_T,
                          kd_all_students_when_two=True, kd_detach_ensemble=True)
    heads = build_projection_heads(cohort.feature_dims, args.feat_dim) if objective.uses_contrast else None
    model = CohortWithHeads(cohort, heads).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_sgd(model.parameters(), args.init_lr, args.weight_decay)

    eval_bs = args.eval_batch_size or 2 * args.batch_size
    train_data, test_data = build_cifar_loaders(
        data, path=args.data_path, batch_size=args.batch_size, eval_batch_size=eval_bs,
        m_per_class=args.m_per_class, visit_all=args.visit_all, seed=args.manual_seed, rank=ctx.rank,
        world_size=ctx.world_size, device=ctx.device, num_workers=args.num_workers,
        channels_last=args.channels_last)

    logger = RunLogger(run_dir, enabled=ctx.is_main)
    config = run_config(args, topology, data.num_classes, ctx.world_size)
    meta = {"script": "main_cifar", "config": config, "arch": args.arch, "number_net": args.number_net,
            "topology": topology, "num_classes": data.num_classes}
    loop = LoopConfig(epochs=args.epochs, init_lr=args.init_lr, lr_type=args.lr_type, milestones=args.milestones,
                      save_every_steps=args.save_every_steps, max_train_batches=args.max_train_batches,
                      max_eval_batches=args.max_eval_batches, progress=not args.no_progress)
    trainer = Trainer(model, optimizer, objective, InBatchContrast(args.tau, args.kd_T), train_data, test_data,
                      ctx, loop, Precision(args.amp, args.channels_last), logger, run_dir, meta, to_batch)
    if ckpt is not None:
        trainer.restore(ckpt)
    if ctx.is_main:
        logger.write_config(config)
        n_params, desc = cohort_description(cohort)
        madds = models.count_multiply_adds(cohort.eval(), IMAGE_SHAPE) / 1e9
        where = f"{ctx.world_size} processes" if ctx.distributed else str(ctx.device)
        start = (f"resuming {resume_path} at epoch {trainer.state.epoch + 1} step {trainer.state.step}"
                 if ckpt is not None else "starting")
        logger.text(f"{desc}: {n_params / 1e6:.2f}M parameters, {madds:.2f}G multiply-adds per image; "
                    f"{data.num_classes} classes, {len(data.train_labels)} train / {len(data.test_labels)} test "
                    f"images; {where}; run directory {run_dir}; {start}")
    return trainer.fit()


if __name__ == "__main__":
    run_main(main)
