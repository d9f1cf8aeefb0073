"""Supervised Mutual Contrastive Learning on CIFAR-100 / CIFAR-10.

    python main_cifar.py --arch resnet32 --number-net 2 --alpha 0.1 --gamma 1. --beta 0.1 --lam 1.

trains MCL(x2) on CIFAR-100 as the paper did; ``--method lmcl`` trains L-MCL (layer-wise MCL with
meta-learned weights, Yang et al., TPAMI 2023) with the authors' defaults. Several processes:
``torchrun --nproc_per_node=K main_cifar.py ...`` (--batch-size stays the global batch).
"""
import argparse
import os
import platform
from dataclasses import replace
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from data.pipeline import (CIFAR_SIZE, DATASETS, ArrayData, build_cifar_eval_loader, build_cifar_loaders,
                           class_balanced_subset, decode_if_it_fits, folder_stats, load_arrays, open_folder_data)
from models.init_from import parse_init_from
from utils import distributed as du
from utils.args import (LMCL_CIFAR_DEFAULTS, HelpFormatter, add_common_additions, add_lmcl_args,
                        add_original_training_args, apply_fast, apply_method_defaults, local_processes,
                        parse_flags)
from utils.cli import run_main
from utils.contrast import InBatchContrast
from utils.errors import ConfigError
from utils.lmcl_method import LayerInBatchContrast
from utils.lmcl_setup import build_lmcl, lmcl_description, lmcl_loop, validate_lmcl_args
from utils.precision import Precision
from utils.run_files import RunLogger
from utils.script_setup import (RunPlan, build_model_and_optimizer, check_resume_classes, evaluate_saved_cohort,
                       load_for_evaluation, run_supervised, SupervisedEntry, start_description, supervised_loop,
                       validate_cohort_args)
from utils.supervised import Objective

SCRIPT = "main_cifar"

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__ + "\nFaithful quirks of the original (kept on purpose): --tau defaults to 0.1 "
        "(the code since 2022-02; the paper era used 0.07); N != 2 builds the branched network; the "
        "in-batch ICL never treats the same image seen by the other network as a positive; an "
        "m-per-class epoch is len(train)/B independent batch draws (see --visit-all).",
        formatter_class=HelpFormatter)
    add_original_training_args(parser, data="./data/", dataset="cifar100",
                               dataset_help="cifar100, cifar10 (official pickle layout under --data), synthetic "
                                            "(generated, no download) or folder (any image folder: --data DIR with "
                                            "train/<class>/<images> and val/ or test/)", arch="resnet32",
                               weight_decay=5e-4,
                               lr_type="cosine", milestones=(150, 225), epochs=300, batch_size=128,
                               num_workers=8, tau=0.1)
    g = add_common_additions(parser, fast_help="the fast path: --amp bf16 --channels-last --data-path tensor")
    g.add_argument("--m-per-class", type=int, default=2,
                   help="images per class in a batch (the original's 2; CIFAR-10 at batch 128 needs e.g. 16)")
    g.add_argument("--visit-all", action="store_true",
                   help="visit every training image once per epoch while keeping m per class "
                        "(off: the original's independent batch draws)")
    g.add_argument("--data-path", default="pil", choices=("pil", "tensor"),
                   help="pil: the original's per-image PIL transforms in DataLoader workers; tensor: the "
                        "whole uint8 set on the device, augmented in batches (same pixels; --dataset folder "
                        "decodes its images once for it when they fit in half the free memory, else says so "
                        "and takes pil)")
    g.add_argument("--image-size", type=int, default=None,
                   help="side S of the square images of --dataset folder and synthetic (default 32): a folder's "
                        "images get their shorter side resized to S and a center crop; random crops pad by S/8")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="M",
                   help="per-channel normalisation mean, 3 values in [0, 1] (default: CIFAR's usual values, or "
                        "for --dataset folder computed from the training images once and cached in the run "
                        "directory's normalization.json)")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="S",
                   help="per-channel normalisation standard deviation, 3 values (default: as --mean)")
    g.add_argument("--train-per-class", type=int, default=0,
                   help="train on the first N images of each class only (a class-balanced subset, the same "
                        "for every seed; the test set stays whole); 0 = the whole training set")
    g.add_argument("--synthetic-size", type=int, default=5000,
                   help="--dataset synthetic: training images (test: a fifth)")
    g.add_argument("--synthetic-classes", type=int, default=10, help="--dataset synthetic: classes")
    g.add_argument("--synthetic-test-size", type=int, default=None,
                   help="--dataset synthetic: test images (default: a fifth of --synthetic-size)")
    add_lmcl_args(parser, meta_freq=50, defaults=LMCL_CIFAR_DEFAULTS, memory=False)
    parser.set_defaults(dataset_choices=DATASETS)
    return parser


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parse_flags(parser, argv)
    apply_method_defaults(args, parser, argv, LMCL_CIFAR_DEFAULTS)
    apply_fast(args)
    if args.fast:
        args.data_path = "tensor"
    if args.dataset not in DATASETS:
        raise ConfigError(f"--dataset {args.dataset!r} is not one of {', '.join(DATASETS)}")
    if args.method == "lmcl":
        validate_lmcl_args(args)
    else:
        validate_cohort_args(args.number_net, args.alpha, args.gamma, args.beta, args.lam, args.logit_distill)
    parse_init_from(args.init_from, args.number_net)
    if args.image_size not in (None, CIFAR_SIZE) and args.dataset in ("cifar100", "cifar10"):
        raise ConfigError(f"--image-size {args.image_size}: {args.dataset} images are 32 x 32; --image-size is for "
                          "--dataset folder and synthetic")
    for flag, values in (("--mean", args.mean), ("--std", args.std)):
        if values is not None and len(values) != 3:
            raise ConfigError(f"{flag} takes 3 values, one per colour channel (R G B); got {len(values)}")
    return args


