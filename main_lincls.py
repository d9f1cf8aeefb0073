#!/usr/bin/env python
"""Linear evaluation of a pre-trained encoder: frozen backbone, fresh fc.

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
top-5 on --data/val each epoch; checkpoint.pth.tar (last) and best.pth.tar in the run
directory --checkpoint/--run-name (default ./checkpoint/lincls_<arch>_net<index>), plus
config.json, metrics.jsonl and summary.json.
"""
import argparse
import os
import platform
from typing import Dict, List, Optional, Tuple

import torch

from data.moco_aug import center_crop_transform, image_folder, linear_train_transform
from models.moco import encoder_names
from models.pretrained import backbone_state, read_pretrained
from utils.args import HelpFormatter
from utils import distributed as du
from utils.checkpoint import seed_everything
from utils.cli import run_main
from data.samplers import EpochShuffleBatchSampler, SamplerControlledLoader, ShardedEvalSampler
from utils.errors import CheckpointError, ConfigError
from utils.launch import launch, node_share, run_in_group
from utils.lincls import LinearMethod, evaluate, freeze_all_but_fc, frozen_snapshot, prepare_model
from utils.run_files import RunLogger
from utils.loop import LoopConfig, RunLoop
from utils.args import add_distributed_args, add_loop_args, add_moco_additions, apply_fast, parse_flags
from utils.precision import Precision, validate_precision
from utils.step_module import step_module
from utils.script_setup import (configure_determinism, load_for_evaluation, load_for_resume, resolve_resume,
                                start_on_main)
from utils.start import Start, decide_start

DEFAULT_ARCH = "resnet50"
SCRIPT = "main_lincls"


# ============================================================================ flags

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    orig = parser.add_argument_group("flags of the original")
    orig.add_argument("--data", metavar="DIR", default="./data/ImageNet/", type=str,
                      help="path to dataset (an ImageFolder with train/ and val/)")
    orig.add_argument("-a", "--arch", metavar="ARCH", default=None, choices=encoder_names(),
                      help="model architecture: " + " | ".join(encoder_names()) +
                           f" (default: the --pretrained checkpoint's, else {DEFAULT_ARCH})")
    add_loop_args(orig, epochs=100, lr=30.0, schedule=[60, 80], momentum_help="momentum",
                  weight_decay=0.0)
    orig.add_argument("-e", "--evaluate", dest="evaluate", action="store_true",
                      help="evaluate model on validation set")
    add_distributed_args(orig)
    orig.add_argument("--pretrained", default="", type=str, help="path to moco pretrained checkpoint")
    orig.add_argument("--checkpoint", default="./checkpoint/", type=str,
                      help="folder of the run directories: the run goes to CHECKPOINT/RUN_NAME (see --run-name)")
    g = add_moco_additions(parser)
    g.add_argument("--net-index", default=0, type=int,
                   help="which network of the pre-trained cohort to evaluate (0 = query encoder 0)")
    return parser


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    args = parse_flags(build_parser(), argv)
    apply_fast(args)
    return args


# ============================================================================ set-up

def build_loaders(args, ctx, batch: int, workers: int, seed: int):
    train_set = image_folder(args.data, "train", linear_train_transform(args.image_size),
                             progress=not args.no_progress and ctx.is_main)
    val_set = image_folder(args.data, "val", center_crop_transform(args.image_size))
    if train_set.classes != val_set.classes:
        raise ConfigError(f"{args.data}/train and {args.data}/val have different class folders")
    sampler = EpochShuffleBatchSampler(len(train_set), batch * ctx.world_size, seed, ctx.rank, ctx.world_size)
    pin = ctx.device.type == "cuda"
    train_loader = SamplerControlledLoader(
        torch.utils.data.DataLoader(train_set, batch_sampler=sampler, num_workers=workers, pin_memory=pin), sampler)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch, num_workers=workers, pin_memory=pin,
                                             sampler=ShardedEvalSampler(len(val_set), ctx.rank, ctx.world_size))
    return train_loader, val_loader, len(train_set.classes)


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


