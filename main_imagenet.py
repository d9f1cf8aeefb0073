"""Supervised Mutual Contrastive Learning on ImageNet with memory banks.

    python main_imagenet.py --arch resnet18 --number-net 2 --alpha 0.1 --gamma 1. --beta 0.1 --lam 1.

trains MCL(x2) on ./data/ImageNet/{train,val} as the paper did; ``--method lmcl`` trains L-MCL
(layer-wise MCL with meta-learned weights against memory banks, Yang et al., TPAMI 2023) with the
authors' defaults. Several processes:
``torchrun --nproc_per_node=K main_imagenet.py ...`` (--batch-size stays the global batch;
the memory banks are kept identical on every process).
"""
import argparse
import platform
from typing import Any, Dict, List, Optional

import torch

from data.imagenet_loader import TrainSetInfo, build_train_data, build_val_loader, check_same_classes
from models.init_from import parse_init_from
from utils import distributed as du
from utils.args import (LMCL_IMAGENET_DEFAULTS, HelpFormatter, add_common_additions, add_lmcl_args,
                        add_original_training_args, apply_fast, apply_method_defaults, parse_flags)
from utils.cli import run_main
from utils.contrast import MemoryContrast
from utils.errors import CheckpointError, ConfigError, DatasetError
from utils.lmcl_method import LayerMemoryContrast
from utils.lmcl_setup import build_lmcl, lmcl_description, lmcl_loop, validate_lmcl_args
from utils.precision import Precision
from utils.run_files import RunLogger
from utils.script_setup import (RunPlan, build_model_and_optimizer, check_resume_classes, evaluate_saved_cohort,
                       load_for_evaluation, run_supervised, SupervisedEntry, start_description, supervised_loop,
                       validate_cohort_args)
from utils.supervised import Objective

SCRIPT = "main_imagenet"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__ + "\nFaithful to the original: --logit-distill distils the ensemble into the LAST "
        "network only, and the ensemble is NOT detached (gradient also flows through the teacher side; "
        "--detach-ensemble changes that); N != 2 builds the branched network (--cohort).",
        formatter_class=HelpFormatter)
    add_original_training_args(parser, data="./data/ImageNet/", dataset="ImageNet",
                               dataset_help="name used in the run directory (the data are read from --data)",
                               arch="resnet18",
                               weight_decay=1e-4, lr_type="multistep", milestones=(30, 60, 90), epochs=90,
                               batch_size=256, num_workers=16, tau=0.07)
    g = parser.add_argument_group("flags of the original (ImageNet only)")
    g.add_argument("--rep-dim", default=1024, type=int,
                   help="accepted for compatibility and ignored: the heads take each network's real feature size "
                        "(the original overwrote this flag the same way)")
    g.add_argument("--pos_k", default=1, type=int, help="positives per sample drawn from its class (besides itself)")
    g.add_argument("--neg_k", default=8192, type=int,
                   help="negatives per sample drawn from other classes (4096 works as well and halves the "
                        "gathered memory rows)")
    g.add_argument("--nce_m", default=0.5, type=float, help="momentum of the memory-bank update")
    a = add_common_additions(parser)
    a.add_argument("--image-size", type=int, default=224,
                   help="training crop and evaluation crop size (evaluation resizes to size*256/224 first)")
    a.add_argument("--detach-ensemble", action="store_true",
                   help="detach the ensemble in --logit-distill (off: the original's ImageNet script lets the "
                        "gradient flow through the ensemble; its CIFAR script detaches)")
    add_lmcl_args(parser, meta_freq=500, defaults=LMCL_IMAGENET_DEFAULTS, memory=True)
    # Checkpoints hold the memory banks (N x 1.28M x 128 floats on ImageNet-1k, 0.66 GB per
    # network): save mid-epoch every 1000 steps rather than the CIFAR script's 100.
    parser.set_defaults(save_every_steps=1000)
    return parser


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parse_flags(parser, argv)
    apply_method_defaults(args, parser, argv, LMCL_IMAGENET_DEFAULTS)
    apply_fast(args)
    if args.method == "lmcl":
        validate_lmcl_args(args)
    else:
        validate_cohort_args(args.number_net, args.alpha, args.gamma, args.beta, args.lam, args.logit_distill)
    parse_init_from(args.init_from, args.number_net)
    return args


def check_contrast_data(info: TrainSetInfo, pos_k: int) -> None:
    """The memory-bank contrast needs negatives (2+ classes) and pos_k other images per class."""
    if info.num_classes < 2:
        raise DatasetError("the training set has a single class; the contrastive terms need at least two "
                           "(or set --alpha --gamma --beta --lam to 0)")
    smallest = min(range(info.num_classes), key=lambda c: info.class_counts[c])
    if info.class_counts[smallest] < pos_k + 1:
        raise ConfigError(f"class {info.classes[smallest]!r} has {info.class_counts[smallest]} training images but "
                          f"--pos_k {pos_k} needs {pos_k + 1} per class (the sample and {pos_k} others); "
                          f"lower --pos_k or add images")


def check_banks_fit(ckpt: Dict[str, Any], path: str, n_data: int) -> None:
    state = (ckpt.get("extra") or {}).get("contrast") or {}
    bank = state.get("memory_0")
    if bank is not None and bank.shape[0] != n_data:
        raise CheckpointError(f"{path} holds memory banks for {bank.shape[0]} training images but --data has "
                              f"{n_data}; resume with the training set of that run")


def run_config(args: argparse.Namespace, topology: str, info: TrainSetInfo, world_size: int) -> Dict[str, Any]:
    config = dict(vars(args))
    config.update(topology=topology, num_classes=info.num_classes, n_data=info.n_data, world_size=world_size,
                  versions={"python": platform.python_version(), "torch": torch.__version__})
    return config


