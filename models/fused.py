"""BatchNorm + (residual add) + ReLU as one op on the CPU fast path.

``bn_relu(bn, x, residual)`` is what the CIFAR networks call where they had
``relu(bn(x) [+ residual])``. Eager PyTorch runs that as two or three passes over memory, each
reading and writing the whole activation, and its channels_last BatchNorm is slow for the
16-channel layers of the CIFAR ResNets; on the fast path (bf16, channels_last, CPU) those ops
were about a third of a training step. The kernel in ``csrc/bn_relu_cpu.cpp`` does the
statistics in one pass and the normalisation, the residual add and the ReLU in a second (and
the backward in two), and is several times faster on those shapes (README, Speed).

The fused op runs only when all of these hold, otherwise the eager ops run, unchanged:
training mode with running statistics and a momentum; a CPU bfloat16 channels_last 4-D input
(what autocast + ``--channels-last`` give) with a multiple of 16 channels; the residual, if
any, of the same kind; a CPU with AVX-512 BF16; the kernel built. The float32 path (the
paper's protocol) never uses it. It is built with torch.utils.cpp_extension on first use
(20 to 60 s, announced in one line, then cached; it needs a C++ compiler and ninja); if that
fails, one warning and the eager ops. ``MCL_FUSED_BN=0`` in the environment turns it off (for A/B timing).

Maths (the eager one): y = relu((x - mean) * invstd * weight + bias [+ residual]) with the
batch mean and biased variance; running_mean / running_var move by ``momentum`` towards the
batch mean and the unbiased variance, and ``num_batches_tracked`` counts the step.
"""
import logging
import os
import sys
import threading
import warnings
from typing import Any, Optional, Tuple

import torch
import torch.nn as nn

from utils.machine import cpu_flags

_NAME = "mcl_bn_relu_cpu"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "bn_relu_cpu.cpp")
# -fopenmp: at::parallel_for is a header template; without it the kernel would run on one thread.
_CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
_LANES = 16

_kernel: Any = None
_kernel_tried = False
_lock = threading.Lock()


def _cpu_has_avx512_bf16() -> bool:
    """The instructions the kernel is compiled for (_CFLAGS)."""
    return {"avx512_bf16", "avx512bw", "avx512vl"} <= set(cpu_flags())


def _cpp_extension() -> Any:
    """torch.utils.cpp_extension, imported without the CUDA_HOME guess it logs on CPU-only installs
    (not the user's business here)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _build() -> Any:
    """Compile (or load from torch's extension cache) the kernel."""
    return _cpp_extension().load(_NAME, [_SOURCE], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)


def _cached_build() -> Tuple[bool, str]:
    """(whether torch's extension cache holds a build of the kernel newer than its source, the cache folder)."""
    try:
        folder = _cpp_extension()._get_build_directory(_NAME, verbose=False)  # private: used for a message only
    except Exception:
        return True, ""  # unknown: say nothing
    library = os.path.join(folder, _NAME + ".so")
    return os.path.exists(library) and os.path.getmtime(library) >= os.path.getmtime(_SOURCE), folder


def _announce_build() -> None:
    """One line before the first build, which takes a while and prints nothing (else the run looks hung)."""
    cached, folder = _cached_build()
    if not cached and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"building the fused BatchNorm+ReLU CPU kernel of the fast path, once for this machine (about a minute; "
              f"later runs load it from {folder})", flush=True)


def _load() -> Tuple[Any, Optional[str]]:
    """(kernel or None, what to warn about or None): None without a warning when switched off or
    when the CPU has no bf16 vector unit to use."""
    if os.environ.get("MCL_FUSED_BN", "1") == "0":
        return None, None
    if sys.platform != "linux" or not _cpu_has_avx512_bf16():
        return None, None
    try:
        _announce_build()
        return _build(), None
    except Exception as exc:  # no compiler, no ninja, ...: the eager ops still work
        lines = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def fused_kernel() -> Any:
    """The compiled extension, or None (disabled, unsupported CPU, or the build failed: warned once)."""
    global _kernel, _kernel_tried
    if _kernel_tried:
        return _kernel
    with _lock:
        if not _kernel_tried:
            _kernel, problem = _load()
            if problem:
                warnings.warn(f"fused BatchNorm+ReLU kernel not built ({problem}); the eager ops run instead "
                              "(a little slower). It needs a C++ compiler and ninja (pip install ninja).",
                              stacklevel=3)
            _kernel_tried = True
        return _kernel


def _is_compiling() -> bool:
    check = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3; torch._dynamo's before
    return bool(check() if check is not None else torch._dynamo.is_compiling())


def _fits(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.dim() == 4
            and t.size(1) % _LANES == 0 and t.is_contiguous(memory_format=torch.channels_last))


def can_fuse(bn: nn.BatchNorm2d, x: torch.Tensor, residual: Optional[torch.Tensor]) -> bool:
    if _is_compiling():
        return False  # under --compile, inductor fuses these ops itself (and cannot trace the extension)
    if not (bn.training and bn.track_running_stats and bn.momentum is not None and bn.affine):
        return False
    if type(bn) is not nn.BatchNorm2d or not _fits(x) or x.numel() // x.size(1) < 2:
        return False  # (one value per channel: eager raises its own error)
    if residual is not None and (residual.shape != x.shape or not _fits(residual)):
        return False
    return fused_kernel() is not None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) channels_last -> the same memory as a contiguous (N, H, W, C)."""
    return t.permute(0, 2, 3, 1)


class _BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, momentum: float, eps: float):
        y, mean, invstd, var, scale, offset = fused_kernel().forward(
            _rows(x), None if residual is None else _rows(residual), weight.detach(), bias.detach(), eps)
        count = x.numel() // x.size(1)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * (count / max(count - 1, 1)), alpha=momentum)
        # With a residual the ReLU mask must come from y; without, the backward recomputes it
        # from x (one stream less to read), so y is not kept for it.
        ctx.save_for_backward(x, y if residual is not None else None, mean, invstd, weight, scale, offset)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y, mean, invstd, weight, scale, offset = ctx.saved_tensors
        grad_rows = _rows(grad.contiguous(memory_format=torch.channels_last))
        dx, dweight, dbias, dz = fused_kernel().backward(grad_rows, _rows(x), None if y is None else _rows(y), mean,
                                                         invstd, weight.detach(), scale, offset)
        return dx, (dz if y is not None else None), dweight, dbias, None, None, None, None


def bn_relu(bn: nn.BatchNorm2d, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``relu(bn(x) + residual)`` (``relu(bn(x))`` without a residual): fused when it can be, else eager.

    x, residual: (N, C, H, W). The eager ops are exactly the networks' own: BatchNorm, in-place
    add, in-place ReLU.
    """
    if can_fuse(bn, x, residual):
        bn.num_batches_tracked.add_(1)
        return _BatchNormReLU.apply(x, residual, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                    float(bn.momentum), float(bn.eps))
    out = bn(x)
    if residual is not None:
        out += residual
    return torch.relu_(out)
