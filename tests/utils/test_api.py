"""utils/api.py: the README's Python API example runs as written; flag dicts become command lines."""
import os
import re
import subprocess
import sys

import pytest
import torch

from tests import ROOT
from utils import api
from utils.errors import ConfigError


def readme_api_example() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section has one python example"
    return blocks[0]


def test_the_readme_example_runs_as_written(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_api_example())
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    code, best, ece = done.stdout.strip().splitlines()[-1].split()
    assert code == "0" and 0 <= float(best) <= 100 and 0 <= float(ece) <= 100
    assert (tmp_path / "runs" / "api" / "example" / "summary.json").exists()


def test_mcl_loss_has_the_weighted_terms_and_a_gradient():
    torch.manual_seed(0)
    model = api.build_model("resnet32", number_net=2, num_classes=4, feat_dim=16)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    logits, features, embeddings = model(images)
    assert len(logits) == len(embeddings) == 2 and embeddings[0].shape == (8, 16)
    plain = api.mcl_loss(logits, None, labels)
    assert plain["icl"] == 0 and torch.allclose(plain["loss"], plain["loss_cls"])
    losses = api.mcl_loss(logits, embeddings, labels, alpha=0.1, gamma=1.0, beta=0.1, lam=1.0, logit_distill=True)
    assert set(losses) == {"loss", "loss_cls", "loss_kd", "vcl", "soft_vcl", "icl", "soft_icl"}
    total = sum(losses[k] for k in losses if k != "loss")
    assert torch.allclose(losses["loss"], total) and losses["icl"] > 0 and losses["loss_kd"] > 0
    losses["loss"].backward()
    assert model.heads[1].proj_head[0].weight.grad is not None
    assert api.build_heads(api.build_cohort("resnet32", 3, 10), 32)[2].proj_head[2].out_features == 32


def test_a_flag_dict_becomes_the_command_line():
    argv = api.config_to_argv("main_cifar", {"arch": "resnet32", "--init-lr": 0.05, "milestones": [150, 225],
                                             "logit_distill": True, "visit_all": False, "gpu_id": None,
                                             "resume": True, "seed": 3})
    assert argv == ["--arch", "resnet32", "--init-lr", "0.05", "--milestones", "150", "225", "--logit-distill",
                    "--resume", "--seed", "3"]
    assert api.config_to_argv("main_moco_mcl", {"batch_size": 8, "aug_plus": True}) == ["--batch-size", "8",
                                                                                         "--aug-plus"]


def test_a_recorded_config_dict_skips_what_the_run_found_and_may_name_a_config_file():
    recorded = {"arch": "resnet32", "topology": "independent", "num_classes": 100, "versions": {"torch": "x"},
                "provenance": {"host": "h"}, "normalization": {"mean": [0.5]}, "init_from": ["1=net.pth"]}
    assert api.config_to_argv("main_cifar", recorded) == ["--arch", "resnet32", "--init-from", "1=net.pth"]
    assert api.config_to_argv("main_cifar", {"config": "run.yaml", "alpha": 0.1}) == ["--config", "run.yaml",
                                                                                    "--alpha", "0.1"]


def test_unknown_keys_and_scripts_are_refused_by_name():
    with pytest.raises(ConfigError, match="unknown flag 'init_lrr' \\(did you mean 'init_lr'\\?\\)"):
        api.config_to_argv("main_cifar", {"init_lrr": 0.1})
    with pytest.raises(ConfigError, match="unknown script 'main_foo'"):
        api.run_script("main_foo", [])
