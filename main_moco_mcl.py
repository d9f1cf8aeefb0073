#!/usr/bin/env python
"""Self-supervised MCL on MoCo: N query/key encoder pairs, one queue each.

    python main_moco_mcl.py -a resnet18 --lr 0.03 --batch-size 256 --number-net 2 \\
        --dist-url 'tcp://localhost:10001' --multiprocessing-distributed --world-size 1 --rank 0 \\
        --gpu-ids 0,1,2,3,4,5,6,7

pre-trains MCL(x2) on ImageNet as the paper did (add --mlp --aug-plus --cos for MoCo v2).
Other ways to start it: ``torchrun --nproc_per_node=K main_moco_mcl.py ...`` or a single
process (on CPU or one GPU). --batch-size is the total over the processes of one node.
In a single process the key batch is not shuffled: BatchNorm then sees the whole batch
at once and a permutation changes nothing (shuffled BN needs several processes).

The run directory --checkpoint/--run-name (default ./checkpoint/moco_<arch>_n<N>[_seed<S>])
receives checkpoint.pth.tar after every epoch (with the key encoders, queues and
pointers), checkpoint_<last epoch>.pth.tar at the end (a link to the final checkpoint,
also made in --checkpoint itself, where the original wrote it and where main_lincls.py's
README command finds it), config.json, metrics.jsonl and summary.json. SIGTERM/SIGINT
finish the current step, save and exit (0 / 130); ``--resume`` continues exactly there.
"""
import argparse
import os
import platform
from typing import Any, Dict, List, Optional

import torch

from data.moco_aug import TwoCropsTransform, center_crop_transform, image_folder, moco_augmentation
from models.moco import MoCoMCL, check_queue_size, encoder_names
from utils.args import HelpFormatter
from utils import distributed as du
from utils.checkpoint import seed_everything
from utils.cli import run_main
from data.samplers import EpochShuffleBatchSampler, SamplerControlledLoader, ShardedEvalSampler
from utils.errors import ConfigError
from utils.launch import launch, node_share, run_in_group
from utils.run_files import RunLogger
from utils.loop import LoopConfig, RunLoop
from utils.args import add_distributed_args, add_loop_args, add_moco_additions, apply_fast, parse_flags
from utils.moco_pretrain import MocoMethod, link_final_checkpoint, sampler_seed_for
from utils.precision import Precision, validate_precision
from utils.step_module import step_module
from utils.script_setup import configure_determinism, load_for_resume, start_on_main
from utils.start import Start, decide_start

SCRIPT = "main_moco_mcl"


# ============================================================================ flags

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    orig = parser.add_argument_group("flags of the original")
    orig.add_argument("--data", metavar="DIR", default="./data/ImageNet/", type=str,
                      help="path to dataset (an ImageFolder with train/)")
    orig.add_argument("-a", "--arch", metavar="ARCH", default="resnet50", choices=encoder_names(),
                      help="encoder architecture: " + " | ".join(encoder_names()))
    add_loop_args(orig, epochs=200, lr=0.03, schedule=[120, 160], momentum_help="momentum of SGD solver",
                  weight_decay=1e-4)
    add_distributed_args(orig)
    orig.add_argument("--number-net", default=2, type=int, metavar="N", help="number of peer networks")
    orig.add_argument("--moco-dim", default=128, type=int, help="feature dimension")
    orig.add_argument("--moco-k", default=65536, type=int,
                      help="queue size; number of negative keys; need not be a "
                           "multiple of the batch (the queue wraps around)")
    orig.add_argument("--moco-m", default=0.999, type=float,
                      help="moco momentum of updating key encoder")
    orig.add_argument("--moco-t", default=0.07, type=float, help="softmax temperature")
    orig.add_argument("--checkpoint", default="./checkpoint/", type=str,
                      help="folder of the run directories: the run goes to CHECKPOINT/RUN_NAME (see --run-name), "
                           "and the final checkpoint_<last epoch>.pth.tar is also linked into CHECKPOINT itself, "
                           "where the original wrote it")
    orig.add_argument("--mlp", action="store_true", help="use mlp head (MoCo v2: Linear, ReLU, Linear)")
    orig.add_argument("--aug-plus", action="store_true", help="use moco v2 data augmentation")
    orig.add_argument("--cos", action="store_true", help="use cosine lr schedule")
    g = add_moco_additions(parser)
    g.add_argument("--kd-T", "--kd_T", default=3.0, type=float,
                   help="temperature of the soft (KL) terms (the original's 3)")
    g.add_argument("--knn-data", default="", type=str,
                   help="small labelled ImageFolder with train/ and val/: after every epoch, weighted kNN "
                      "top-1 of each query encoder's pooled features (off when empty)")
    g.add_argument("--knn-k", default=200, type=int, help="neighbours of the kNN monitor")
    g.add_argument("--knn-t", default=0.1, type=float, help="temperature of the kNN monitor's weights")
    return parser


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    args = parse_flags(build_parser(), argv)
    apply_fast(args)
    return args


# ============================================================================ data

