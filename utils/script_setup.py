"""Set-up shared by the supervised entry scripts: checks, run directory, resume, optimizer."""
import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from losses.mcl import build_projection_heads
from models import build_cohort, count_multiply_adds
from models.cohort import parse_arch_names, resolve_topology
from models.init_from import init_networks, parse_init_from
from utils.checkpoint import (best_checkpoint_path, check_compatible, flag_of_field, latest_checkpoint_path,
                              load_checkpoint, remove_stale_temporaries, seed_everything)
from utils.errors import CheckpointError, ConfigError
from utils.launch import launch, refuse_data_parallel, run_in_group, visible_devices_for
from utils.loop import LoopConfig, RunLoop, already_finished
from utils.precision import Precision, validate_precision
from utils.run_files import check_run_dir_free, ensure_writable_dir, lock_run_dir
from utils.start import Start, decide_start
from utils.step_module import compiled_function, step_module
from utils.supervised import CohortWithHeads, SupervisedMethod, evaluate_cohort


def validate_cohort_args(number_net: int, alpha: float, gamma: float, beta: float, lam: float,
                         logit_distill: bool) -> None:
    """ConfigError for cohort sizes and weights that cannot work together (each flag's own range:
    utils.args.NUMERIC_RULES)."""
    if number_net == 1:
        if gamma or beta or lam:
            raise ConfigError("--gamma, --beta and --lam contrast networks with each other and need "
                              "--number-net 2 or more")
        if logit_distill:
            raise ConfigError("--logit-distill needs a cohort: use --number-net 2 or more")


