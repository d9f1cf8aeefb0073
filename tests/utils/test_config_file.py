"""--config FILE: YAML or JSON flag values under the command line's, for all four scripts."""
import argparse
import json
import re
import sys

import pytest

import main_cifar
import main_imagenet
import main_lincls
import main_moco_mcl
from tests.script_helpers import run_cli
from utils.config_file import config_defaults, read_config_file
from utils.errors import ConfigError
from utils.run_files import RECORDED_KEYS


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_values_become_flags_and_the_command_line_wins(tmp_path):
    path = write(tmp_path, "mcl.yaml", "arch: wrn_16_2\nnumber-net: 2\nalpha: 0.1\nmilestones: [10, 20]\n"
                                       "seed: 3\nlogit_distill: true\nlr-type: multistep\n")
    args = main_cifar.parse_args(["--config", path, "--alpha", "0.5"])
    assert (args.arch, args.number_net, args.milestones, args.manual_seed) == ("wrn_16_2", 2, [10, 20], 3)
    assert args.logit_distill and args.lr_type == "multistep"
    assert args.alpha == 0.5  # the command line overrides the file
    assert args.config == path


@pytest.mark.parametrize("module,values", [
    (main_cifar, {"epochs": 7, "fast": True}),
    (main_imagenet, {"epochs": 7, "neg_k": 16}),
    (main_moco_mcl, {"epochs": 7, "moco-k": 64, "aug_plus": True}),
    (main_lincls, {"epochs": 7, "net-index": 1}),
])
def test_every_script_takes_a_json_config(tmp_path, module, values):
    args = module.parse_args(["--config", write(tmp_path, "c.json", json.dumps(values))])
    for key, value in values.items():
        assert getattr(args, key.replace("-", "_")) == value


def test_a_runs_own_config_json_skips_what_the_run_recorded(tmp_path):
    recorded = {key: "anything" for key in RECORDED_KEYS}
    path = write(tmp_path, "config.json", json.dumps({**recorded, "config": "old.yaml", "epochs": 3}))
    assert main_cifar.parse_args(["--config", path]).epochs == 3


@pytest.mark.parametrize("text,message", [
    ('{"arhc": "resnet32"}', r"unknown key arhc \(did you mean arch\?\)"),
    ('{"epochs": "ten"}', r"epochs must be an integer \(got 'ten'\)"),
    ('{"epochs": 2.5}', r"epochs must be an integer"),
    ('{"lr_type": "linear"}', r"lr_type must be one of cosine, multistep"),
    ('{"fast": "yes"}', r"fast must be true or false"),
    ('{"epochs": null}', r"epochs cannot be null"),
    ('[1, 2]', r"must hold a mapping of flag names to values, not a list"),
    ('{"epochs": 3', r"is not valid JSON"),
])
def test_a_bad_config_is_one_line_naming_the_key(tmp_path, capsys, text, message):
    path = write(tmp_path, "bad.json", text)
    code, _, err = run_cli(main_cifar.main, ["--config", path], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: --config {path}")
    assert re.search(message, err), err


def test_numeric_rules_apply_to_config_values(tmp_path, capsys):
    code, _, err = run_cli(main_cifar.main, ["--config", write(tmp_path, "c.json", '{"epochs": 0}')], capsys)
    assert code == 2 and "--epochs must be at least 1 (got 0)" in err


def test_a_missing_file_is_named(tmp_path, capsys):
    code, _, err = run_cli(main_cifar.main, ["--config", str(tmp_path / "none.yaml")], capsys)
    assert code == 2 and "cannot read --config" in err and "none.yaml" in err


def test_yaml_without_pyyaml_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ConfigError, match="needs PyYAML: pip install pyyaml"):
        read_config_file(write(tmp_path, "c.yaml", "epochs: 3\n"))


def test_an_unnamed_extension_is_read_as_json_or_yaml(tmp_path):
    pytest.importorskip("yaml", reason="PyYAML is an optional extra")
    assert read_config_file(write(tmp_path, "a.cfg", '{"epochs": 3}')) == {"epochs": 3}
    assert read_config_file(write(tmp_path, "b.cfg", "epochs: 4\n")) == {"epochs": 4}
    assert read_config_file(write(tmp_path, "empty.yaml", "")) == {}


def test_string_flags_take_numbers_and_lists_take_scalars():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu-id", default=None, type=str)
    parser.add_argument("--milestones", default=[1], type=int, nargs="+")
    assert config_defaults(parser, {"gpu_id": 0, "milestones": 5}, "c") == {"gpu_id": "0", "milestones": [5]}
