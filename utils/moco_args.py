"""Command-line flags shared by main_moco_mcl.py and main_lincls.py (the original MoCo
scripts' flags, with their names and defaults, plus the additions for CPU runs)."""
import argparse
from typing import Dict, Sequence

from utils import distributed as du
from utils.args import add_precision_args
from utils.errors import ConfigError


def add_loop_args(parser: argparse.ArgumentParser, *, epochs: int, lr: float, schedule: Sequence[int],
                  momentum_help: str, weight_decay: float, weight_decay_text: str) -> None:
    """The original's data-loading, schedule, optimizer, printing and resume flags (after --data and -a)."""
    parser.add_argument("-j", "--workers", default=32, type=int, metavar="N",
                        help="number of data loading workers (default: 32, split over the processes of a node)")
    parser.add_argument("--epochs", default=epochs, type=int, metavar="N", help="number of total epochs to run")
    parser.add_argument("--start-epoch", default=0, type=int, metavar="N",
                        help="manual epoch number (useful on restarts)")
    parser.add_argument("-b", "--batch-size", default=256, type=int, metavar="N",
                        help="mini-batch size (default: 256), the total over the processes of this node")
    parser.add_argument("--lr", "--learning-rate", default=lr, type=float, metavar="LR",
                        help="initial learning rate", dest="lr")
    parser.add_argument("--schedule", default=list(schedule), nargs="*", type=int,
                        help="learning rate schedule (when to drop lr by 10x)")
    parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help=momentum_help)
    parser.add_argument("--wd", "--weight-decay", default=weight_decay, type=float, metavar="W",
                        help=f"weight decay (default: {weight_decay_text})", dest="weight_decay")
    parser.add_argument("-p", "--print-freq", default=10, type=int, metavar="N", help="print frequency (default: 10)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="resume from PATH; alone: the latest checkpoint of --checkpoint (default: none)")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The original's process-group flags."""
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
    """Additions: device, mixed precision and memory format, crop size, caps on batches."""
    g = parser.add_argument_group("additions")
    g.add_argument("--device", default="auto", choices=du.DEVICES, help="auto = CUDA when available")
    add_precision_args(g)
    g.add_argument("--image-size", default=224, type=int, help="crop size of the augmentations")
    g.add_argument("--max-train-batches", default=0, type=int, help="cap on training batches per epoch (0 = none)")
    g.add_argument("--max-eval-batches", default=0, type=int, help="cap on evaluation batches (0 = none)")


def check_at_least_one(values: Dict[str, int]) -> None:
    """ConfigError naming the first flag of ``values`` ({flag: value}) below 1."""
    for flag, value in values.items():
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1 (got {value})")


def loop_config(args: argparse.Namespace):
    """The run loop's settings from the flags above (a cosine schedule where the script has --cos)."""
    from utils.loop import LoopConfig

    return LoopConfig(epochs=args.epochs, init_lr=args.lr, lr_type="cosine" if getattr(args, "cos", False)
                      else "multistep", milestones=args.schedule, max_train_batches=args.max_train_batches,
                      progress=False, print_freq=args.print_freq)
