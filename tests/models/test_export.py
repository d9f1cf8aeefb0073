"""scripts/export.py (models/export.py): one network of a cohort checkpoint, loadable without cohort code."""
import json
import os

import pytest
import torch
import torchvision

import models
from models.moco import MoCoMCL, pooled_features
from tests.script_helpers import script_cli
from utils.state_keys import network_state_from_cohort_keys

run_export = script_cli("export")


def randomize_bn(module):
    """Non-trivial BatchNorm statistics, so that eval-mode outputs depend on them."""
    generator = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)


def save_run(run_dir, cohort, arch, test_top1=None, script="main_cifar", file="best.pth.tar", best_epoch=2):
    """A checkpoint in the contract's format (and metrics.jsonl when ``test_top1`` is given)."""
    os.makedirs(run_dir, exist_ok=True)
    number_net = len(cohort.arch_names) if hasattr(cohort, "arch_names") else cohort.number_net
    ckpt = {
        "format": "mcl-checkpoint", "version": 1, "script": script,
        "config": {"arch": arch, "number_net": number_net}, "arch": arch, "number_net": number_net,
        "topology": getattr(cohort, "topology", None), "num_classes": 10, "model": cohort.state_dict(),
        "heads": None, "epoch": 3, "step": 0, "finished": True, "best_acc": 0.0, "best_epoch": best_epoch,
    }
    path = os.path.join(run_dir, file)
    torch.save(ckpt, path)
    if test_top1 is not None:
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            for epoch, top1 in enumerate(test_top1, start=1):
                f.write(json.dumps({"epoch": epoch, "test": {"top1": top1, "ens_top1": max(top1)}}) + "\n")
    return path


def cohort_logits(cohort, x):
    with torch.no_grad():
        return cohort.eval()(x)[0]


def exported_logits(path, x):
    payload = torch.load(path, weights_only=False)
    net = models.get_model(payload["arch"], payload["num_classes"])
    net.load_state_dict(payload["state_dict"])  # strict
    with torch.no_grad():
        return net.eval()(x)[0], payload


def test_independent_cohort_exports_the_best_network(tmp_path, capsys):
    torch.manual_seed(0)
    cohort = models.build_cohort("resnet32", 2, 10, "independent")
    randomize_bn(cohort)
    # best epoch 2: net 1 is the best there (net 0 is better at the last epoch).
    run_dir = str(tmp_path / "run")
    save_run(run_dir, cohort, "resnet32", test_top1=[[10, 20], [30, 40], [45, 35]], best_epoch=2)
    out_file = str(tmp_path / "net.pth")
    code, out, err = run_export([run_dir, "--out", out_file], capsys)
    assert code == 0, err
    assert "net 1 has the highest test top-1 (40.00%) at epoch 2" in err
    x = torch.randn(2, 3, 32, 32)
    logits, payload = exported_logits(out_file, x)
    assert payload["net_index"] == 1 and payload["arch"] == "resnet32" and payload["format"] == "mcl-network"
    assert payload["source"] == os.path.abspath(os.path.join(run_dir, "best.pth.tar"))
    assert torch.allclose(logits, cohort_logits(cohort, x)[1], atol=1e-5)


def test_every_network_of_a_branched_cohort_runs_alone(tmp_path, capsys):
    torch.manual_seed(0)
    cohort = models.build_cohort("resnet32", 3, 10, "branched")
    assert cohort.topology == "branched"
    randomize_bn(cohort)
    ckpt_path = save_run(str(tmp_path / "run"), cohort, "resnet32")
    x = torch.randn(2, 3, 32, 32)
    expected = cohort_logits(cohort, x)
    for k in range(3):
        out_file = str(tmp_path / f"net{k}.pth")
        code, _, err = run_export([ckpt_path, "--net-index", str(k), "--out", out_file], capsys)
        assert code == 0, err
        logits, payload = exported_logits(out_file, x)
        assert payload["net_index"] == k
        assert torch.allclose(logits, expected[k], atol=1e-5)


def test_key_mapping_matches_the_cohort_members():
    for topology, n in (("independent", 2), ("branched", 3)):
        cohort = models.build_cohort("resnet32", n, 10, topology)
        state = cohort.state_dict()
        for k in range(n):
            mapped = network_state_from_cohort_keys(state, topology, k)
            member = cohort.member(k).state_dict()
            assert mapped.keys() == member.keys()
            assert all(torch.equal(mapped[key], member[key]) for key in member)


def test_checkpoint_without_metrics_exports_net_0_and_says_so(tmp_path, capsys):
    cohort = models.build_cohort("resnet32,wrn_16_2", 2, 10)
    ckpt_path = save_run(str(tmp_path / "run"), cohort, "resnet32,wrn_16_2", file="checkpoint.pth.tar")
    code, _, err = run_export([ckpt_path, "--out", str(tmp_path / "n.pth")], capsys)
    assert code == 0 and "no metrics.jsonl beside" in err and "net 0" in err
    code, _, err = run_export([str(tmp_path / "run"), "--net-index", "1", "--out", str(tmp_path / "m.pth")], capsys)
    assert code == 0 and "no best.pth.tar" in err
    x = torch.randn(2, 3, 32, 32)
    logits, payload = exported_logits(str(tmp_path / "m.pth"), x)
    assert payload["arch"] == "wrn_16_2"
    assert torch.allclose(logits, cohort_logits(cohort, x)[1], atol=1e-5)