def default_run_name(dataset: str, arch: str, number_net: int, topology: str, alpha: float, gamma: float,
                     beta: float, lam: float, logit_distill: bool, seed: int, method: str = "mcl") -> str:
    """e.g. cifar100_resnet32_n2_independent_a0.1_g1.0_b0.1_l1.0_seed0 (L-MCL: ..._independent_lmcl_a0.1...)."""
    name = (f"{dataset}_{arch.replace(',', '+').replace(':', '-')}_n{number_net}_{topology}{'_lmcl' if method == 'lmcl' else ''}"
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
    latest = latest_checkpoint_path(run_dir)
    return latest if os.path.exists(latest) else None


# Flags that may differ between a run and its resumption: how long, how and where it runs, not what it
# computes. Every other flag a checkpoint's config holds (data set and its size, architecture, cohort,
# loss weights, temperatures, optimiser, schedule, batch, seed, ...) must be the same.
MAY_CHANGE_ON_RESUME = frozenset({
    "epochs", "start_epoch",  # raise --epochs to train longer
    "data", "data_path", "checkpoint", "checkpoint_dir", "run_name", "knn_data", "resume", "resume_checkpoint",
    "evaluate", "evaluate_checkpoint", "overwrite", "config",  # paths and what to do
    "init_from",  # the starting weights, which a resumed run takes from its checkpoint instead
    "device", "gpu_id", "gpu", "gpu_ids", "dist_url", "dist_backend", "dist_timeout", "world_size", "rank",
    "multiprocessing_distributed", "num_workers", "workers", "threads", "deterministic",  # where it runs
    "amp", "fast", "channels_last", "compile", "sync_bn",  # precision, memory layout, compilation, BN sync
    "no_progress", "print_freq", "save_every_steps", "max_train_batches", "max_eval_batches", "eval_batch_size",
    "knn_k", "knn_t",  # reporting, checkpoints, smoke-run caps, the kNN monitor
    "wandb", "tb_embeddings",  # dashboards
    "cohort",  # compared as the topology it resolves to (auto = independent for N = 2)
    "rep_dim",  # ignored
})


def flag_names(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """{destination: the flag as --help spells it first} of ``parser``'s options."""
    names = {}
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if long:
            names[action.dest] = long[0]
    return names


def describe_flag(flag: str, value: Any) -> str:
    """``--tau 0.1``, ``--mlp``, ``no --mlp``, ``--milestones 150 225``."""
    if value is True:
        return flag
    if value is False or value is None:
        return f"no {flag}"
    if isinstance(value, (list, tuple)):
        return f"{flag} {' '.join(str(v) for v in value)}"
    return f"{flag} {value}"


def check_written_by(ckpt: Dict[str, Any], path: str, script: str, flag: str) -> None:
    """CheckpointError when ``ckpt`` was written by another entry script than ``script``."""
    writer = ckpt.get("script")
    if not writer or writer == script:
        return
    hint = ""
    if script == "main_lincls" and writer in ("main_moco_mcl", "main_imagenet"):
        hint = f" (to evaluate its encoders: main_lincls.py --pretrained {path})"
    raise CheckpointError(f"{flag} {path} was written by {writer}.py; {script}.py cannot continue or evaluate it: "
                          f"use it with {writer}.py{hint}")


def check_resume_flags(ckpt: Dict[str, Any], path: str, args: argparse.Namespace, parser: argparse.ArgumentParser,
                       resolved: Optional[Dict[str, Any]] = None) -> None:
    """CheckpointError naming every flag whose value differs from the one the checkpoint was trained with.

    Compared: every key of the checkpoint's ``config`` that is a flag of this run (or a
    ``resolved`` value such as the topology), except MAY_CHANGE_ON_RESUME.
    """
    stored = ckpt.get("config") or {}
    current = {**vars(args), **(resolved or {})}
    names = {**flag_names(parser), **{k: flag_of_field(k) for k in resolved or {}}}
    differ = [key for key in current if key in stored and key in names and key not in MAY_CHANGE_ON_RESUME
              and stored[key] != current[key]]
    if differ:
        was = " ".join(describe_flag(names[k], stored[k]) for k in differ)
        now = " ".join(describe_flag(names[k], current[k]) for k in differ)
        raise CheckpointError(f"--resume {path} was trained with {was}, this run has {now}; resume with the "
                              "flags it was trained with (only where and how it runs may change, e.g. --epochs, "
                              "workers, devices, paths) or start a new run")


def load_for_resume(path: str, script: str, args: argparse.Namespace, parser: argparse.ArgumentParser,
                    resolved: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The checkpoint at ``path``, checked to be one of ``script`` trained with this run's flags
    (check_written_by, check_resume_flags) and, where it says, of this run's architecture and topology."""
    ckpt = load_checkpoint(path)
    check_written_by(ckpt, path, script, "--resume")
    check_resume_flags(ckpt, path, args, parser, resolved)
    check_compatible(ckpt, path, **(resolved or {}))
    return ckpt


def load_for_evaluation(path: str, script: str, flag: str) -> Dict[str, Any]:
    """The checkpoint at ``path`` (named by ``flag``), checked to be one of ``script``: read by rank 0,
    the same on every rank (every rank must call it; see utils.start)."""
    def load(p: str) -> Dict[str, Any]:
        ckpt = load_checkpoint(p)
        check_written_by(ckpt, p, script, flag)
        return ckpt

    return shared_checkpoint(path, load)


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


def evaluate_saved_cohort(ckpt: Dict[str, Any], path: str, eval_data: Any, device: torch.device, precision: Any,
                          max_batches: int, data_description: str, is_main: bool, progress: bool = False) -> int:
    """--evaluate: rebuild the cohort of ``ckpt``, print top-1/top-5, NLL and ECE of every network and the
    ensemble (an L-MCL checkpoint: utils.lmcl_setup.evaluate_saved_lmcl)."""
    if ckpt.get("method") == "lmcl":
        from utils.lmcl_setup import evaluate_saved_lmcl

        return evaluate_saved_lmcl(ckpt, path, eval_data, device, precision, max_batches, data_description,
                                   is_main, progress)
    cohort = build_cohort(ckpt["arch"], ckpt["number_net"], ckpt["num_classes"], ckpt["topology"]).to(device)
    cohort.load_state_dict(ckpt["model"])
    if precision.channels_last:
        cohort = cohort.to(memory_format=torch.channels_last)
    r = evaluate_cohort(cohort, eval_data, device, precision, max_batches, progress and is_main)
    if is_main:
        print(f"evaluated {path} (epoch {ckpt['epoch']}) on {r['images']} {data_description}")
        rows = [(f"net {i} ({cohort.arch_names[i]})", r["top1"][i], r["top5"][i], r["nll"][i], r["ece"][i])
                for i in range(cohort.number_net)]
        rows.append(("ensemble", r["ens_top1"], r["ens_top5"], r["ens_nll"], r["ens_ece"]))
        for name, t1, t5, nll, ece in rows:
            print(f"  {name}: top-1 {t1:.2f}  top-5 {t5:.2f}  NLL {nll:.4f}  ECE {ece:.2f}%")
        print("  (NLL: mean negative log-likelihood in nats; ECE: expected calibration error, 15 confidence bins)")
    return 0


@dataclass
class RunPlan:
    """Where a supervised run lives and what it resumes from."""
    topology: str
    run_dir: str
    resume_path: Optional[str] = None
    ckpt: Optional[Dict[str, Any]] = None
    already_finished: bool = False


def plan_supervised_run(args: Any, ctx: Any, script: str, parser: argparse.ArgumentParser) -> RunPlan:
    """The steps both supervised scripts take before building data and models.

    Checks precision and device, seeds, resolves the topology and the run directory; then
    rank 0 decides where the run starts (utils.start: it claims the run directory and loads
    the checkpoint to resume, checked to be one of ``script`` trained with the same flags of
    ``parser``) and every rank receives that decision and the checkpoint.
    """
    validate_precision(args.amp, ctx.device, warn=ctx.is_main)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    configure_determinism(args.deterministic, ctx.device)
    seed_everything(args.manual_seed)
    method = getattr(args, "method", "mcl")
    # L-MCL networks are always independent (each with its own auxiliary branches).
    topology = "independent" if method == "lmcl" else resolve_topology(args.cohort,
                                                                       parse_arch_names(args.arch, args.number_net))
    run_name = args.run_name or default_run_name(args.dataset, args.arch, args.number_net, topology, args.alpha,
                                                 args.gamma, args.beta, args.lam, args.logit_distill,
                                                 args.manual_seed, method)
    plan = RunPlan(topology, os.path.join(args.checkpoint_dir, run_name))
    if args.evaluate:
        return plan

    def load(path: str) -> Dict[str, Any]:
        return load_for_resume(path, script, args, parser, {"topology": topology})

    start = decide_start(lambda: start_on_main(args, plan.run_dir, "--checkpoint-dir", args.resume_checkpoint, load))
    plan.resume_path, plan.ckpt, plan.already_finished = start.resume_path, start.ckpt, start.finished
    return plan


def start_on_main(args: Any, run_dir: str, dir_flag: str, resume_checkpoint: Optional[str],
                  load: Callable[[str], Dict[str, Any]]) -> Start:
    """Rank 0's decision of where a training run starts (for utils.start.decide_start): claim the
    run directory (``dir_flag`` names its flag), resolve --resume in it, read and check the
    checkpoint with ``load``, and say (on stdout) when it has already run its --epochs."""
    claim_run_dir(run_dir, dir_flag, args.resume is not None, args.overwrite)
    path = resolve_resume(args.resume, resume_checkpoint, run_dir)
    if path is None:
        return Start()
    ckpt = load(path)
    return Start(path, ckpt, already_finished(ckpt, args.epochs, path, True, " (raise --epochs to train longer)"))


def shared_checkpoint(path: str, load: Callable[[str], Dict[str, Any]]) -> Dict[str, Any]:
    """The checkpoint at ``path`` as rank 0 reads it with ``load``, on every rank (see utils.start)."""
    return decide_start(lambda: Start(path, load(path))).ckpt


def check_resume_classes(plan: RunPlan, num_classes: int, data_description: str) -> None:
    if plan.ckpt is not None and plan.ckpt["num_classes"] != num_classes:
        raise ConfigError(f"{plan.resume_path} was trained for {plan.ckpt['num_classes']} classes but "
                          f"{data_description} has {num_classes}; resume with the data it was trained on, or start "
                          "a new run (another --run-name, or --overwrite)")


def build_model_and_optimizer(args: Any, num_classes: int, uses_contrast: bool, device: torch.device,
                              resuming: bool = False):
    """(cohort, cohort with heads on ``device``, SGD) from the flags, seeded by --manual_seed.

    The networks --init-from names start from those files unless the run resumes (its
    checkpoint then holds the weights).
    """
    seed_everything(args.manual_seed)
    cohort = build_cohort(args.arch, args.number_net, num_classes, args.cohort)
    if not resuming:
        for line in init_networks(cohort, parse_init_from(getattr(args, "init_from", None), args.number_net)):
            if not (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
                print(line, flush=True)
    heads = build_projection_heads(cohort.feature_dims, args.feat_dim) if uses_contrast else None
    model = CohortWithHeads(cohort, heads).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return cohort, model, build_sgd(model.parameters(), args.init_lr, args.weight_decay)


def claim_run_dir(path: str, flag: str, resuming: bool, overwrite: bool) -> None:
    """Rank 0, before training: the run directory exists and is writable, no other process uses it
    (an exclusive lock held until this process ends), and a fresh start does not silently replace
    the run it holds (see utils.run_files.check_run_dir_free)."""
    prepare_run_dir(path, flag)
    lock_run_dir(path)
    check_run_dir_free(path, resuming, overwrite)


def prepare_run_dir(path: str, flag: str = "--checkpoint") -> None:
    """Create the run directory (ConfigError naming ``flag`` when it is not writable) and remove the
    half-written checkpoint files a killed save left there."""
    try:
        ensure_writable_dir(path)
    except ConfigError:
        raise ConfigError(f"cannot write to {path}; pass a writable {flag} directory") from None
    removed = remove_stale_temporaries(path)
    if removed:
        print(f"{path}: removed {len(removed)} half-written checkpoint file(s) left by a killed save: "
              f"{', '.join(removed)}", flush=True)


def start_description(cohort: nn.Module, input_size: int, ctx: Any, run_dir: str, plan: RunPlan,
                      trainer: RunLoop) -> str:
    """The start of the line a run prints first: cohort, size, where, resume point."""
    n_params, desc = cohort_description(cohort)
    madds = count_multiply_adds(cohort.eval(), (1, 3, input_size, input_size)) / 1e9
    where = f"{ctx.world_size} processes" if ctx.distributed else str(ctx.device)
    start = trainer.start_point(plan.resume_path if plan.ckpt is not None else None)
    return (f"{desc}: {n_params / 1e6:.2f}M parameters, {madds:.2f}G multiply-adds per {input_size}px image; "
            f"{where}; run directory {run_dir}; {start}")


def supervised_loop(args: Any, ctx: Any, plan: RunPlan, model: nn.Module, optimizer: torch.optim.Optimizer,
                    objective: Any, contrast: Any, train_data: Any, eval_data: Any, logger: Any,
                    meta: Dict[str, Any]):
    """The run loop of main_cifar.py / main_imagenet.py, resumed from ``plan.ckpt`` when there is one."""
    precision = Precision(args.amp, args.channels_last)
    step = step_module(model, ctx, compile=args.compile, sync_bn=args.sync_bn)
    if contrast is not None:
        contrast.losses = compiled_function(contrast.losses, args.compile)
    method = SupervisedMethod(model, step, objective, contrast, eval_data, ctx.device, precision,
                              args.max_eval_batches, progress=not args.no_progress and ctx.is_main,
                              embeddings=args.tb_embeddings)
    loop = RunLoop(method, optimizer, train_data, ctx, LoopConfig.from_flags(args), precision, logger, plan.run_dir,
                   meta)
    if plan.ckpt is not None:
        loop.restore(plan.ckpt, plan.resume_path)
    return loop


class SupervisedEntry:
    """What every process of main_cifar.py / main_imagenet.py runs: plan the run, then evaluate a
    checkpoint (``--evaluate``), stop when the resumed run has finished, or train.

    ``script`` names it (its checkpoints say so), ``build_parser`` makes its parser (resume
    compares the checkpoint's flags with it), and ``train(args, ctx, plan)`` and
    ``evaluate(args, ctx, path)`` are its own functions.
    """

    def __init__(self, script: str, build_parser: Any, train: Any, evaluate: Any) -> None:
        self.script, self.build_parser, self.train, self.evaluate = script, build_parser, train, evaluate

    def __call__(self, args: Any, ctx: Any, _nprocs: int = 1) -> int:
        plan = plan_supervised_run(args, ctx, self.script, self.build_parser())
        if args.evaluate:
            return self.evaluate(args, ctx, args.evaluate_checkpoint or best_checkpoint_path(plan.run_dir))
        if plan.already_finished:
            return 0
        return self.train(args, ctx, plan)


def run_supervised(args: Any, entry: SupervisedEntry, argv: Optional[Sequence[str]] = None) -> int:
    """--gpu-id (the original's CUDA_VISIBLE_DEVICES, indexing the one already set), then ``entry``
    in every process.

    ``argv`` (default: this process's) is the command line, repeated in the torchrun
    command that the error for several --gpu-id GPUs in one process suggests.
    """
    if args.gpu_id is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices_for(args.gpu_id)
    refuse_data_parallel(args.gpu_id, args.device, f"{entry.script}.py", sys.argv[1:] if argv is None else argv)
    return launch(run_in_group(entry), args)