def run_config(args: argparse.Namespace, topology: str, data: ArrayData, world_size: int) -> Dict[str, Any]:
    config = {k: v for k, v in vars(args).items() if k != "dataset_choices"}
    config.update(script=SCRIPT, topology=topology, num_classes=data.num_classes, world_size=world_size,
                  normalization={"mean": list(data.mean), "std": list(data.std)},
                  versions={"python": platform.python_version(), "torch": torch.__version__})
    return config


def load_data(args: argparse.Namespace, ctx: du.DistContext, run_dir: str, recorded: Optional[Dict[str, Any]] = None,
              train: bool = True) -> ArrayData:
    """The training and test data --dataset names, normalised by --mean/--std, else by ``recorded`` (the
    normalisation a checkpoint was trained with), else by the data set's own values (computed from
    a folder's training images once, cached in ``run_dir``). Only the test split is decoded for the
    tensor path when not ``train``; a folder too large for it switches --data-path to pil."""
    say = print if ctx.is_main else (lambda line: None)
    size = args.image_size or CIFAR_SIZE
    if args.dataset == "folder":
        data = open_folder_data(args.data, size)
    else:
        data = load_arrays(args.dataset, args.data, args.synthetic_size, args.synthetic_classes,
                           synthetic_test_size=args.synthetic_test_size, image_size=size)
    if args.train_per_class:
        data = class_balanced_subset(data, args.train_per_class)
    if args.dataset == "folder" and args.data_path == "tensor":
        data = decode_if_it_fits(data, ctx.device, local_processes(), args.num_workers, say, train=train)
        if not isinstance(data.test_images, np.ndarray):
            args.data_path = "pil"
    mean, std = data.mean, data.std
    if recorded:
        mean, std = tuple(recorded["mean"]), tuple(recorded["std"])
    elif args.dataset == "folder" and (args.mean is None or args.std is None):
        mean, std = folder_stats(data, args.num_workers, run_dir, say, write_cache=ctx.is_main)
    return replace(data, mean=tuple(args.mean or mean), std=tuple(args.std or std))


