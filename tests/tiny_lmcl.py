"""A tiny CIFAR ResNet (one block per stage, "resnet8") for the L-MCL script tests only.

Registered on import, in the plain registry and as an L-MCL architecture, so the script tests
can train L-MCL for a few epochs in seconds. Subprocesses import this module before calling
``main_cifar.main`` (see ``run_script``).
"""
import os
import subprocess
import sys
from typing import Dict, List, Optional

from models import lmcl, resnet_cifar
from models.registry import registered_names

from tests import ROOT

TINY_ARCH = "resnet8"

if TINY_ARCH not in registered_names():
    resnet_cifar.register_cifar_resnet(TINY_ARCH, resnet_cifar.FusableBasicBlock, [1, 1, 1])
    lmcl._register_cifar_resnet(TINY_ARCH, resnet_cifar.FusableBasicBlock, 1)


def run_script(script: str, args: List[str], env_extra: Optional[Dict[str, str]] = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """``python <script>.py args`` with the tiny architecture registered, one intra-op thread."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import tests.tiny_lmcl; import {script}; "
            f"from utils.cli import run_main; run_main({script}.main, sys.argv[1:])")
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout)
