"""main_moco_mcl.py and main_lincls.py end to end on a tiny ImageFolder of real JPEG files.

Pre-training is stopped by a (simulated) SIGTERM after one step and resumed; the
linear evaluation then runs on the result. A separate run uses the README's
--multiprocessing-distributed flags with two gloo processes on CPU (shuffled BN).
Pre-trained key loading is checked for every --net-index of MoCo, supervised
cohort and original-code checkpoints.
"""
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main_lincls
import main_moco_mcl
from models import pretrained
from models.moco import MoCoMCL, pooled_features
from utils import knn, lincls
from utils.checkpoint import load_checkpoint
from utils.cli import run_main
import utils.loop
from data.samplers import EpochShuffleBatchSampler
from utils.loop import StopRequest
from utils.errors import ConfigError
from tests.two_nodes import free_port

TINY = ["-a", "resnet18", "-b", "8", "--image-size", "32", "-j", "0", "--device", "cpu", "-p", "1"]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """train/ and val/ with 3 classes of 40x40 JPEG files (8 train, 2 val each)."""
    root = tmp_path_factory.mktemp("tiny_imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = (rng.random((40, 40, 3)) * 90 + 70 * c).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.JPEG", quality=90)
    return str(root)


def _event_data(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


class StopAfterFirstStep(StopRequest):
    """Behaves as if SIGTERM arrived during the first step."""

    def requested(self):
        self.signum = signal.SIGTERM
        return signal.SIGTERM


def test_pretrain_stop_resume_then_linear_evaluation(image_root, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "moco")
    argv = TINY + ["--data", image_root, "--epochs", "1", "--moco-k", "20", "--max-train-batches", "2",
                   "--checkpoint", str(tmp_path), "--run-name", "moco", "--mlp", "--aug-plus", "--seed", "0",
                   "--number-net", "2",
                   "--knn-data", image_root, "--max-eval-batches", "1"]
    monkeypatch.setattr(utils.loop, "StopRequest", StopAfterFirstStep)
    assert main_moco_mcl.main(argv) == 0
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pth.tar"))
    assert (ckpt["epoch"], ckpt["step"], ckpt["finished"]) == (0, 1, False)
    assert ckpt["model"]["queue_ptr"].tolist() == [8, 8]
    assert ckpt["model"]["queue"].shape == (2, 128, 20)

    monkeypatch.undo()
    assert main_moco_mcl.main(argv + ["--resume"]) == 0
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pth.tar"))
    assert (ckpt["epoch"], ckpt["step"], ckpt["finished"]) == (1, 0, True)
    assert ckpt["model"]["queue_ptr"].tolist() == [16, 16]  # 2 steps of 8 keys, K = 20
    assert "encoders_k.1.fc.2.weight" in ckpt["model"] and ckpt["optimizer"]["state"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["epoch"] for r in records] == [1]  # numbered from 1
    assert len(records[0]["knn"]["top1"]) == 2 and len(records[0]["train"]["top1"]) == 2
    tb = _event_data(os.path.join(run_dir, "tb"))  # stopped after step 1, resumed: no step twice
    assert [e.step for e in tb.Scalars("train_step/loss/total")] == [1, 2]
    scalars = set(tb.Tags()["scalars"])
    assert {"train/instance_top1/net0", "knn/top1/net1", "train/loss/soft_icl"} <= scalars
    assert not any(t.startswith("train/top1") for t in scalars) and len(tb.Images("train/augmented_images")) == 1
    final = os.path.join(run_dir, "checkpoint_0000.pth.tar")
    assert os.path.exists(os.path.join(run_dir, "summary.json")) and os.path.exists(final)
    assert os.path.samefile(final, os.path.join(run_dir, "checkpoint.pth.tar"))  # a link, not a second copy
    assert os.path.samefile(final, tmp_path / "checkpoint_0000.pth.tar")  # and where the original wrote it

    lin_dir = str(tmp_path / "lincls")
    assert main_lincls.main(TINY + ["--data", image_root, "--pretrained", final, "--net-index", "1",
                                    "--epochs", "1", "--max-train-batches", "2", "--checkpoint", str(tmp_path),
                                    "--run-name", "lincls"]) == 0
    for name in ("checkpoint.pth.tar", "best.pth.tar", "summary.json", "metrics.jsonl"):
        assert os.path.exists(os.path.join(lin_dir, name))
    lin = load_checkpoint(os.path.join(lin_dir, "checkpoint.pth.tar"))
    assert lin["script"] == "main_lincls" and lin["finished"]
    encoder_conv = ckpt["model"]["encoders_q.1.conv1.weight"]
    assert torch.equal(lin["model"]["conv1.weight"], encoder_conv)
    with open(os.path.join(lin_dir, "summary.json")) as f:
        summary = json.load(f)
    assert 0.0 <= summary["last_top1"][0] <= 100.0


def test_readme_multiprocessing_command_with_two_gloo_processes(image_root, tmp_path):
    run_dir = str(tmp_path / "ddp")
    argv = TINY + ["--data", image_root, "--epochs", "1", "--moco-k", "16", "--max-train-batches", "2",
                   "--checkpoint", str(tmp_path), "--run-name", "ddp", "--number-net", "2", "--seed", "1",
                   "--dist-url", f"tcp://127.0.0.1:{free_port()}", "--multiprocessing-distributed",
                   "--world-size", "1", "--rank", "0", "--gpu-ids", "0,1", "--knn-data", image_root]
    assert main_moco_mcl.main(argv) == 0
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pth.tar"))
    assert ckpt["config"]["batch_per_process"] == 4 and ckpt["config"]["world_size_total"] == 2
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        knn_top1 = json.loads(f.readline())["knn"]["top1"]  # the monitor sharded over both processes
    assert len(knn_top1) == 2 and all(0.0 <= v <= 100.0 for v in knn_top1)
    # keys of both processes (2 x 4 per step) went into every queue: 2 steps -> pointer 16 mod 16
    assert ckpt["model"]["queue_ptr"].tolist() == [0, 0]
    assert ckpt["finished"]
    with open(os.path.join(run_dir, "log.txt")) as f:
        assert "2 processes, shuffled BN" in f.read()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(main_moco_mcl.main, TINY + ["--data", str(tmp_path / "missing"), "--checkpoint", str(tmp_path / "r")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_info:
        run_main(main_moco_mcl.main,
                 TINY + ["--moco-k", "4", "--data", str(tmp_path), "--checkpoint", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "--moco-k" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pre-trained keys

def _features_equal(net, classifier, x):
    """net(x) pooled feature == classifier's pooled feature (both in eval mode)."""
    return torch.allclose(net, pooled_features(classifier.eval(), x), atol=1e-5)


def test_moco_keys_load_for_every_net_index():
    torch.manual_seed(0)
    moco = MoCoMCL("resnet18", number_net=3, dim=8, queue_size=8, mlp=True).eval()
    ckpt = {"format": "mcl-checkpoint", "script": "main_moco_mcl", "arch": "resnet18", "number_net": 3,
            "model": moco.state_dict()}
    x = torch.randn(2, 3, 32, 32)
    for i in range(3):
        state, arch, _ = pretrained.backbone_state(ckpt, i, "ckpt")
        assert arch == "resnet18" and not any(k.startswith("fc.") for k in state)
        clf = lincls.build_classifier(arch, 5)
        pretrained.load_backbone(clf, state, "ckpt")
        assert _features_equal(pooled_features(moco.encoders_q[i], x), clf, x)
        assert clf.fc.bias.abs().sum() == 0 and clf.fc.weight.std() < 0.05
    with pytest.raises(ConfigError):
        pretrained.backbone_state(ckpt, 3, "ckpt")


def test_original_code_checkpoint_keys():
    torch.manual_seed(1)
    moco = MoCoMCL("resnet18", number_net=2, dim=8, queue_size=8).eval()
    state = {}
    for i in range(2):
        state.update({f"module.encoder_q_{i}.{k}": v for k, v in moco.encoders_q[i].state_dict().items()})
    ckpt = {"epoch": 200, "arch": "resnet18", "state_dict": state}
    x = torch.randn(2, 3, 32, 32)
    for i in range(2):
        backbone, arch, _ = pretrained.backbone_state(ckpt, i, "orig")
        clf = lincls.build_classifier(arch, 4)
        pretrained.load_backbone(clf, backbone, "orig")
        assert _features_equal(pooled_features(moco.encoders_q[i], x), clf, x)


@pytest.mark.parametrize("number_net,cohort", [(2, "independent"), (3, "branched")])
def test_supervised_cohort_keys_load_for_every_net_index(number_net, cohort):
    models = pytest.importorskip("models")
    torch.manual_seed(2)
    net = models.build_cohort("resnet18", number_net, 10, cohort).eval()
    ckpt = {"format": "mcl-checkpoint", "script": "main_imagenet", "arch": "resnet18", "number_net": number_net,
            "topology": cohort, "model": net.state_dict()}
    x = torch.randn(2, 3, 32, 32)
    _, features = net(x)
    for i in range(number_net):
        state, arch, _ = pretrained.backbone_state(ckpt, i, "sup")
        clf = lincls.build_classifier(arch, 7)
        pretrained.load_backbone(clf, state, "sup")
        assert _features_equal(features[i], clf, x)


def test_frozen_weight_check_catches_a_change():
    clf = lincls.build_classifier("resnet18", 3)
    reference = lincls.frozen_snapshot(clf)
    trainable = lincls.freeze_all_but_fc(clf)
    assert [p.shape for p in trainable] == [clf.fc.weight.shape, clf.fc.bias.shape]
    with torch.no_grad():
        clf.fc.weight.add_(1.0)
    lincls.check_frozen_unchanged(clf, reference)  # the fc may change
    clf.layer2[0].bn1.running_mean.add_(1e-3)
    with pytest.raises(lincls.FrozenWeightsChanged, match="layer2.0.bn1.running_mean"):
        lincls.check_frozen_unchanged(clf, reference)


def test_weighted_knn_votes_by_similarity():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    test = F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert knn.weighted_knn_predict(train, labels, test, num_classes=2, k=3, t=0.1).tolist() == [0, 1]
    # with k = 1 only the nearest neighbour votes
    assert knn.weighted_knn_predict(train, labels, test[1:], num_classes=2, k=1).tolist() == [1]


def test_sampler_shards_a_seeded_permutation_and_resumes():
    full = [EpochShuffleBatchSampler(10, 4, seed=3, rank=r, world_size=2, drop_last=True) for r in range(2)]
    batches = [list(s) for s in full]
    assert len(batches[0]) == 2 and all(len(b) == 2 for b in batches[0] + batches[1])
    seen = [i for r in range(2) for b in batches[r] for i in b]
    assert len(set(seen)) == 8
    resumed = EpochShuffleBatchSampler(10, 4, seed=3, rank=1, world_size=2, drop_last=True)
    resumed.set_start_batch(1)
    assert list(resumed) == batches[1][1:]


# ----------------------------------------------------------------------------- mixed precision

def test_bf16_channels_last_pretrain_then_linear_evaluation(image_root, tmp_path):
    run_dir = str(tmp_path / "moco_bf16")
    fast = ["--amp", "bf16", "--channels-last"]
    assert main_moco_mcl.main(TINY + fast + ["--data", image_root, "--epochs", "1", "--moco-k", "16",
                                             "--max-train-batches", "2", "--checkpoint", str(tmp_path),
                                             "--run-name", "moco_bf16", "--mlp",
                                             "--seed", "0", "--number-net", "2"]) == 0
    ckpt = load_checkpoint(os.path.join(run_dir, "checkpoint.pth.tar"))
    assert ckpt["finished"] and ckpt["scaler"] is None  # bf16 needs no gradient scaler
    assert ckpt["model"]["queue"].dtype == torch.float32 and ckpt["model"]["queue_ptr"].tolist() == [0, 0]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        train = json.loads(f.readline())["train"]
    assert all(np.isfinite(train[k]) for k in ("loss", "vcl", "soft_vcl", "icl", "soft_icl"))

    lin_dir = str(tmp_path / "lincls_bf16")
    final = os.path.join(run_dir, "checkpoint_0000.pth.tar")
    assert main_lincls.main(TINY + fast + ["--data", image_root, "--pretrained", final, "--epochs", "1",
                                           "--max-train-batches", "2", "--checkpoint", str(tmp_path),
                                           "--run-name", "lincls_bf16", "--lr", "0.1"]) == 0
    lin = load_checkpoint(os.path.join(lin_dir, "checkpoint.pth.tar"))
    assert lin["finished"] and torch.equal(lin["model"]["conv1.weight"], ckpt["model"]["encoders_q.0.conv1.weight"])
    with open(os.path.join(lin_dir, "summary.json")) as f:
        assert 0.0 <= json.load(f)["last_top1"][0] <= 100.0


@pytest.mark.parametrize("script", [main_moco_mcl, main_lincls])
def test_fp16_on_cpu_is_one_line(script, image_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(script.main, TINY + ["--amp", "fp16", "--data", image_root, "--checkpoint", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and "--amp fp16 needs CUDA" in err


def _one_line_exit_2(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_resume_checks_the_flags_of_pretraining_and_linear_evaluation(image_root, tmp_path, capsys):
    """A resumed run with other maths is refused naming every differing flag; --epochs, -j, -p may change."""
    run_dir = str(tmp_path / "moco")
    argv = TINY + ["--data", image_root, "--epochs", "1", "--moco-k", "16", "--max-train-batches", "1",
                   "--checkpoint", run_dir, "--number-net", "2", "--seed", "0"]
    assert main_moco_mcl.main(argv) == 0
    err = _one_line_exit_2(main_moco_mcl.main, argv + ["--epochs", "2", "--moco-t", "0.2", "--aug-plus", "--resume"],
                           capsys)
    assert "was trained with --moco-t 0.07 no --aug-plus, this run has --moco-t 0.2 --aug-plus;" in err
    err = _one_line_exit_2(main_moco_mcl.main, argv + ["--moco-dim", "64", "--mlp", "--resume"], capsys)
    assert "--moco-dim 128 no --mlp, this run has --moco-dim 64 --mlp;" in err
    assert main_moco_mcl.main(argv + ["--epochs", "2", "-p", "5", "--threads", "1", "--resume"]) == 0

    final = os.path.join(run_dir, "checkpoint_0001.pth.tar")
    lin_dir = str(tmp_path / "lincls")
    lin = TINY + ["--data", image_root, "--pretrained", final, "--epochs", "1", "--max-train-batches", "1",
                  "--checkpoint", lin_dir, "--run-name", "lin"]  # one run directory whatever --net-index says
    assert main_lincls.main(lin) == 0
    err = _one_line_exit_2(main_lincls.main, lin + ["--epochs", "2", "--net-index", "1", "--lr", "10", "--resume"],
                           capsys)
    assert "was trained with --lr 30.0 --net-index 0, this run has --lr 10.0 --net-index 1;" in err


# ----------------------------------------------------------------------------- unreadable images

def damaged_copy(image_root, tmp_path, bad_per_class=1):
    """``image_root`` plus ``bad_per_class`` garbage .JPEG files in every train/ and val/ class folder."""
    import shutil

    root = tmp_path / "damaged"
    shutil.copytree(image_root, root)
    for split in ("train", "val"):
        for c in range(3):
            for i in range(bad_per_class):
                (root / split / f"class{c}" / f"bad{i}.JPEG").write_bytes(b"\xff\xd8\xff garbage, cut short")
    return root


def test_an_unreadable_jpeg_is_skipped_by_pretraining_and_linear_evaluation(image_root, tmp_path, capfd):
    root = damaged_copy(image_root, tmp_path)
    argv = TINY + ["--data", str(root), "--epochs", "1", "--moco-k", "16", "--checkpoint", str(tmp_path / "moco"),
                   "--number-net", "1", "--knn-data", str(root), "--max-eval-batches", "1"]
    assert main_moco_mcl.main(argv) == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err
    for c in range(3):
        assert err.count(f"class{c}/bad0.JPEG") >= 1
    lin = TINY + ["--data", str(root), "--epochs", "1", "--checkpoint", str(tmp_path / "lin"), "-j", "1"]
    assert main_lincls.main(lin) == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err
    for split in ("train", "val"):
        for c in range(3):
            assert err.count(f"{split}/class{c}/bad0.JPEG") == 1


def test_a_folder_of_unreadable_images_stops_with_one_line(image_root, tmp_path, capfd):
    """More than 1 % unreadable (past the first 10): one line, exit 2, also from a DataLoader worker."""
    root = damaged_copy(image_root, tmp_path, bad_per_class=8)
    with pytest.raises(SystemExit) as exit_info:
        run_main(main_lincls.main, TINY + ["--data", str(root), "--epochs", "1", "--checkpoint", str(tmp_path / "l"),
                                           "-j", "1"])
    err = capfd.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: ") and "images read so far" in err[-1] and "were unreadable" in err[-1]
    assert all(line.startswith("warning: skipping unreadable image") for line in err[:-1])


# ----------------------------------------------------------------------------- a worker that dies

def test_a_killed_worker_is_named_with_its_signal(image_root, tmp_path):
    """--multiprocessing-distributed, 2 gloo processes on CPU; rank 1 is SIGKILLed after its first step.

    The launcher exits in bounded time with one line naming the local rank and the signal.
    """
    import subprocess
    import sys
    import time

    argv = TINY + ["--data", image_root, "--epochs", "1", "--moco-k", "16", "--max-train-batches", "3",
                   "--checkpoint", str(tmp_path / "ddp"), "--number-net", "1", "--seed", "1",
                   "--dist-url", f"tcp://127.0.0.1:{free_port()}", "--multiprocessing-distributed",
                   "--world-size", "1", "--rank", "0", "--gpu-ids", "0,1"]
    env = dict(os.environ, MCL_DEBUG_SIGNAL_AFTER_STEPS="1:KILL:1", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "main_moco_mcl.py", *argv], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and time.monotonic() - start < 60, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: the process of local rank 1 was killed by SIGKILL; the other processes were stopped"], \
        done.stderr[-3000:]
    assert "Traceback" not in done.stderr
