"""Mixed precision and memory format of the fast path, and the optimizer step that goes with them."""
import contextlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from utils.errors import ConfigError, UserError

AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class Precision:
    """``--amp`` and ``--channels-last``: autocast for the backbones, the inputs' memory format."""

    amp: str = "none"
    channels_last: bool = False

    def autocast(self, device: torch.device):
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)

    def prepare_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def validate_precision(amp: str, device: torch.device, warn: bool = True) -> None:
    """UserError for an --amp mode that ``device`` cannot run; a warning (when ``warn``: pass
    ``ctx.is_main`` so that a distributed run says it once) for one it runs slowly."""
    if amp not in AMP_MODES:
        raise UserError(f"--amp {amp!r} is not one of {', '.join(AMP_MODES)}")
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs CUDA (its gradient scaler is CUDA-only here); use --amp bf16 on CPU")
    if amp == "bf16" and device.type == "cuda" and not has_native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ConfigError(f"--amp bf16 (also set by --fast) needs a GPU with native bfloat16 (compute capability "
                          f"8.0 or higher); {torch.cuda.get_device_name(device)} ({major}.{minor}) would emulate it "
                          f"slowly or fail: use --amp fp16 (with --fast: --fast --amp fp16)")
    if warn and amp == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        print("warning: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so --amp bf16 (also set by --fast) "
              "is emulated and runs several times slower than float32 here; for speed on this CPU use "
              "--channels-last --data-path tensor without --amp", file=sys.stderr, flush=True)


def has_native_bf16(device: torch.device) -> bool:
    """Whether CUDA ``device`` computes in bfloat16 natively (Ampere, compute capability 8.0, or newer;
    ROCm GPUs do). Older GPUs emulate it, many times slower, or lack bf16 kernels (cuDNN convolutions)."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX). Without either (AVX2-only CPUs,
    AMD EPYC before Zen 4), oneDNN emulates bf16: several times slower than float32."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def make_grad_scaler(amp: str) -> Optional["torch.amp.GradScaler"]:
    """fp16 needs a gradient scaler (its exponent range is small); bf16 and float32 do not."""
    return torch.amp.GradScaler("cuda") if amp == "fp16" else None


def backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                      scaler: Optional["torch.amp.GradScaler"]) -> None:
    """``loss.backward()`` then ``optimizer.step()``, through ``scaler`` when there is one."""
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
