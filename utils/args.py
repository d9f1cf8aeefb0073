"""Command-line flags of the four scripts.

The original's flags keep their names, defaults and meaning in each script (the
supervised scripts' in :func:`add_original_training_args`, the MoCo scripts' in
:func:`add_loop_args` and :func:`add_distributed_args`); the additions are grouped so
``--help`` shows which is which.
"""
import argparse
import copy
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Set

from models.registry import registered_names
from utils import distributed as du
from utils.config_file import add_config_flag, apply_config_file, has_config_flag
from utils.dashboard import require_wandb
from utils.errors import ConfigError
from utils.machine import available_cpus, record_arguments


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults (but not empty ones) and keep the description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, [], ()) or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def add_original_training_args(
    parser: argparse.ArgumentParser,
    *,
    data: str,
    dataset: str,
    dataset_help: str,
    arch: str,
    weight_decay: float,
    lr_type: str,
    milestones: Sequence[int],
    epochs: int,
    batch_size: int,
    num_workers: int,
    tau: float,
) -> None:
    """Flags both supervised scripts of the original have, with per-script defaults."""
    g = parser.add_argument_group("flags of the original")
    g.add_argument("--data", default=data, type=str, help="dataset directory")
    g.add_argument("--dataset", default=dataset, type=str, help=dataset_help)
    g.add_argument("--arch", default=arch, type=str,
                   help="network architecture: " + ", ".join(registered_names()) + "; or, in independent "
                        "cohorts, any torchvision classification model name (e.g. mobilenet_v2, efficientnet_b0, "
                        "regnet_y_400mf, convnext_tiny; torchvision.models.list_models(module=torchvision.models) "
                        "lists them) or a timm model as timm:NAME (e.g. timm:convnext_atto; needs pip install "
                        "timm), built with random weights; a comma-separated list (e.g. resnet32,wrn_16_2) gives "
                        "a mixed, independent cohort")
    g.add_argument("--init-lr", default=0.1, type=float, help="initial learning rate")
    g.add_argument("--weight-decay", default=weight_decay, type=float, help="weight decay")
    g.add_argument("--lr-type", default=lr_type, choices=("cosine", "multistep"),
                   help="learning-rate schedule, stepped once per epoch")
    g.add_argument("--milestones", default=list(milestones), type=int, nargs="+",
                   help="epochs where --lr-type multistep divides the rate by 10")
    g.add_argument("--epochs", type=int, default=epochs, help="number of epochs to train")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="global batch size (split over the processes under torchrun)")
    g.add_argument("--num-workers", type=int, default=num_workers,
                   help="DataLoader worker processes (per process)")
    g.add_argument("--gpu-id", type=str, default=None,
                   help="sets CUDA_VISIBLE_DEVICES (ids index an already-set CUDA_VISIBLE_DEVICES; the original's "
                        "default was 0; unset leaves it alone); several GPUs need one process each: torchrun "
                        "--nproc_per_node=N")
    g.add_argument("--manual_seed", "--seed", type=int, default=0, help="random seed")
    g.add_argument("--resume", "-r", nargs="?", const="auto", default=None, metavar="PATH|auto",
                   help="resume: alone or 'auto' continues the run directory's latest checkpoint "
                        "(or starts fresh if there is none); a path resumes that file")
    g.add_argument("--resume-checkpoint", default=None, type=str,
                   help="checkpoint to resume (the original's spelling of --resume PATH)")
    g.add_argument("--evaluate", "-e", action="store_true", help="only evaluate a checkpoint")
    g.add_argument("--evaluate-checkpoint", default=None, type=str,
                   help="checkpoint to evaluate (default: the run directory's best.pth.tar)")
    g.add_argument("--number-net", type=int, default=2,
                   help="number of networks in the cohort (the original: 2 = independent networks, "
                        "otherwise one network with a shared stem and N branches; see --cohort)")
    g.add_argument("--logit-distill", action="store_true",
                   help="add logit distillation from the ensemble (mean of logits)")
    g.add_argument("--checkpoint-dir", default="./checkpoint", type=str,
                   help="parent directory of the run directories")
    g.add_argument("--kd_T", "--kd-T", type=float, default=3, help="temperature of the KL divergences")
    g.add_argument("--tau", default=tau, type=float, help="temperature of the contrastive distributions")
    g.add_argument("--alpha", type=float, default=0.0, help="weight of VCL")
    g.add_argument("--gamma", type=float, default=0.0, help="weight of soft VCL")
    g.add_argument("--beta", type=float, default=0.0, help="weight of ICL")
    g.add_argument("--lam", type=float, default=0.0, help="weight of soft ICL")
    g.add_argument("--feat-dim", default=128, type=int, help="embedding size of the projection heads")


