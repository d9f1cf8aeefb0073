"""The layering: models/, losses/ and data/ sit below the run loop and never import it.

Basics they may use (utils.errors, utils.distributed, utils.checkpoint, utils.state_keys) sit
at the bottom; the training loop and the methods (utils.loop, utils.supervised, ...) sit above.
The packages are imported module by module in a fresh interpreter, as ``python -c`` would.
"""
import os
import pkgutil
import subprocess
import sys

import pytest

from tests import ROOT

RUN_LOOP = ("utils.loop", "utils.method", "utils.stop", "utils.supervised", "utils.moco_pretrain", "utils.lincls",
            "utils.script_setup", "utils.launch", "utils.contrast", "utils.knn")
CHECK = """
import importlib, sys
loop = {loop!r}
for name in {modules!r}:
    importlib.import_module(name)
    found = [m for m in loop if m in sys.modules]
    if found:
        sys.exit(f"{{name}} imports the run loop: {{', '.join(found)}}")
print("ok")
"""


PACKAGES = ("losses", "models", "data")


def modules_of(package: str):
    path = os.path.join(ROOT, package)
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules([path])]


@pytest.fixture(scope="module")
def checked():
    """One fresh interpreter imports every module of the three packages, then utils.supervised, which must
    be caught: a module that imported the run loop would have stopped the check before it."""
    modules = [m for package in PACKAGES for m in modules_of(package)] + ["utils.supervised"]
    code = CHECK.format(loop=RUN_LOOP, modules=modules)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_packages_do_not_import_the_run_loop(checked):
    assert checked.stderr.startswith("utils.supervised imports the run loop: "), checked.stderr


def test_the_check_sees_a_run_loop_import(checked):
    assert checked.returncode == 1 and checked.stdout == ""