def evaluate_checkpoint(args: argparse.Namespace, ctx: du.DistContext, path: str) -> int:
    """--evaluate: test top-1/top-5 of every network and of the ensemble of a saved run."""
    ckpt = load_for_evaluation(path, SCRIPT, "--evaluate-checkpoint" if args.evaluate_checkpoint else "--evaluate")
    recorded = (ckpt.get("config") or {}).get("normalization")
    data = load_data(args, ctx, os.path.dirname(os.path.abspath(path)), recorded, train=False)
    if ckpt["num_classes"] != data.num_classes:
        raise ConfigError(f"{path} was trained for {ckpt['num_classes']} classes but --dataset {args.dataset} "
                          f"has {data.num_classes}")
    eval_bs = args.eval_batch_size or 2 * args.batch_size
    test = build_cifar_eval_loader(data, path=args.data_path, eval_batch_size=eval_bs, rank=ctx.rank,
                                   world_size=ctx.world_size, device=ctx.device, num_workers=args.num_workers,
                                   channels_last=args.channels_last)
    return evaluate_saved_cohort(ckpt, path, test, ctx.device, Precision(args.amp, args.channels_last),
                                 args.max_eval_batches, f"{args.dataset} test images", ctx.is_main,
                                 progress=not args.no_progress)


def main(argv: Optional[List[str]] = None) -> int:
    return run_supervised(parse_args(argv), SupervisedEntry(SCRIPT, build_parser, train, evaluate_checkpoint),
                          argv)


def build_loaders(args: argparse.Namespace, ctx: du.DistContext, data: ArrayData):
    return build_cifar_loaders(
        data, path=args.data_path, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size or 2 * args.batch_size,
        m_per_class=args.m_per_class, visit_all=args.visit_all, seed=args.manual_seed, rank=ctx.rank,
        world_size=ctx.world_size, device=ctx.device, num_workers=args.num_workers,
        channels_last=args.channels_last)


def train(args: argparse.Namespace, ctx: du.DistContext, plan: RunPlan) -> int:
    recorded = (plan.ckpt.get("config") or {}).get("normalization") if plan.ckpt is not None else None
    data = load_data(args, ctx, plan.run_dir, recorded)
    check_resume_classes(plan, data.num_classes, f"--dataset {args.dataset}")
    if args.method == "lmcl":
        return train_lmcl(args, ctx, plan, data)
    objective = Objective.from_flags(args)
    cohort, model, optimizer = build_model_and_optimizer(args, data.num_classes, objective.uses_contrast, ctx.device,
                                                         resuming=plan.ckpt is not None)
    train_data, test_data = build_loaders(args, ctx, data)

    logger = RunLogger(plan.run_dir, enabled=ctx.is_main, wandb_project=args.wandb)
    config = run_config(args, plan.topology, data, ctx.world_size)
    meta = {"script": SCRIPT, "config": config, "arch": args.arch, "number_net": args.number_net,
            "topology": plan.topology, "num_classes": data.num_classes}
    loop = supervised_loop(args, ctx, plan, model, optimizer, objective, InBatchContrast(args.tau, args.kd_T),
                           train_data, test_data, logger, meta)
    if ctx.is_main:
        logger.write_config(config)
        logger.text(f"{start_description(cohort, data.image_size, ctx, plan.run_dir, plan, loop)}; {data.num_classes} "
                    f"classes, {len(data.train_labels)} train / {len(data.test_labels)} test images")
    return loop.fit()


def train_lmcl(args: argparse.Namespace, ctx: du.DistContext, plan: RunPlan, data: ArrayData) -> int:
    """--method lmcl: L-MCL with the in-batch layer-wise contrast."""
    cohort, model, weight_net, optimizer, weight_optimizer = build_lmcl(args, data.num_classes, ctx.device)
    train_data, test_data = build_loaders(args, ctx, data)
    logger = RunLogger(plan.run_dir, enabled=ctx.is_main, wandb_project=args.wandb)
    config = run_config(args, plan.topology, data, ctx.world_size)
    meta = {"script": SCRIPT, "config": config, "arch": args.arch, "number_net": args.number_net,
            "topology": plan.topology, "num_classes": data.num_classes}
    loop = lmcl_loop(args, ctx, plan, model, weight_net, optimizer, weight_optimizer,
                     LayerInBatchContrast(args.tau, args.kd_T), train_data, test_data, logger, meta)
    if ctx.is_main:
        logger.write_config(config)
        logger.text(f"{start_description(cohort, data.image_size, ctx, plan.run_dir, plan, loop)}; {data.num_classes} "
                    f"classes, {len(data.train_labels)} train / {len(data.test_labels)} test images; "
                    f"{lmcl_description(model, weight_net)}")
    return loop.fit()


if __name__ == "__main__":
    run_main(main)
