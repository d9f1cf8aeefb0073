"""Run the entry scripts and the scripts under scripts/ in-process, as their users would from a shell."""
import contextlib
import importlib.util
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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


def exit_code(stop: SystemExit) -> int:
    """The exit status a process gets from ``stop``, as the interpreter computes it."""
    return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)


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
            run_main(main, argv)  # always ends in SystemExit
        except SystemExit as stop:
            code = exit_code(stop)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def start_forked(main: Callable, argv: List[str], env_extra: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None) -> "ForkedRun":
    """Start ``python script.py argv`` as a forked child of this process: torch and the project are already
    imported there, which saves the seconds a new interpreter spends importing them. The child runs ``main``
    as the command line does, with ``env_extra`` added to its environment and in ``cwd``; a kill or a signal
    ends it as it would end the script's own process. For runs that must be processes of their own (killed,
    signalled, one rank of a group)."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:  # the child: leaves through os._exit, never back into pytest
        code = 1
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.environ.update(env_extra or {})
            if cwd is not None:
                os.chdir(cwd)
            run_main(main, argv)
        except SystemExit as stop:
            code = exit_code(stop)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    return ForkedRun(pid, argv, out, err)


class ForkedRun:
    """A child started by :func:`start_forked`; ``wait`` gives its CompletedProcess."""

    def __init__(self, pid: int, argv: Sequence[str], out, err):
        self.pid, self.argv, self.out, self.err = pid, list(argv), out, err
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.returncode = -signal.SIGKILL

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise subprocess.TimeoutExpired(self.argv, timeout, self._read(self.out), self._read(self.err))
            time.sleep(0.02)
        return subprocess.CompletedProcess(self.argv, self.returncode, self._read(self.out), self._read(self.err))

    @staticmethod
    def _read(f) -> str:
        f.seek(0)
        text = f.read().decode(errors="replace")
        f.close()
        return text


def run_forked(main: Callable, argv: List[str], env_extra: Optional[Dict[str, str]] = None,
               cwd: Optional[str] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """:func:`start_forked` and wait for the child."""
    return start_forked(main, argv, env_extra, cwd).wait(timeout)