def add_precision_args(group: argparse._ArgumentGroup) -> None:
    """--amp and --channels-last (utils.precision.Precision), for every training script."""
    group.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                       help="mixed precision (fp16 uses a gradient scaler and needs CUDA)")
    group.add_argument("--channels-last", action="store_true", help="channels_last memory format")


def add_common_additions(parser: argparse.ArgumentParser,
                         fast_help: str = "the fast path: --amp bf16 --channels-last") -> argparse._ArgumentGroup:
    """Flags this project adds to both supervised scripts."""
    g = parser.add_argument_group("additions")
    g.add_argument("--cohort", default="auto", choices=("auto", "independent", "branched"),
                   help="cohort topology; auto = the original's rule (N == 2 independent, else branched)")
    g.add_argument("--eval-batch-size", type=int, default=0,
                   help="evaluation batch size per process (0 = 2 x --batch-size)")
    g.add_argument("--run-name", default=None, type=str,
                   help="name of the run directory under --checkpoint-dir (default: from arch, N, "
                        "weights and seed)")
    g.add_argument("--init-from", nargs="+", default=None, metavar="[I=]PATH",
                   help="start network I from the state_dict in PATH (PATH alone: every network): "
                        "torch.save(net.state_dict()) of the network or of its torchvision/timm model, or a "
                        "scripts/export.py file; a classifier for another class count stays random. "
                        "Independent cohorts; a resumed run takes its weights from its checkpoint")
    add_run_additions(g, save_every_steps=100, fast_help=fast_help)
    g.add_argument("--print-freq", type=int, default=50, metavar="N",
                   help="every N steps, the step's loss terms go to TensorBoard (and W&B) as train_step/...; the "
                        "console keeps one line per epoch")
    g.add_argument("--tb-embeddings", type=int, default=0, metavar="N",
                   help="at the end, every network's pooled features of the first N test images (with labels and "
                        "thumbnails) to TensorBoard's projector (0 = off)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm), "
                        "as one process on the whole batch computes them; ignored in one process")
    return g


def add_run_additions(g: argparse._ArgumentGroup, *, save_every_steps: int,
                      fast_help: str = "the fast path: --amp bf16 --channels-last") -> None:
    """The additions every script has, spelled the same in all four."""
    add_config_flag(g)
    g.add_argument("--device", default="auto", choices=du.DEVICES, help="where to train; auto = CUDA when available")
    add_precision_args(g)
    g.add_argument("--fast", action="store_true", help=fast_help)
    g.add_argument("--dist-timeout", type=float, default=du.DEFAULT_TIMEOUT_MINUTES, metavar="MINUTES",
                   help="how long a process waits for the others in a collective (set-up, all-reduce, barrier) "
                        "before the run fails; must exceed the longest work one rank does alone, e.g. writing "
                        "a checkpoint")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training step's forward and loss (the first steps compile, "
                        "for a minute or more; checkpoints stay the same; inductor needs Triton on CUDA, "
                        "a C++ compiler on CPU)")
    g.add_argument("--threads", type=int, default=0,
                   help="intra-op CPU threads per process (0 = torch's default; 1 is steadier on a shared machine)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bitwise-exact resume on CPU), slower on GPU")
    g.add_argument("--overwrite", action="store_true",
                   help="start again in a run directory that already holds a run, replacing its checkpoints "
                        "and metrics (without it, such a directory needs --resume)")
    g.add_argument("--save-every-steps", type=int, default=save_every_steps,
                   help="also write the latest checkpoint every N training steps (0 = only at epoch ends)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars: training, evaluation, the kNN monitor, listing image folders (they are "
                        "off anyway when stdout is not a terminal)")
    g.add_argument("--max-train-batches", type=int, default=0,
                   help="cap on training batches per epoch (0 = no cap; for smoke runs)")
    g.add_argument("--max-eval-batches", type=int, default=0,
                   help="cap on evaluation batches (0 = no cap; for smoke runs)")
    g.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log to Weights & Biases project PROJECT, with TensorBoard's names (needs pip install "
                        "wandb; WANDB_MODE=offline works without a network)")


# ----------------------------------------------------------------------------- L-MCL (--method lmcl)

METHODS = ("mcl", "lmcl")