def evaluate_checkpoint(args: argparse.Namespace, ctx: du.DistContext, path: str) -> int:
    """--evaluate: val top-1/top-5 of every network and of the ensemble of a saved run."""
    ckpt = load_for_evaluation(path, SCRIPT, "--evaluate-checkpoint" if args.evaluate_checkpoint else "--evaluate")
    eval_bs = args.eval_batch_size or 2 * args.batch_size
    val, classes = build_val_loader(args.data, image_size=args.image_size, batch_size=eval_bs, rank=ctx.rank,
                                    world_size=ctx.world_size, num_workers=args.num_workers, device=ctx.device)
    if ckpt["num_classes"] != len(classes):
        raise ConfigError(f"{path} was trained for {ckpt['num_classes']} classes but {args.data}/val has "
                          f"{len(classes)}")
    return evaluate_saved_cohort(ckpt, path, val, ctx.device, Precision(args.amp, args.channels_last),
                                 args.max_eval_batches, f"validation images of {args.data}", ctx.is_main,
                                 progress=not args.no_progress)


def main(argv: Optional[List[str]] = None) -> int:
    return run_supervised(parse_args(argv), SupervisedEntry(SCRIPT, build_parser, train, evaluate_checkpoint),
                          argv)


def train(args: argparse.Namespace, ctx: du.DistContext, plan: RunPlan) -> int:
    objective = Objective.from_flags(args, imagenet=True)
    uses_contrast = objective.uses_contrast or args.method == "lmcl"
    train_data, info = build_train_data(
        args.data, image_size=args.image_size, batch_size=args.batch_size, pos_k=args.pos_k,
        neg_k=args.neg_k if uses_contrast else 0, seed=args.manual_seed, rank=ctx.rank,
        world_size=ctx.world_size, num_workers=args.num_workers, device=ctx.device,
        progress=not args.no_progress and ctx.is_main)
    eval_bs = args.eval_batch_size or 2 * args.batch_size
    val_data, val_classes = build_val_loader(args.data, image_size=args.image_size, batch_size=eval_bs,
                                             rank=ctx.rank, world_size=ctx.world_size,
                                             num_workers=args.num_workers, device=ctx.device)
    check_same_classes(info.classes, val_classes, args.data)
    if uses_contrast:
        check_contrast_data(info, args.pos_k)
    check_resume_classes(plan, info.num_classes, args.data)
    if plan.ckpt is not None:
        check_banks_fit(plan.ckpt, plan.resume_path, info.n_data)
    if args.method == "lmcl":
        return train_lmcl(args, ctx, plan, info, train_data, val_data)

    cohort, model, optimizer = build_model_and_optimizer(args, info.num_classes, objective.uses_contrast, ctx.device,
                                                         resuming=plan.ckpt is not None)
    contrast = None
    if objective.uses_contrast:
        contrast = MemoryContrast(args.number_net, info.n_data, args.feat_dim, args.tau, args.kd_T, args.nce_m,
                                  seed=args.manual_seed).to(ctx.device)

    logger = RunLogger(plan.run_dir, enabled=ctx.is_main, wandb_project=args.wandb)
    config = run_config(args, plan.topology, info, ctx.world_size)
    meta = {"script": SCRIPT, "config": config, "arch": args.arch, "number_net": args.number_net,
            "topology": plan.topology, "num_classes": info.num_classes}
    loop = supervised_loop(args, ctx, plan, model, optimizer, objective, contrast, train_data, val_data, logger,
                           meta)
    if ctx.is_main:
        logger.write_config(config)
        banks = ""
        if contrast is not None:
            size = args.number_net * info.n_data * args.feat_dim * 4 / 2 ** 20
            banks = f"; memory banks {args.number_net} x {info.n_data} x {args.feat_dim} ({size:.1f} MiB)"
        logger.text(f"{start_description(cohort, args.image_size, ctx, plan.run_dir, plan, loop)}; "
                    f"{info.num_classes} classes, {info.n_data} train / {len(val_data.dataset)} val images{banks}")
    return loop.fit()


def train_lmcl(args: argparse.Namespace, ctx: du.DistContext, plan: RunPlan, info: TrainSetInfo, train_data: Any,
               val_data: Any) -> int:
    """--method lmcl: L-MCL against one memory bank per network."""
    cohort, model, weight_net, optimizer, weight_optimizer = build_lmcl(args, info.num_classes, ctx.device)
    contrast = LayerMemoryContrast(args.number_net, info.n_data, args.feat_dim, args.tau, args.kd_T, args.nce_m,
                                   args.vcl_partner_memory, seed=args.manual_seed).to(ctx.device)
    logger = RunLogger(plan.run_dir, enabled=ctx.is_main, wandb_project=args.wandb)
    config = run_config(args, plan.topology, info, ctx.world_size)
    meta = {"script": SCRIPT, "config": config, "arch": args.arch, "number_net": args.number_net,
            "topology": plan.topology, "num_classes": info.num_classes}
    loop = lmcl_loop(args, ctx, plan, model, weight_net, optimizer, weight_optimizer, contrast, train_data,
                     val_data, logger, meta)
    if ctx.is_main:
        logger.write_config(config)
        size = args.number_net * info.n_data * args.feat_dim * 4 / 2 ** 20
        logger.text(f"{start_description(cohort, args.image_size, ctx, plan.run_dir, plan, loop)}; "
                    f"{info.num_classes} classes, {info.n_data} train / {len(val_data.dataset)} val images; memory "
                    f"banks {args.number_net} x {info.n_data} x {args.feat_dim} ({size:.1f} MiB); "
                    f"{lmcl_description(model, weight_net)}")
    return loop.fit()


if __name__ == "__main__":
    run_main(main)
