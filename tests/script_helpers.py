"""Run the scripts under scripts/ in-process, as their users would from a shell."""
import importlib.util
import os
from types import ModuleType
from typing import Callable, List, Tuple

import pytest

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
