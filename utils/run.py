"""Set-up shared by the supervised entry scripts: checks, run directory, resume, optimizer."""
import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from utils.checkpoint import check_compatible, load_checkpoint
from utils.errors import CheckpointError, ConfigError


def validate_cohort_args(number_net: int, alpha: float, gamma: float, beta: float, lam: float,
                         logit_distill: bool) -> None:
    """ConfigError for cohort sizes and weights that cannot work together."""
    if number_net < 1:
        raise ConfigError(f"--number-net must be at least 1 (got {number_net})")
    if number_net == 1:
        if gamma or beta or lam:
            raise ConfigError("--gamma, --beta and --lam contrast networks with each other and need "
                              "--number-net 2 or more")
        if logit_distill:
            raise ConfigError("--logit-distill needs a cohort: use --number-net 2 or more")


def default_run_name(dataset: str, arch: str, number_net: int, topology: str, alpha: float, gamma: float,
                     beta: float, lam: float, logit_distill: bool, seed: int) -> str:
    """e.g. cifar100_resnet32_n2_independent_a0.1_g1.0_b0.1_l1.0_seed0."""
    name = (f"{dataset}_{arch.replace(',', '+')}_n{number_net}_{topology}"
            f"_a{alpha:g}_g{gamma:g}_b{beta:g}_l{lam:g}")
    if logit_distill:
        name += "_kd"
    return f"{name}_seed{seed}"


def resolve_resume(resume: Optional[str], resume_checkpoint: Optional[str], run_dir: str) -> Optional[str]:
    """Path of the checkpoint to resume, or None to start fresh.

    ``--resume`` / ``--resume auto``: the run directory's latest checkpoint if it exists.
    ``--resume PATH`` or ``--resume --resume-checkpoint PATH``: that file (must exist).
    """
    if resume is None:
        return None
    if resume != "auto":
        return resume
    if resume_checkpoint:
        return resume_checkpoint
    latest = os.path.join(run_dir, "checkpoint.pth.tar")
    return latest if os.path.exists(latest) else None


def load_for_run(path: str, **expected: Any) -> Dict[str, Any]:
    """Load ``path`` and check it belongs to a run with the ``expected`` fields."""
    ckpt = load_checkpoint(path)
    check_compatible(ckpt, path, **expected)
    return ckpt


def build_sgd(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The original's optimizer: SGD, momentum 0.9, Nesterov."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic kernels when asked; cudnn autotuning otherwise on CUDA."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def cohort_description(model: nn.Module) -> Tuple[int, str]:
    """(parameter count, one-line description) of a cohort."""
    n = sum(p.numel() for p in model.parameters())
    return n, f"{model.topology} cohort of {model.number_net}: {', '.join(model.arch_names)}"


def require_checkpoint_fields(ckpt: Dict[str, Any], path: str, *keys: str) -> None:
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it was not written by this script")


def evaluate_saved_cohort(ckpt: Dict[str, Any], path: str, eval_data: Any, device: torch.device, precision: Any,
                          to_batch: Any, max_batches: int, data_description: str, is_main: bool) -> int:
    """--evaluate: rebuild the cohort of ``ckpt``, print top-1/top-5 of every network and the ensemble."""
    from models import build_cohort
    from utils.engine import evaluate_cohort

    cohort = build_cohort(ckpt["arch"], ckpt["number_net"], ckpt["num_classes"], ckpt["topology"]).to(device)
    cohort.load_state_dict(ckpt["model"])
    if precision.channels_last:
        cohort = cohort.to(memory_format=torch.channels_last)
    result = evaluate_cohort(cohort, eval_data, device, precision, to_batch, max_batches)
    if is_main:
        print(f"evaluated {path} (epoch {ckpt['epoch']}) on {result['images']} {data_description}")
        for i, (t1, t5) in enumerate(zip(result["top1"], result["top5"])):
            print(f"  net {i} ({cohort.arch_names[i]}): top-1 {t1:.2f}  top-5 {t5:.2f}")
        print(f"  ensemble: top-1 {result['ens_top1']:.2f}  top-5 {result['ens_top5']:.2f}")
    return 0


def run_in_process_group(gpu_id: Optional[str], device: str, body: Any) -> int:
    """Honour --gpu-id, join the torchrun group if any, run ``body(ctx)``, leave the group."""
    from utils import distributed as du

    if gpu_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu_id
    ctx = du.setup_distributed(device=device)
    try:
        return body(ctx)
    finally:
        du.cleanup()