# The authors' L-MCL defaults (their main_layer_mcl_{cifar,imagenet}_meta.py) where they differ from
# this script's MCL defaults; --method lmcl applies them to every flag the command line leaves out.
LMCL_CIFAR_DEFAULTS = {"alpha": 0.1, "gamma": 1.0, "beta": 0.1, "lam": 1.0}
LMCL_IMAGENET_DEFAULTS = {"alpha": 0.01, "gamma": 1.0, "beta": 0.01, "lam": 1.0, "epochs": 100}


def add_lmcl_args(parser: argparse.ArgumentParser, *, meta_freq: int, defaults: Dict[str, float],
                  memory: bool) -> None:
    """--method and the flags of L-MCL (Yang et al., TPAMI 2023), in their own --help group.

    ``defaults``: what --method lmcl changes when the flag is not given (named in the help);
    ``memory``: the ImageNet script (memory banks) also gets --vcl-partner-memory.
    """
    changed = ", ".join(f"--{k} {v:g}" for k, v in defaults.items())
    g = parser.add_argument_group(
        "L-MCL (--method lmcl)",
        "layer-wise MCL with auxiliary branches, an aggregator and meta-learned pair weights. Unless given, "
        f"--method lmcl uses the authors' defaults: {changed} (the other defaults are already theirs)")
    g.add_argument("--method", default="mcl", choices=METHODS,
                   help="mcl: MCL (the paper); lmcl: L-MCL (every network gets auxiliary branches; --arch must "
                        "have an L-MCL variant, --number-net 2 or more, independent networks)")
    g.add_argument("--meta-freq", type=int, default=meta_freq, metavar="N",
                   help="L-MCL: a meta step (the weight network's update) after every N-th training step of an "
                        "epoch, its first included (the authors' default)")
    g.add_argument("--times", type=int, default=2, metavar="N",
                   help="L-MCL: virtual inner steps on the weighted contrastive loss before the virtual "
                        "cross-entropy step of the meta step")
    g.add_argument("--exact-hypergradient", action="store_true",
                   help="L-MCL: differentiate through the virtual steps exactly (off: the authors' recursion, "
                        "which leaves out the weight-decay factor on the momentum term; it defines their "
                        "numbers and differs by a few percent of the hypergradient)")
    g.add_argument("--restore-bn-after-meta", action="store_true",
                   help="L-MCL: leave BatchNorm running statistics as the normal update left them (off: as in "
                        "the authors' code, the meta step's forward at the updated weights moves them once more)")
    if memory:
        g.add_argument("--vcl-partner-memory", action="store_true",
                       help="L-MCL: VCL of network j's embedding reads network j's memory bank (off: the authors' "
                            "code reads network i's bank for both views of a pair)")


