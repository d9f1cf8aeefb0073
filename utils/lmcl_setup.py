"""Set-up of an L-MCL run (--method lmcl of main_cifar.py and main_imagenet.py): checks, model, optimizers,
the run loop, and --evaluate of its checkpoints."""
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from models.cohort import parse_arch_names
from models.lmcl import LMCLCohort, build_lmcl_cohort, get_plan
from models.lmcl_modules import LossWeightNetwork
from utils.checkpoint import seed_everything
from utils.errors import ConfigError
from utils.lmcl_method import HEAD_NOTES, LMCLMethod, LMCLModel, MetaConfig, build_lmcl_model, evaluate_lmcl
from utils.lmcl_step import LMCLObjective, nesterov_sgd
from utils.loop import LoopConfig, RunLoop, wrap_ddp
from utils.precision import Precision


def validate_lmcl_args(args: Any) -> None:
    """ConfigError for flags L-MCL cannot use (other ranges: utils.args.NUMERIC_RULES)."""
    if args.number_net < 2:
        raise ConfigError("--method lmcl contrasts networks with each other: use --number-net 2 or more")
    if args.logit_distill:
        raise ConfigError("--method lmcl always distils every network into the aggregated logits; drop "
                          "--logit-distill")
    if args.cohort == "branched":
        raise ConfigError("--method lmcl trains independent networks (each with its own auxiliary branches); "
                          "drop --cohort branched")
    for name in parse_arch_names(args.arch, args.number_net):
        get_plan(name)  # a ConfigError naming the L-MCL architectures
    for flag, value in (("--init-from", getattr(args, "init_from", None)), ("--compile", getattr(args, "compile", False)),
                        ("--sync-bn", getattr(args, "sync_bn", False))):
        if value:
            raise ConfigError(f"--method lmcl does not support {flag} yet; drop it (it works with --method mcl)")


def lmcl_objective(args: Any) -> LMCLObjective:
    return LMCLObjective(tau=args.tau, kd_T=args.kd_T, alpha=args.alpha, gamma=args.gamma, beta=args.beta,
                         lam=args.lam)


def meta_config(args: Any) -> MetaConfig:
    """The meta step of the flags; its virtual steps and the weight optimizer use --weight-decay, as the
    authors' scripts do (5e-4 on CIFAR, 1e-4 on ImageNet)."""
    return MetaConfig(freq=args.meta_freq, times=args.times, exact_hypergradient=args.exact_hypergradient,
                      restore_bn=args.restore_bn_after_meta, weight_decay=args.weight_decay)


def build_lmcl(args: Any, num_classes: int, device: torch.device
               ) -> Tuple[LMCLCohort, LMCLModel, LossWeightNetwork, torch.optim.Optimizer, torch.optim.Optimizer]:
    """(cohort, model = cohort + heads + aggregator on ``device``, weight network, the normal update's SGD,
    the weight network's SGD), seeded by --manual_seed; both optimizers nesterov, momentum 0.9."""
    seed_everything(args.manual_seed)
    cohort = build_lmcl_cohort(args.arch, args.number_net, num_classes)
    model, weight_net = build_lmcl_model(cohort, args.feat_dim)
    model, weight_net = model.to(device), weight_net.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = nesterov_sgd(model.parameters(), args.init_lr, weight_decay=args.weight_decay)
    weight_optimizer = nesterov_sgd(weight_net.parameters(), args.init_lr, weight_decay=args.weight_decay)
    return cohort, model, weight_net, optimizer, weight_optimizer


def lmcl_loop(args: Any, ctx: Any, plan: Any, model: LMCLModel, weight_net: LossWeightNetwork,
              optimizer: torch.optim.Optimizer, weight_optimizer: torch.optim.Optimizer, contrast: Any,
              train_data: Any, eval_data: Any, logger: Any, meta: Dict[str, Any]) -> RunLoop:
    """The run loop of an L-MCL run, resumed from ``plan.ckpt`` when there is one."""
    precision = Precision(args.amp, args.channels_last)
    method = LMCLMethod(model, wrap_ddp(model, ctx), weight_net, weight_optimizer, optimizer, lmcl_objective(args),
                        contrast, meta_config(args), eval_data, ctx.device, precision, args.max_eval_batches,
                        progress=not args.no_progress and ctx.is_main, embeddings=args.tb_embeddings)
    loop = RunLoop(method, optimizer, train_data, ctx, LoopConfig.from_flags(args), precision, logger,
                   plan.run_dir, {**meta, "method": "lmcl"})
    method.attach(loop.state)
    if plan.ckpt is not None:
        loop.restore(plan.ckpt, plan.resume_path)
    return loop


def lmcl_description(model: nn.Module, weight_net: nn.Module) -> str:
    """Sizes of the modules only training uses."""
    def millions(m: nn.Module) -> str:
        return f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"

    return (f"L-MCL: {model.cohort.number_stage} stages per network; heads {millions(model.heads)}, aggregator "
            f"{millions(model.aggregator)}, weight network {millions(weight_net)} parameters")


def rebuild_lmcl_model(ckpt: Dict[str, Any], device: torch.device) -> LMCLModel:
    """The cohort, heads and aggregator of an L-MCL checkpoint, loaded, on ``device``."""
    cohort = build_lmcl_cohort(ckpt["arch"], ckpt["number_net"], ckpt["num_classes"])
    model, _ = build_lmcl_model(cohort, int(ckpt["config"]["feat_dim"]))
    cohort.load_state_dict(ckpt["model"])
    model.heads.load_state_dict(ckpt["heads"])
    model.aggregator.load_state_dict(ckpt["extra"]["aggregator"])
    return model.to(device)


def evaluate_saved_lmcl(ckpt: Dict[str, Any], path: str, eval_data: Any, device: torch.device, precision: Any,
                        max_batches: int, data_description: str, is_main: bool, progress: bool = False) -> int:
    """--evaluate of an L-MCL checkpoint: per network its final head and its aggregated logits, and the
    ensemble of the final heads (top-1/top-5; NLL and ECE of the final heads and the ensemble)."""
    model = rebuild_lmcl_model(ckpt, device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    r = evaluate_lmcl(model, eval_data, device, precision, max_batches, progress and is_main)
    if is_main:
        names = model.cohort.arch_names
        print(f"evaluated {path} (epoch {ckpt['epoch']}, L-MCL) on {r['images']} {data_description}")
        for i, name in enumerate(names):
            print(f"  net {i} ({name}): top-1 {r['top1'][i]:.2f}  top-5 {r['top5'][i]:.2f}  NLL {r['nll'][i]:.4f}  "
                  f"ECE {r['ece'][i]:.2f}%")
        for i, name in enumerate(names):
            print(f"  net {i} ({name}) aggregated: top-1 {r['agg_top1'][i]:.2f}  top-5 {r['agg_top5'][i]:.2f}")
        print(f"  ensemble: top-1 {r['ens_top1']:.2f}  top-5 {r['ens_top5']:.2f}  NLL {r['ens_nll']:.4f}  "
              f"ECE {r['ens_ece']:.2f}%")
        print(f"  (net i: {HEAD_NOTES['top1']}; aggregated: {HEAD_NOTES['agg_top1']}; {HEAD_NOTES['ens_top1']}; "
              "NLL: mean negative log-likelihood in nats; ECE: expected calibration error, 15 confidence bins)")
    return 0
