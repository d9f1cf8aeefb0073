"""The module a training step runs: ``--sync-bn``, DistributedDataParallel and ``--compile``.

A checkpoint always saves the plain module (``Method.model``); what is built here only
runs the step (``Method.ddp_model``), so neither flag changes a checkpoint's keys.

- ``--sync-bn`` (supervised scripts) converts every BatchNorm of the model, in place, to
  ``nn.SyncBatchNorm`` before DDP wraps it: under a process group BatchNorm then normalises
  with the statistics of the global batch, as one process on the whole batch would. The
  converted layers keep the same parameters, buffers and state-dict keys. In one process
  it changes nothing (BatchNorm already sees the whole batch) and is left out with a note;
  torch's SyncBatchNorm runs only on GPUs, so a process group on CPU refuses it.
- ``--compile`` wraps the step's module (the DDP wrapper when there is one, so DDP's
  graph-splitting optimiser sees the buckets) in ``torch.compile``; the loss functions are
  compiled by :func:`compiled_function`. Evaluation runs the plain module.

``MCL_COMPILE_BACKEND`` (an environment variable, for the test suite and the CPU dry run of
scripts/gpu_check.sh) picks torch.compile's backend; unset, it is inductor, torch's default.
"""
import os
import shutil
import sys
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from utils.errors import ConfigError
from utils.loop import wrap_ddp

BACKEND_ENV = "MCL_COMPILE_BACKEND"


def compile_backend() -> str:
    """torch.compile's backend: $MCL_COMPILE_BACKEND, else inductor."""
    return os.environ.get(BACKEND_ENV) or "inductor"


def check_compile_supported(device: torch.device) -> None:
    """ConfigError in one line when ``--compile`` cannot work here (before any training starts)."""
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        raise ConfigError(f"--compile: torch.compile does not support this Python ({torch.__version__} on "
                          f"{sys.version.split()[0]}); leave --compile out")
    if compile_backend() != "inductor":
        return
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # an older torch: let torch.compile say it
            return
        if not has_triton():
            raise ConfigError("--compile on CUDA needs Triton (pip install triton); leave --compile out")
    elif not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise ConfigError("--compile on CPU needs a C++ compiler (g++ or clang++); install one or leave "
                          "--compile out")


def compiled_module(module: nn.Module) -> nn.Module:
    """``torch.compile(module)``: runs (and trains) ``module``'s parameters; its state dict is never saved."""
    return torch.compile(module, backend=compile_backend())


def compiled_function(fn: Callable[..., Any], enabled: bool) -> Callable[..., Any]:
    """``fn`` compiled (a loss of pure tensor maths) when ``enabled``, else ``fn`` itself."""
    return torch.compile(fn, backend=compile_backend()) if enabled else fn


def convert_sync_bn(model: nn.Module, distributed: bool, device: torch.device) -> Optional[str]:
    """``--sync-bn``: every BatchNorm of ``model`` (in place, same parameters and keys) becomes a
    SyncBatchNorm under a process group on CUDA. Returns a note for the user when it is left out
    (one process), raises ConfigError where it cannot run (a process group on CPU)."""
    if not distributed:
        return "--sync-bn changes nothing in one process (BatchNorm already sees the whole batch); ignored"
    if device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA: torch's SyncBatchNorm does not run on CPU; leave it out "
                          "on CPU (each process then normalises with its own part of the batch)")
    nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the children in place
    return None


def step_module(model: nn.Module, ctx: Any, *, compile: bool = False, sync_bn: bool = False,
                not_broadcast: Sequence[str] = ()) -> nn.Module:
    """The module a training step runs: ``model`` (SyncBatchNorm under ``sync_bn``), in DDP under a
    process group (utils.loop.wrap_ddp, which leaves the buffers named in ``not_broadcast`` out of
    its broadcast), compiled under ``compile``. The caller keeps ``model`` for saving."""
    if sync_bn:
        note = convert_sync_bn(model, ctx.distributed, ctx.device)
        if note and ctx.is_main:
            print(f"note: {note}", flush=True)
    module = wrap_ddp(model, ctx, not_broadcast=not_broadcast)
    if compile:
        check_compile_supported(ctx.device)
        module = compiled_module(module)
    return module