def build_train_loader(args: argparse.Namespace, ctx: du.DistContext, batch: int, workers: int,
                       sampler_seed: int) -> SamplerControlledLoader:
    dataset = image_folder(args.data, "train", TwoCropsTransform(moco_augmentation(args.aug_plus, args.image_size)),
                           progress=not args.no_progress and ctx.is_main)
    global_batch = batch * ctx.world_size
    if len(dataset) < global_batch:
        raise ConfigError(f"{args.data}/train has {len(dataset)} images, fewer than one global batch "
                          f"({global_batch}); lower --batch-size")
    sampler = EpochShuffleBatchSampler(len(dataset), global_batch, sampler_seed, ctx.rank, ctx.world_size,
                                       drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         pin_memory=ctx.device.type == "cuda", persistent_workers=False)
    return SamplerControlledLoader(loader, sampler)


def build_knn_loaders(args: argparse.Namespace, ctx: du.DistContext, batch: int, workers: int):
    """(train loader, val loader, classes) of --knn-data: this rank's contiguous shard of each
    split in file order, evaluation transform."""
    transform = center_crop_transform(args.image_size)
    loaders = []
    for split in ("train", "val"):
        ds = image_folder(args.knn_data, split, transform)
        loaders.append(torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers,
                                                   sampler=ShardedEvalSampler(len(ds), ctx.rank, ctx.world_size),
                                                   pin_memory=ctx.device.type == "cuda"))
    return loaders[0], loaders[1], len(loaders[0].dataset.classes)


# ============================================================================ set-up

def run_config(args: argparse.Namespace, ctx: du.DistContext, batch: int) -> Dict[str, Any]:
    config = dict(vars(args))
    config.update(script=SCRIPT, world_size_total=ctx.world_size, batch_per_process=batch,
                  versions={"python": platform.python_version(), "torch": torch.__version__})
    return config


def build_model(args: argparse.Namespace, ctx: du.DistContext) -> MoCoMCL:
    """The encoders and queues, identical on every rank; then a per-rank RNG stream under --seed."""
    if args.seed is not None:
        seed_everything(args.seed)
    model = MoCoMCL(args.arch, args.number_net, args.moco_dim, args.moco_k, args.moco_m, args.mlp,
                    rank=ctx.rank, world_size=ctx.world_size).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    du.broadcast_state(model)
    if args.seed is not None:
        seed_everything(args.seed + ctx.rank)  # same weights everywhere, different augmentations per rank
    return model


def default_run_name(args: argparse.Namespace) -> str:
    """e.g. moco_resnet18_n2_seed0 (no seed part without --seed)."""
    seed = f"_seed{args.seed}" if args.seed is not None else ""
    return f"moco_{args.arch}_n{args.number_net}{seed}"


def describe_run(args: argparse.Namespace, ctx: du.DistContext, images: int, batch: int) -> str:
    """The first line of log.txt (what trains on what, where)."""
    where = f"{ctx.world_size} processes, shuffled BN" if ctx.distributed else \
        f"{ctx.device}, one process (key batch not shuffled)"
    return (f"MoCo-MCL: {args.number_net} x {args.arch}{' + MLP head' if args.mlp else ''}, "
            f"K={args.moco_k}, m={args.moco_m}, T={args.moco_t}; {images} images, "
            f"batch {batch} per process; {where}")


def start_on_main_linked(args: argparse.Namespace, run_dir: str) -> Start:
    """Rank 0's decision of where the run starts (utils.script_setup.start_on_main); for a finished
    run also the final checkpoint's links, which a kill may have come before."""
    start = start_on_main(args, run_dir, "--checkpoint", None, lambda path: load_for_resume(path, SCRIPT, args,
                                                                                            build_parser()))
    if start.finished:
        link_final_checkpoint(run_dir, int(start.ckpt["epoch"]))
    return start


def train(args: argparse.Namespace, ctx: du.DistContext, nprocs: int) -> int:
    validate_precision(args.amp, ctx.device, warn=ctx.is_main)
    configure_determinism(args.deterministic, ctx.device)
    batch, workers = node_share(args, ctx, nprocs)
    check_queue_size(args.moco_k, batch * ctx.world_size)
    run_dir = os.path.join(args.checkpoint, args.run_name or default_run_name(args))
    start = decide_start(lambda: start_on_main_linked(args, run_dir))
    if start.finished:
        return 0
    resume_path, ckpt = start.resume_path, start.ckpt
    model = build_model(args, ctx)
    ddp_model = step_module(model, ctx, compile=args.compile, not_broadcast=model.RANK_IDENTICAL_BUFFERS)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sampler_seed = sampler_seed_for(args.seed, ckpt)
    train_data = build_train_loader(args, ctx, batch, workers, sampler_seed)
    knn = build_knn_loaders(args, ctx, batch, workers) if args.knn_data else None
    logger = RunLogger(run_dir, enabled=ctx.is_main, wandb_project=args.wandb)
    config = run_config(args, ctx, batch)
    meta = {"script": SCRIPT, "config": config, "arch": args.arch, "number_net": args.number_net,
            "topology": "independent", "num_classes": args.moco_dim}
    precision = Precision(args.amp, args.channels_last)
    method = MocoMethod(args, model, ddp_model, ctx.device, precision, knn)
    loop = RunLoop(method, optimizer, train_data, ctx, LoopConfig.from_flags(args), precision, logger, run_dir, meta,
                   sampler_seed=sampler_seed)
    loop.state.epoch = args.start_epoch
    if ckpt is not None:
        loop.restore(ckpt, resume_path)
    loop.announce(config, describe_run(args, ctx, len(train_data.dataset), batch), resume_path if ckpt else None)
    return loop.fit()


def main(argv: Optional[List[str]] = None) -> int:
    return launch(run_in_group(train), parse_args(argv))


if __name__ == "__main__":
    run_main(main)
