"""Every command of scripts/train_cifar_*.sh and scripts/train_imagenet_*.sh parses.

The shell scripts are run with ``LAUNCH=echo``, so they print their command lines instead of
training; each line is then parsed by the parse_args of the entry script it names (the same
checks a real run starts with), and its architectures are looked up.
"""
import functools
import glob
import importlib.util
import os
import shlex
import subprocess

import pytest

from models.cohort import check_known
from models.lmcl import lmcl_architectures

from tests import ROOT  # noqa: E402

TRAIN_SCRIPTS = sorted(os.path.basename(p) for pattern in ("train_cifar_*.sh", "train_imagenet_*.sh")
                       for p in glob.glob(os.path.join(ROOT, "scripts", pattern)))
EXTRA = ["--manual_seed", "7"]  # reaches every run ("$@")
CIFAR_LMCL_ROWS = ["resnet32", "resnet56", "resnet110", "wrn_16_2", "wrn_40_2", "ShuffleNetV2_1x", "hcgnet_A2"]
IMAGENET_LMCL_ROWS = ["resnet34", "resnet18,shufflenet_v2_x1_0", "resnet18,resnet50"]


def printed_commands(script):
    """The command lines ``scripts/<script>`` would run, as lists of words."""
    out = subprocess.run(["bash", os.path.join("scripts", script), *EXTRA], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "LAUNCH": "echo"})
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def entry_module(name):
    spec = importlib.util.spec_from_file_location(f"{name[:-3]}_train_scripts", os.path.join(ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flag_value(words, flag):
    return words[words.index(flag) + 1] if flag in words else None


def test_the_train_scripts_are_found():
    assert {"train_cifar_mcl.sh", "train_cifar_lmcl.sh", "train_imagenet_mcl.sh",
            "train_imagenet_lmcl.sh"} <= set(TRAIN_SCRIPTS)


@pytest.mark.parametrize("script", TRAIN_SCRIPTS)
def test_every_command_parses(script):
    commands = printed_commands(script)
    assert commands, f"{script} printed no command"
    for words in commands:
        entry, argv = words[0], words[1:]
        assert entry in ("main_cifar.py", "main_imagenet.py"), words
        assert "--resume" in argv and argv[-len(EXTRA):] == EXTRA, words
        module = entry_module(entry)
        args = module.parse_args(argv)
        assert args.manual_seed == 7
        for name in args.arch.split(","):
            if getattr(args, "method", "mcl") == "lmcl":
                assert name in lmcl_architectures(), name
            else:
                check_known(name)  # CohortError for an unknown name


@pytest.mark.parametrize("script,entry,rows", [("train_cifar_lmcl.sh", "main_cifar.py", CIFAR_LMCL_ROWS),
                                               ("train_imagenet_lmcl.sh", "main_imagenet.py", IMAGENET_LMCL_ROWS)])
def test_lmcl_scripts_run_the_papers_rows(script, entry, rows):
    """The L-MCL scripts train the paper's rows, two networks each, with --method lmcl (README table)."""
    commands = printed_commands(script)
    assert [flag_value(words, "--arch") for words in commands] == rows
    for words in commands:
        assert words[0] == entry
        assert flag_value(words, "--method") == "lmcl" and flag_value(words, "--number-net") == "2", words
        for name in flag_value(words, "--arch").split(","):
            assert name in lmcl_architectures(), name
