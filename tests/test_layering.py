"""The layering: models/, losses/ and data/ sit below the run loop and never import it.

Basics they may use (utils.errors, utils.distributed, utils.checkpoint, utils.state_keys) sit
at the bottom; the training loop and the methods (utils.loop, utils.supervised, ...) sit above.
Each package is imported module by module in a fresh interpreter, as ``python -c`` would.
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


def modules_of(package: str):
    path = os.path.join(ROOT, package)
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules([path])]


@pytest.mark.parametrize("package", ["losses", "models", "data"])
def test_package_does_not_import_the_run_loop(package):
    code = CHECK.format(loop=RUN_LOOP, modules=modules_of(package))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.strip() == "ok"


def test_the_check_sees_a_run_loop_import():
    code = CHECK.format(loop=RUN_LOOP, modules=["utils.supervised"])
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "utils.supervised imports the run loop" in done.stderr