def decide_resume(args: argparse.Namespace, run_dir: str, arch: str) -> Start:
    """Where the run starts, decided by rank 0 for every rank (utils.start): training resumes a checkpoint
    of this script trained with these flags; -e evaluates the --resume checkpoint (any of this script)."""
    if not args.evaluate:
        def load(path: str) -> Dict:
            return load_for_resume(path, SCRIPT, args, build_parser(), {"arch": arch})

        return decide_start(lambda: start_on_main(args, run_dir, "--checkpoint", None, load))
    path = du.decided_on_main(lambda: resolve_resume(args.resume, None, run_dir))
    return Start(path, load_for_evaluation(path, SCRIPT, "--resume")) if path is not None else Start()


def run(args: argparse.Namespace, ctx: du.DistContext, nprocs: int) -> int:
    validate_precision(args.amp, ctx.device, warn=ctx.is_main)
    configure_determinism(args.deterministic, ctx.device)
    batch, workers = node_share(args, ctx, nprocs)
    run_dir = os.path.join(args.checkpoint, args.run_name or f"lincls_{args.arch or 'pretrained'}_net{args.net_index}")
    seed = args.seed if args.seed is not None else 0
    seed_everything(seed)
    # Every rank reads --pretrained (an input, like --data); one that cannot stops them all.
    state, arch, what = du.on_every_rank(lambda: pretrained_backbone(args))
    start = decide_resume(args, run_dir, arch)
    if start.finished:
        return 0
    resume_path, ckpt = start.resume_path, start.ckpt
    train_loader, val_loader, num_classes = build_loaders(args, ctx, batch, workers, seed)
    model = prepare_model(arch, state, num_classes, args.pretrained)
    if ckpt is not None and (ckpt.get("arch") != arch or ckpt.get("num_classes") != num_classes):
        raise CheckpointError(f"{resume_path} is a {ckpt.get('arch')} with {ckpt.get('num_classes')} classes; "
                              f"this run has {arch} with {num_classes}")
    model = model.to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    du.broadcast_state(model)
    reference = frozen_snapshot(model)
    params = freeze_all_but_fc(model)
    ddp_model = step_module(model, ctx, compile=args.compile)
    optimizer = torch.optim.SGD(params, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    logger = RunLogger(run_dir, enabled=ctx.is_main and not args.evaluate, wandb_project=args.wandb)
    config = dict(vars(args), script=SCRIPT, arch=arch, num_classes=num_classes,
                  versions={"python": platform.python_version(), "torch": torch.__version__})
    meta = {"script": SCRIPT, "config": config, "arch": arch, "number_net": 1,
            "topology": "independent", "num_classes": num_classes, "net_index": args.net_index}
    precision = Precision(args.amp, args.channels_last)
    method = LinearMethod(model, ddp_model, val_loader, reference, ctx, precision, args.max_eval_batches,
                          {"net_index": args.net_index, "pretrained": args.pretrained}, progress=not args.no_progress)
    runner = RunLoop(method, optimizer, train_loader, ctx, LoopConfig.from_flags(args), precision, logger, run_dir, meta,
                     sampler_seed=seed)
    runner.state.epoch = args.start_epoch
    if ckpt is not None:
        runner.restore(ckpt, resume_path)
        if not args.pretrained:  # random backbone: the reference is the one the run has trained with
            method.reference = frozen_snapshot(model)
    if args.evaluate:
        result = evaluate(model, val_loader, ctx, args.max_eval_batches, precision, not args.no_progress)
        if ctx.is_main:
            print(f" * Acc@1 {result['top1'][0]:.3f} Acc@5 {result['top5'][0]:.3f} ({arch}, {what})")
        return 0
    intro = (f"linear evaluation of {arch}: {what}; {num_classes} classes, {len(train_loader.dataset)} train / "
             f"{len(val_loader.dataset)} val images; batch {batch} per process x {ctx.world_size}; "
             f"run directory {run_dir}")
    runner.announce(config, intro, resume_path if ckpt else None)
    return runner.fit()


def main(argv: Optional[List[str]] = None) -> int:
    return launch(run_in_group(run), parse_args(argv))


if __name__ == "__main__":
    run_main(main)
