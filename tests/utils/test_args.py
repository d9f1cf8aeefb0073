"""Every numeric flag of every script is checked when the command line is parsed.

A bad value (negative; zero where zero means nothing; a fraction of 1 or more) is one
line on stderr naming the flag and the rule, exit code 2, no traceback, before any data
or model is touched.
"""
import argparse

import pytest

import main_cifar
import main_imagenet
import main_lincls
import main_moco_mcl
from tests.script_helpers import load_script
from utils.args import NUMERIC_RULES, cap_workers, check_numeric_flags
from utils.cli import run_main
from utils.errors import ConfigError
from utils.machine import available_cpus

SCRIPTS = {
    "main_cifar": (main_cifar, []),
    "main_imagenet": (main_imagenet, []),
    "main_moco_mcl": (main_moco_mcl, []),
    "main_lincls": (main_lincls, []),
    "export": (load_script("export"), ["run_dir", "--out", "net.pth"]),
    "benchmark": (load_script("benchmark"), []),
    "benchmark_original": (load_script("benchmark_original"), ["--original", "MCL"]),
    "study_cifar": (load_script("study_cifar"), ["--data", "data"]),
}

# Flags where -1 means "unset" (the original's defaults): -2 is their bad value.
MINUS_ONE_ALLOWED = {"world_size", "rank"}
# Flags where zero means nothing (or divides by zero); the others give 0 a meaning (none, no cap, default).
ZERO_MEANINGLESS = {
    "epochs", "batch_size", "number_net", "feat_dim", "m_per_class", "init_lr", "lr", "tau", "kd_T", "moco_t",
    "moco_dim", "moco_k", "print_freq", "image_size", "pos_k", "neg_k", "knn_k", "knn_t", "synthetic_size",
    "synthetic_classes", "synthetic_test_size", "rep_dim", "steps", "repeats", "jobs", "dist_timeout",
    "meta_steps", "times",
}
FRACTIONS = {"nce_m", "moco_m", "momentum"}  # in [0, 1)


def numeric_actions(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if a.type in (int, float)]


def bad_values(action: argparse.Action):
    values = ["-2" if action.dest in MINUS_ONE_ALLOWED else "-1"]
    if action.dest in ZERO_MEANINGLESS:
        values.append("0")
    if action.dest in FRACTIONS:
        values.append("1")
    if action.type is float:
        values.append("nan")
    return values


def cases():
    for name, (module, base) in SCRIPTS.items():
        for action in numeric_actions(module.build_parser()):
            for value in bad_values(action):
                yield pytest.param(name, action.option_strings, value, id=f"{name}-{action.option_strings[0]}={value}")


@pytest.mark.parametrize("script,options,value", list(cases()))
def test_a_bad_numeric_value_is_one_line_naming_the_flag(capsys, script, options, value):
    module, base = SCRIPTS[script]
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, base + [options[-1], value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "/".join(options) in err and "must be" in err and value in err.replace("-1.0", "-1")


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_numeric_flag_has_a_rule_and_the_defaults_pass(script):
    """A rule in NUMERIC_RULES or in the script's own NUMERIC_RULE_OVERRIDES (what it passes to parse_flags)."""
    module = SCRIPTS[script][0]
    parser = module.build_parser()
    overrides = getattr(module, "NUMERIC_RULE_OVERRIDES", {})
    missing = [a.dest for a in numeric_actions(parser) if a.dest not in NUMERIC_RULES and a.dest not in overrides]
    assert not missing
    check_numeric_flags(parser, parser.parse_args(SCRIPTS[script][1]), overrides)


def test_a_numeric_flag_without_a_rule_is_a_bug():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-flag", type=int, default=1)
    with pytest.raises(LookupError, match="NUMERIC_RULES"):
        check_numeric_flags(parser, parser.parse_args([]))


def test_list_flags_check_every_value():
    parser = main_cifar.build_parser()
    with pytest.raises(ConfigError, match="--milestones must be at least 0 .got -5."):
        check_numeric_flags(parser, parser.parse_args(["--milestones", "10", "-5"]))


# ----------------------------------------------------------------------------- DataLoader workers

def test_workers_are_capped_at_the_cpus_once_with_a_note(capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    args = argparse.Namespace(num_workers=8, workers=32)
    cap_workers(args, cpus=4)
    assert (args.num_workers, args.workers) == (4, 4)
    out = capsys.readouterr().out
    assert "--num-workers 8 lowered to 4" in out and "--workers 32 lowered to 4" in out and out.count("\n") == 2
    cap_workers(args, cpus=4)  # nothing left to lower: silent
    assert capsys.readouterr().out == ""


def test_num_workers_share_the_cpus_among_torchrun_processes(capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    args = argparse.Namespace(num_workers=8, workers=8)
    cap_workers(args, cpus=4)
    assert (args.num_workers, args.workers) == (2, 4)  # --workers is per node and split later
    assert "shared by the 2 processes of this node" in capsys.readouterr().out


def test_zero_workers_stay_zero_and_parsing_caps():
    args = argparse.Namespace(num_workers=0)
    cap_workers(args, cpus=1, quiet=True)
    assert args.num_workers == 0
    assert main_cifar.parse_args(["--num-workers", "100000"]).num_workers <= available_cpus()