def given_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> Set[str]:
    """Destinations of the flags ``argv`` (default: this process's command line) sets explicitly."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(probe.parse_args(sys.argv[1:] if argv is None else list(argv))))


def apply_method_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser,
                          argv: Optional[Sequence[str]], defaults: Dict[str, Any]) -> None:
    """--method lmcl: ``defaults`` for every flag of ``defaults`` the command line leaves out."""
    if getattr(args, "method", "mcl") != "lmcl":
        return
    given = given_flags(parser, argv)
    for dest, value in defaults.items():
        if dest not in given:
            setattr(args, dest, value)


def apply_fast(args: argparse.Namespace) -> None:
    """--fast: bf16 autocast (unless --amp says otherwise) and channels_last."""
    if args.fast:
        args.amp = "bf16" if args.amp == "none" else args.amp
        args.channels_last = True


# ----------------------------------------------------------------------------- MoCo pre-training, linear evaluation

def add_loop_args(parser: argparse.ArgumentParser, *, epochs: int, lr: float, schedule: Sequence[int],
                  momentum_help: str, weight_decay: float) -> None:
    """The original's data-loading, schedule, optimizer, printing and resume flags (after --data and -a)."""
    parser.add_argument("-j", "--workers", default=32, type=int, metavar="N",
                        help="number of data loading workers, split over the processes of a node")
    parser.add_argument("--epochs", default=epochs, type=int, metavar="N", help="number of total epochs to run")
    parser.add_argument("--start-epoch", default=0, type=int, metavar="N",
                        help="manual epoch number (useful on restarts)")
    parser.add_argument("-b", "--batch-size", default=256, type=int, metavar="N",
                        help="mini-batch size, the total over the processes of this node")
    parser.add_argument("--lr", "--learning-rate", default=lr, type=float, metavar="LR",
                        help="initial learning rate", dest="lr")
    parser.add_argument("--schedule", default=list(schedule), nargs="*", type=int,
                        help="learning rate schedule (when to drop lr by 10x)")
    parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help=momentum_help)
    parser.add_argument("--wd", "--weight-decay", default=weight_decay, type=float, metavar="W",
                        help="weight decay", dest="weight_decay")
    parser.add_argument("-p", "--print-freq", default=10, type=int, metavar="N",
                        help="print frequency (steps); also how often the step's loss terms go to TensorBoard (and "
                             "W&B) as train_step/...")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="resume from PATH; alone: the latest checkpoint of --checkpoint")


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The original's process-group flags."""
    parser.add_argument("--world-size", default=-1, type=int,
                        help="number of nodes for distributed training (-1: WORLD_SIZE from the environment)")
    parser.add_argument("--rank", default=-1, type=int,
                        help="node rank for distributed training (-1: RANK from the environment)")
    parser.add_argument("--dist-url", default=du.ORIGINAL_DIST_URL, type=str,
                        help="url used to set up distributed training (env:// reads MASTER_ADDR/MASTER_PORT; the "
                             "default placeholder becomes env:// when RANK comes from the environment, as under "
                             "torchrun)")
    parser.add_argument("--dist-backend", default=None, type=str,
                        help="distributed backend (default: nccl on CUDA, gloo on CPU; the original: nccl)")
    parser.add_argument("--seed", default=None, type=int, help="seed for initializing training")
    parser.add_argument("--gpu", default=None, type=int,
                        help="GPU id to use (one process, no data parallelism; an index within CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--gpu-ids", default=None, type=str,
                        help="GPU ids to use, e.g. 0,1,2,3, indices within CUDA_VISIBLE_DEVICES "
                             "(--multiprocessing-distributed starts one process per id; unset: every visible GPU)")
    parser.add_argument("--multiprocessing-distributed", action="store_true",
                        help="launch one process per GPU of this node (the original's way); the total "
                             "--world-size becomes nodes x processes per node")


