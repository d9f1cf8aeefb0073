"""Command-line flags shared by main_cifar.py and main_imagenet.py.

The original's flags keep their names, defaults and meaning; the additions are
grouped so ``--help`` shows which is which.
"""
import argparse
from typing import Sequence


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
                   help="network architecture; a comma-separated list (e.g. resnet32,wrn_16_2) "
                        "gives a mixed, independent cohort")
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
                   help="sets CUDA_VISIBLE_DEVICES (the original's default was 0; unset leaves it alone)")
    g.add_argument("--manual_seed", type=int, default=0, help="random seed")
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
    g.add_argument("--kd_T", type=float, default=3, help="temperature of the KL divergences")
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


def add_common_additions(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Flags this project adds to both supervised scripts."""
    g = parser.add_argument_group("additions")
    g.add_argument("--cohort", default="auto", choices=("auto", "independent", "branched"),
                   help="cohort topology; auto = the original's rule (N == 2 independent, else branched)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to train; auto = CUDA when available")
    add_precision_args(g)
    g.add_argument("--eval-batch-size", type=int, default=0,
                   help="evaluation batch size per process (0 = 2 x --batch-size)")
    g.add_argument("--max-train-batches", type=int, default=0,
                   help="cap on training batches per epoch (0 = no cap; for smoke runs)")
    g.add_argument("--max-eval-batches", type=int, default=0,
                   help="cap on evaluation batches (0 = no cap; for smoke runs)")
    g.add_argument("--run-name", default=None, type=str,
                   help="name of the run directory under --checkpoint-dir (default: from arch, N, "
                        "weights and seed)")
    g.add_argument("--save-every-steps", type=int, default=100,
                   help="also write the latest checkpoint every N training steps (0 = only at "
                        "epoch ends)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bitwise-exact resume on CPU), slower on GPU")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--threads", type=int, default=0,
                   help="intra-op CPU threads per process (0 = torch's default; 1 is steadier on a shared machine)")
    return g
