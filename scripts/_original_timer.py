"""Run the authors' own main_cifar.py on a CPU and time its training steps.

Used by scripts/benchmark_original.py, one process per timed round:

    python scripts/_original_timer.py ORIGINAL_DIR RESULT_JSON WARMUP STEPS THREADS -- ARGS...

ARGS go to the original's main_cifar.py unchanged, except that an ``--arch`` is matched to the
original's spelling (``wrn_16_2`` -> ``WRN_16_2``). Nothing of the original is edited; only what a
GPU-less machine needs is patched from outside:

- ``Tensor.cuda`` and ``Module.cuda`` return the object itself (the original calls ``.cuda()``
  on every model, tensor and loss);
- torchvision's CIFAR integrity check accepts files that exist (the synthetic set has no
  official MD5, and there is no network to download the real one);
- ``numpy.int``, which the original's sampler uses, is the builtin ``int`` again, as it was
  until NumPy 1.24.

A global optimizer step hook stamps the time after every step. The time from the end of step
WARMUP to the end of step WARMUP + STEPS covers STEPS whole iterations of the original's loop:
data loading, forward, backward, optimizer, its ``.item()`` logging and its per-batch print.
The result is written as JSON and the process leaves at once (the original would go on).
"""
import json
import os
import runpy
import sys
import time
from typing import Any, List


def patch_from_outside() -> None:
    import numpy as np
    import torch
    import torchvision.datasets.cifar as tv_cifar

    if not hasattr(np, "int"):
        np.int = int

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    tv_cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)


def original_arch_name(requested: str) -> str:
    """The original's ``models`` attribute that matches ``requested`` ignoring case."""
    import models  # the original's package: ORIGINAL_DIR is first on sys.path

    for name in dir(models):
        if name.lower() == requested.lower() and callable(getattr(models, name)):
            return name
    raise SystemExit(f"the original code has no architecture {requested!r}")


def with_original_arch(argv: List[str]) -> List[str]:
    argv = list(argv)
    if "--arch" in argv:
        i = argv.index("--arch") + 1
        argv[i] = original_arch_name(argv[i])
    return argv


def stop_after_steps(result_path: str, warmup: int, steps: int) -> None:
    """Stamp every optimizer step; after WARMUP + STEPS of them, write the timing and leave."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: List[float] = []

    def on_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) == warmup + steps:
            timed = stamps[warmup - 1:]
            result = {"seconds": timed[-1] - timed[0], "steps": steps,
                      "step_seconds": [b - a for a, b in zip(timed, timed[1:])]}
            with open(result_path, "w") as f:
                json.dump(result, f)
            sys.stdout.flush()
            os._exit(0)

    register_optimizer_step_post_hook(on_step)


def main() -> None:
    original, result_path, warmup, steps, threads = sys.argv[1:6]
    if sys.argv[6] != "--":
        raise SystemExit("usage: _original_timer.py ORIGINAL_DIR RESULT_JSON WARMUP STEPS THREADS -- ARGS...")
    original = os.path.abspath(original)
    sys.path.insert(0, original)
    import torch

    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    patch_from_outside()
    argv = with_original_arch(sys.argv[7:])
    stop_after_steps(result_path, max(1, int(warmup)), int(steps))
    script = os.path.join(original, "main_cifar.py")
    sys.argv = [script] + argv
    runpy.run_path(script, run_name="__main__")
    raise SystemExit("the original's training ended before the timed steps were done")


if __name__ == "__main__":
    main()