def add_moco_additions(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The additions of main_moco_mcl.py and main_lincls.py: the common ones and the crop size.

    Mid-epoch checkpoints are off by default here (an ImageNet step is short and a
    checkpoint holds every encoder); --save-every-steps N turns them on.
    """
    g = parser.add_argument_group("additions")
    g.add_argument("--run-name", default=None, type=str,
                   help="name of the run directory under --checkpoint (default: from the architecture, N and "
                        "seed; see the script's description)")
    add_run_additions(g, save_every_steps=0)
    g.add_argument("--image-size", default=224, type=int, help="crop size of the augmentations")
    return g


# ----------------------------------------------------------------------------- numeric flags

@dataclass(frozen=True)
class Rule:
    """What a numeric flag accepts: a test and its words (\"--epochs must be <words>\")."""

    words: str
    accepts: Callable[[float], bool]


AT_LEAST_0 = Rule("at least 0", lambda v: v >= 0)
AT_LEAST_1 = Rule("at least 1", lambda v: v >= 1)
POSITIVE = Rule("positive", lambda v: v > 0)
FRACTION = Rule("in [0, 1)", lambda v: 0 <= v < 1)
SEED = Rule("in [0, 2**32)", lambda v: 0 <= v < 2 ** 32)
UNSET_OR_AT_LEAST_0 = Rule("-1 (unset) or at least 0", lambda v: v >= -1)
UNSET_OR_AT_LEAST_1 = Rule("-1 (unset) or at least 1", lambda v: v == -1 or v >= 1)

# The rule of every numeric flag of every script, by destination; 0 is allowed where it means
# something (no workers, no cap, the default, no weight). parse_flags applies it after parsing.
NUMERIC_RULES: Dict[str, Rule] = {
    # counts and sizes
    "epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "number_net": AT_LEAST_1, "feat_dim": AT_LEAST_1,
    "m_per_class": AT_LEAST_1, "synthetic_size": AT_LEAST_1, "synthetic_classes": AT_LEAST_1,
    "synthetic_test_size": AT_LEAST_1, "rep_dim": AT_LEAST_1, "pos_k": AT_LEAST_1, "neg_k": AT_LEAST_1,
    "moco_dim": AT_LEAST_1, "moco_k": AT_LEAST_1, "print_freq": AT_LEAST_1, "knn_k": AT_LEAST_1,
    "image_size": Rule("at least 16", lambda v: v >= 16), "steps": AT_LEAST_1, "repeats": AT_LEAST_1,
    "mean": Rule("in [0, 1]", lambda v: 0 <= v <= 1), "std": POSITIVE,
    "jobs": AT_LEAST_1, "meta_freq": AT_LEAST_1, "times": AT_LEAST_1,
    # 0 = none, no cap, the default or all
    "num_workers": AT_LEAST_0, "workers": AT_LEAST_0, "eval_batch_size": AT_LEAST_0, "threads": AT_LEAST_0,
    "save_every_steps": AT_LEAST_0, "max_train_batches": AT_LEAST_0, "max_eval_batches": AT_LEAST_0,
    "train_per_class": AT_LEAST_0, "start_epoch": AT_LEAST_0, "milestones": AT_LEAST_0, "schedule": AT_LEAST_0,
    "warmup": AT_LEAST_0, "net_index": AT_LEAST_0, "gpu": AT_LEAST_0, "tb_embeddings": AT_LEAST_0,
    # optimisation and the losses
    "init_lr": POSITIVE, "lr": POSITIVE, "weight_decay": AT_LEAST_0, "momentum": FRACTION,
    "alpha": AT_LEAST_0, "gamma": AT_LEAST_0, "beta": AT_LEAST_0, "lam": AT_LEAST_0,
    "tau": POSITIVE, "kd_T": POSITIVE, "moco_t": POSITIVE, "knn_t": POSITIVE, "moco_m": FRACTION, "nce_m": FRACTION,
    # seeds and process groups
    "manual_seed": SEED, "seed": SEED, "fast_seeds": SEED, "fp32_seeds": SEED,
    "world_size": UNSET_OR_AT_LEAST_1, "rank": UNSET_OR_AT_LEAST_0, "dist_timeout": POSITIVE,
}


def check_numeric_flags(parser: argparse.ArgumentParser, args: argparse.Namespace,
                        overrides: Optional[Dict[str, Rule]] = None) -> None:
    """ConfigError naming the first numeric flag (every value of a list flag) its rule refuses.

    ``overrides`` replaces rules for one script. A numeric flag without a rule is a bug
    (LookupError): add it to NUMERIC_RULES.
    """
    rules = {**NUMERIC_RULES, **(overrides or {})}
    for action in parser._actions:
        if action.type not in (int, float):
            continue
        if action.dest not in rules:
            raise LookupError(f"numeric flag {action.option_strings} has no rule; add one to "
                              f"utils.args.NUMERIC_RULES")
        value = getattr(args, action.dest, None)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not (math.isfinite(v) and rules[action.dest].accepts(v)):
                raise ConfigError(f"{'/'.join(action.option_strings)} must be {rules[action.dest].words} (got {v})")


# ----------------------------------------------------------------------------- DataLoader workers

WORKER_FLAGS = {"num_workers": "--num-workers", "workers": "--workers"}


def local_processes() -> int:
    """Processes torchrun starts on this node (1 otherwise)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def cap_workers(args: argparse.Namespace, cpus: Optional[int] = None, quiet: bool = False) -> None:
    """Lower --num-workers (per process) and --workers (per node) to the CPUs available, saying so once.

    More DataLoader workers than CPUs only compete for them (and PyTorch warns at every
    epoch). --num-workers is per process, so under torchrun the node's CPUs are shared
    among its processes.
    """
    cpus = cpus or available_cpus()
    for dest, flag in WORKER_FLAGS.items():
        value = getattr(args, dest, None)
        procs = local_processes() if dest == "num_workers" else 1
        cap = max(1, cpus // procs)
        if not isinstance(value, int) or value <= cap:
            continue
        setattr(args, dest, cap)
        if not quiet and int(os.environ.get("RANK", "0")) == 0:
            shared = f", shared by the {procs} processes of this node" if procs > 1 else ""
            print(f"{flag} {value} lowered to {cap}: this machine gives the run {cpus} CPUs{shared}", flush=True)


def parse_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                overrides: Optional[Dict[str, Rule]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with every numeric flag checked (check_numeric_flags), --wandb's package
    present and the DataLoader workers capped at the CPUs available (cap_workers).

    A parser with ``--config`` (the four scripts: add_run_additions) takes the values of that
    file (utils.config_file) under the command line's. The arguments are recorded for
    config.json (utils.machine).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if has_config_flag(parser):
        apply_config_file(parser, argv)
    args = parser.parse_args(argv)
    check_numeric_flags(parser, args, overrides)
    if getattr(args, "wandb", None):
        require_wandb()  # before any data or model is touched
    cap_workers(args)
    record_arguments(argv)
    return args
