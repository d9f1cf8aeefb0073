"""A small Python API: MCL's pieces for your own training loop, and the scripts' training from Python.

Import it from the checkout (or with the checkout on PYTHONPATH), as the scripts do:
``from utils import api``. The README's "Python API" section has an example that the tests run.

Your own loop::

    model = api.build_model("resnet32", number_net=2, num_classes=100)   # cohort + projection heads
    logits, features, embeddings = model(images)                        # N (B, C), N (B, F_n), N (B, 128)
    losses = api.mcl_loss(logits, embeddings, labels, alpha=0.1, gamma=1.0, beta=0.1, lam=1.0)
    losses["loss"].backward()

A script's whole training (checkpoints, resume, dashboards, summary)::

    api.run_script("main_cifar", ["--arch", "resnet32", "--alpha", "0.1"])      # the command line's words
    api.run_script("main_cifar", {"arch": "resnet32", "alpha": 0.1})            # or flag names -> values,
    api.run_script("main_cifar", {"config": "mcl.yaml", "seed": 1})             # as in --config files
    run = api.read_run("checkpoint/RUN")                                        # config, metrics, summary
"""
import difflib
import importlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from data.batch import Batch
from losses.ensemble import ensemble_logits
from losses.mcl import build_projection_heads
from models import build_cohort as _build_cohort
from utils.config_file import CONFIG_FLAG, flag_actions, has_config_flag
from utils.contrast import InBatchContrast
from utils.errors import ConfigError
from utils.run_dirs import Run, load_run
from utils.run_files import RECORDED_KEYS
from utils.supervised import CohortWithHeads, Objective, compute_loss

SCRIPTS = ("main_cifar", "main_imagenet", "main_moco_mcl", "main_lincls")

__all__ = ["SCRIPTS", "build_cohort", "build_heads", "build_model", "config_to_argv", "ensemble_logits", "mcl_loss",
           "read_run", "run_script"]


# ----------------------------------------------------------------------------- your own training loop

def build_cohort(arch: str, number_net: int = 2, num_classes: int = 100, topology: str = "auto") -> nn.Module:
    """The cohort of ``number_net`` networks (``arch``: a registered name, a torchvision classifier name,
    or a comma-separated list for a mixed cohort). ``topology``: ``auto`` (the original's rule: 2 networks
    independent, otherwise one shared stem with branches), ``independent`` or ``branched``.

    ``cohort(x)`` for images (B, 3, H, W) -> (N logits (B, num_classes), N features (B, F_n));
    ``cohort.feature_dims`` are the F_n.
    """
    return _build_cohort(arch, number_net, num_classes, topology)


def build_heads(cohort: nn.Module, feat_dim: int = 128) -> nn.ModuleList:
    """One projection head per network (Linear, ReLU, Linear, L2 normalisation; float32 under autocast):
    features (B, F_n) -> embeddings (B, ``feat_dim``), the inputs of the MCL terms."""
    return build_projection_heads(cohort.feature_dims, feat_dim)


def build_model(arch: str, number_net: int = 2, num_classes: int = 100, topology: str = "auto",
                feat_dim: int = 128) -> CohortWithHeads:
    """Cohort and heads as one module: ``model(x)`` -> (N logits (B, C), N features, N embeddings (B, feat_dim)).
    Its ``cohort`` and ``heads`` are the two parts (a checkpoint's "model" and "heads")."""
    cohort = build_cohort(arch, number_net, num_classes, topology)
    return CohortWithHeads(cohort, build_heads(cohort, feat_dim))


