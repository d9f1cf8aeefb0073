"""Run the entry scripts and the scripts under scripts/ in-process, as their users would from a shell."""
import contextlib
import importlib.util
import io
import os
import random
import subprocess
from types import ModuleType
from typing import Callable, List, Tuple

import numpy as np
import pytest
import torch

from utils.cli import run_main

from tests import ROOT  # noqa: E402


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(main: Callable, argv: List[str], capsys) -> Tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``main(argv)`` run as the command line does."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def script_cli(name: str) -> Callable[[List[str], object], Tuple[int, str, str]]:
    """``cli(argv, capsys) -> (exit code, stdout, stderr)`` of scripts/<name>.py."""
    main = load_script(name).main
    return lambda argv, capsys: run_cli(main, argv, capsys)


@contextlib.contextmanager
def restored_global_state():
    """Put back what a script run changes for the whole process: torch's threads, deterministic mode and
    cudnn flags, the random generators, the environment."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    environ = dict(os.environ)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        os.environ.clear()
        os.environ.update(environ)


def run_in_process(main: Callable, argv: List[str]) -> subprocess.CompletedProcess:
    """``python script.py argv`` without a new interpreter (whose imports cost seconds): ``main`` run as the
    command line does, its exit code, stdout and stderr in a CompletedProcess. For runs that need no signal,
    kill or environment of their own."""
    out, err = io.StringIO(), io.StringIO()
    with restored_global_state(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_main(main, argv)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