def test_imagenet_resnet_loads_strictly_into_torchvision(tmp_path, capsys):
    torch.manual_seed(0)
    cohort = models.build_cohort("resnet18", 2, 10)
    randomize_bn(cohort)
    ckpt_path = save_run(str(tmp_path / "run"), cohort, "resnet18")
    out_file = str(tmp_path / "tv.pth")
    code, _, err = run_export([ckpt_path, "--net-index", "1", "--torchvision", "--out", out_file], capsys)
    assert code == 0, err
    payload = torch.load(out_file, weights_only=False)
    assert payload["format"] == "torchvision" and payload["num_classes"] == 10
    net = torchvision.models.resnet18(num_classes=10)
    net.load_state_dict(payload["state_dict"])  # strict
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), cohort_logits(cohort, x)[1], atol=1e-5)

    code, _, err = run_export([ckpt_path, "--torchvision", "--drop-fc", "--out", out_file], capsys)
    assert code == 0, err
    payload = torch.load(out_file, weights_only=False)
    assert payload["classifier_dropped"] == "fc"
    fresh = torchvision.models.resnet18(num_classes=5)
    missing, unexpected = fresh.load_state_dict(payload["state_dict"], strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_moco_encoder_exports_its_backbone_for_torchvision(tmp_path, capsys):
    torch.manual_seed(0)
    moco = MoCoMCL("resnet18", number_net=2, dim=16, queue_size=32, mlp=True)
    randomize_bn(moco)
    ckpt_path = save_run(str(tmp_path / "moco"), moco, "resnet18", script="main_moco_mcl", file="checkpoint.pth.tar")
    out_file = str(tmp_path / "enc.pth")
    code, _, err = run_export([ckpt_path, "--net-index", "1", "--out", out_file], capsys)
    assert code == 0, err
    payload = torch.load(out_file, weights_only=False)
    assert payload["format"] == "torchvision" and payload["classifier_dropped"] == "fc"
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(payload["state_dict"], strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(pooled_features(net.eval(), x), pooled_features(moco.encoders_q[1].eval(), x), atol=1e-5)


@pytest.mark.parametrize("case", ["cifar_torchvision", "bad_index", "not_a_checkpoint", "missing", "wrong_arch"])
def test_user_errors(tmp_path, capsys, case):
    run_dir = str(tmp_path / "run")
    if case in ("cifar_torchvision", "bad_index"):
        save_run(run_dir, models.build_cohort("resnet32", 2, 10), "resnet32")
    elif case == "wrong_arch":  # weights of wrn_16_2 under the name resnet32
        save_run(run_dir, models.build_cohort("wrn_16_2", 2, 10), "resnet32")
    elif case == "not_a_checkpoint":
        os.makedirs(run_dir)
        torch.save({"state_dict": {}}, os.path.join(run_dir, "best.pth.tar"))
    extra = {"cifar_torchvision": ["--torchvision"], "bad_index": ["--net-index", "2"]}.get(case, [])
    code, out, err = run_export([run_dir, "--out", str(tmp_path / "x.pth")] + extra, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "x.pth")


def test_export_and_pretrained_backbones_read_the_same_network(tmp_path, capsys):
    """scripts/export.py and main_lincls.py --pretrained share one key mapping."""
    from models.pretrained import backbone_state

    cohort = models.build_cohort("resnet18", 2, 10)
    ckpt_path = save_run(str(tmp_path / "run"), cohort, "resnet18", script="main_imagenet")
    out_file = str(tmp_path / "tv.pth")
    code, _, err = run_export([ckpt_path, "--net-index", "1", "--torchvision", "--drop-fc", "--out", out_file], capsys)
    assert code == 0, err
    exported = torch.load(out_file, weights_only=False)["state_dict"]
    backbone, arch, _ = backbone_state(torch.load(ckpt_path, weights_only=False), 1, ckpt_path)
    assert arch == "resnet18" and exported.keys() == backbone.keys()
    assert all(torch.equal(exported[k], backbone[k]) for k in backbone)


@pytest.mark.parametrize("where", ["read-only-filesystem", "no-permission"])
def test_an_unwritable_out_is_one_line(tmp_path, capsys, monkeypatch, where):
    """--out in a read-only place: one line naming the file and why, no traceback, exit 2."""
    import errno
    import tempfile

    run_dir = str(tmp_path / "run")
    save_run(run_dir, models.build_cohort("resnet32", 2, 10), "resnet32")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if where == "read-only-filesystem":
        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    elif os.geteuid() == 0:
        out_dir = "/sys"  # sysfs refuses new files even to root
    else:
        out_dir.chmod(0o555)
    out_file = os.path.join(str(out_dir), "net.pth")
    code, out, err = run_export([run_dir, "--out", out_file], capsys)
    assert code == 2, err
    assert err.startswith(f"error: cannot write {out_file}: ") and err.count("\n") == 1 and "Traceback" not in err
    assert ("Read-only file system" if where == "read-only-filesystem" else "Permission denied") in err
    assert not os.path.exists(out_file)
