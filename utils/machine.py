"""What this machine offers and what a run needs to be reproduced on another.

:func:`available_cpus` sizes the DataLoader workers; :func:`provenance` is what
config.json records besides the flags: the command line, the code's git commit (and
whether the tree had uncommitted changes), the host, CPU and GPU names, CUDA and cuDNN
versions and the versions of the packages that shape the numbers.
"""
import importlib.metadata
import os
import platform
import shlex
import socket
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_parsed_arguments: Optional[List[str]] = None  # what the script's parse_flags last parsed, in this process
PACKAGES = ("torch", "torchvision", "numpy", "pillow", "tensorboard", "tqdm", "timm", "wandb", "pyyaml")


def _cgroup_cpu_limit() -> Optional[int]:
    """CPUs a cgroup v2 quota allows (containers started with --cpus), or None without a quota."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, int(int(quota) // int(period)))


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, lowered by a container's CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(cpus, limit) if limit else cpus)


def _cpuinfo_value(key: str) -> Optional[str]:
    """The value of the first ``key`` line of /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    return _cpuinfo_value("model name") or platform.processor() or platform.machine()


def cpu_flags() -> List[str]:
    """The CPU's instruction-set flags (from /proc/cpuinfo on Linux; empty elsewhere)."""
    return (_cpuinfo_value("flags") or "").split()


def gpu_names() -> List[str]:
    """Names of the visible CUDA devices (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> Dict[str, Any]:
    """{"commit": hash or None, "dirty": True when tracked or untracked (not ignored) files differ from it}."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions(names: Sequence[str] = PACKAGES) -> Dict[str, str]:
    """{package: version} of the installed ones among ``names``, and Python's."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The shell command that started this process (``argv``: its arguments, default sys.argv)."""
    return shlex.join([os.path.basename(sys.executable)] + list(sys.argv if argv is None else argv))


def record_arguments(arguments: Sequence[str]) -> None:
    """Remember the arguments a script parsed (utils.args.parse_flags), for :func:`provenance`."""
    global _parsed_arguments
    _parsed_arguments = list(arguments)


def provenance() -> Dict[str, Any]:
    """What config.json records to reproduce a run (see the module docstring).

    "arguments" is added when the arguments the script parsed differ from the process's
    command line (a script run from Python with its own list).
    """
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    record = {
        "command": command_line(),
        "cwd": os.getcwd(),
        "git": git_state(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpus": available_cpus(),
        "gpus": gpu_names(),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "packages": package_versions(),
    }
    if _parsed_arguments is not None and _parsed_arguments != sys.argv[1:]:
        record["arguments"] = list(_parsed_arguments)
    return record
