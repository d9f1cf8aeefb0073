"""Every command in README.md names a real script and flags that script accepts."""
import importlib.util
import os
import re
import shlex

import pytest

from tests import ROOT  # noqa: E402


def readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def load_script(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3] + "_readme", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_invocations():
    for cmd in readme_commands():
        words = shlex.split(cmd.replace("...", ""))
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if scripts and words[0] in ("python", "python3", "torchrun"):
            i = scripts[0]
            yield pytest.param(words[i], words[i + 1:], id=cmd[:70])


def test_readme_has_commands():
    assert len(readme_commands()) > 10


@pytest.mark.parametrize("script,args", list(python_invocations()))
def test_python_command_parses(script, args):
    module = load_script(os.path.join(ROOT, script))
    module.build_parser().parse_args(args)


@pytest.mark.parametrize("cmd", [c for c in readme_commands() if c.startswith("bash ")])
def test_bash_command_names_a_script(cmd):
    assert os.path.isfile(os.path.join(ROOT, shlex.split(cmd)[1]))