def mcl_loss(logits: Sequence[torch.Tensor], embeddings: Optional[Sequence[torch.Tensor]], targets: torch.Tensor, *,
             alpha: float = 0.0, gamma: float = 0.0, beta: float = 0.0, lam: float = 0.0, tau: float = 0.1,
             kd_T: float = 3.0, logit_distill: bool = False) -> Dict[str, torch.Tensor]:
    """The loss of one step of supervised MCL with in-batch contrast (main_cifar.py's; docs/method.md §2).

    ``logits``: N (B, C); ``embeddings``: N (B, D) L2-normalised (the heads' outputs; None without the
    contrastive terms); ``targets`` (B,). ``alpha``, ``gamma``, ``beta``, ``lam`` weigh VCL, soft VCL, ICL and
    soft ICL (the paper: 0.1, 1, 0.1, 1); ``tau`` is the contrastive temperature, ``kd_T`` that of the
    soft terms; ``logit_distill`` adds distillation from the (detached) ensemble. Every class of the batch
    needs two images or more (the m-per-class sampler's batches). Under DDP the embeddings are gathered
    over the ranks (the global batch).

    Returns the weighted terms: ``loss`` (their sum, to backpropagate), ``loss_cls`` (cross-entropy summed
    over the networks), ``loss_kd``, ``vcl``, ``soft_vcl``, ``icl``, ``soft_icl``; scalar tensors.
    """
    objective = Objective(alpha, gamma, beta, lam, logit_distill, kd_T)
    batch = Batch(inputs=targets.new_empty(0), targets=targets)
    return compute_loss(list(logits), list(embeddings) if embeddings is not None else None, batch, objective,
                        InBatchContrast(tau, kd_T))


# ----------------------------------------------------------------------------- the scripts

def _script_module(script: str) -> Any:
    name = script[:-3] if script.endswith(".py") else script
    if name not in SCRIPTS:
        raise ConfigError(f"unknown script {script!r}; choose one of {', '.join(SCRIPTS)}")
    return importlib.import_module(name)


def _flag_value_words(flag: str, value: Any, action: Any) -> List[str]:
    if isinstance(value, bool):
        if action.nargs == 0:  # store_true / store_false
            return [flag] if value != action.default else []
        if action.nargs == "?":  # e.g. --resume: alone, its const
            return [flag] if value else []
        return [flag, str(value)]
    if isinstance(value, (list, tuple)):
        return [flag, *(str(v) for v in value)]
    return [flag, str(value)]


def _long_option(action: Any, name: str) -> Optional[str]:
    """The option ``name`` spells (``seed`` -> --seed, not its alias --manual_seed), else the first long one."""
    for option in ("--" + name, "--" + name.replace("_", "-"), "--" + name.replace("-", "_")):
        if option in action.option_strings:
            return option
    return next((o for o in action.option_strings if o.startswith("--")), None)


def config_to_argv(script: str, config: Mapping[str, Any]) -> List[str]:
    """The command-line words of ``config`` for ``script``: keys are flag names as --help spells them, with
    or without the dashes, ``-`` or ``_`` alike (``init_lr``, ``--init-lr``), as in a ``--config`` file
    (utils.config_file); True switches a flag on, a list gives a flag several values, None leaves a flag at
    its default. A run's recorded keys (topology, versions, provenance, ...) are skipped, so a run's
    ``read_run(...).config`` reruns it; a ``config`` key names a --config file the other keys override.
    ConfigError naming an unknown key."""
    parser = _script_module(script).build_parser()
    actions = flag_actions(parser)
    if has_config_flag(parser):
        actions["config"] = parser._option_string_actions[CONFIG_FLAG]
    argv: List[str] = []
    for key, value in config.items():
        name = str(key).lstrip("-")
        action = actions.get(name, actions.get(name.replace("-", "_")))
        if action is None and name.replace("-", "_") in RECORDED_KEYS:
            continue
        if action is None:
            known = [k for k in actions if "-" not in k]
            close = difflib.get_close_matches(name.replace("-", "_"), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{script}: unknown flag {key!r}{hint}; see python {script}.py --help")
        if value is not None:
            argv += _flag_value_words(_long_option(action, name), value, action)
    return argv


def run_script(script: str, args: Union[Sequence[str], Mapping[str, Any]] = ()) -> int:
    """Run ``script``'s training (or evaluation) in this process, as ``python SCRIPT.py ARGS`` would: ``args``
    are the command line's words, or a mapping of flag names to values (:func:`config_to_argv`).

    Returns the exit code (0 when done). Bad input raises utils.errors.UserError (the command line prints
    it as one line); the run seeds the global random generators, as the script does.
    """
    argv = config_to_argv(script, args) if isinstance(args, Mapping) else [str(a) for a in args]
    return int(_script_module(script).main(argv) or 0)


def read_run(run_dir: str) -> Run:
    """A run directory's ``config`` (config.json), ``records`` (metrics.jsonl, one per epoch) and ``summary``
    (summary.json, None while unfinished)."""
    return load_run(run_dir)
