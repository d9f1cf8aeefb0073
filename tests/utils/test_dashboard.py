"""utils/dashboard.py: TensorBoard and W&B names, event files read back after kills, resumes and reruns."""
import glob
import json
import os
import sys

import pytest
import torch

import main_cifar
import utils.loop
from tests.script_helpers import run_cli
from utils.dashboard import (IMAGES_TAG, config_markdown, epoch_scalars, flat_config, step_scalars,
                             trim_event_files)
from utils.moco_pretrain import MocoMethod

# 2 epochs x 3 steps of MCL(x2) on CPU; every step's loss terms on the dashboards.
RUN = ["--dataset", "synthetic", "--synthetic-size", "48", "--synthetic-classes", "4", "--synthetic-test-size", "16",
       "--batch-size", "8", "--m-per-class", "2", "--epochs", "2", "--max-train-batches", "3",
       "--max-eval-batches", "1", "--eval-batch-size", "16", "--num-workers", "0", "--no-progress",
       "--device", "cpu", "--arch", "resnet32", "--number-net", "2", "--alpha", "0.1", "--gamma", "1.",
       "--beta", "0.1", "--lam", "1.", "--save-every-steps", "1", "--print-freq", "1"]


def event_data(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar_steps(acc, tag):
    return [e.step for e in acc.Scalars(tag)]


def hparams_of(acc):
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return [m.name.tag for m in experiment.metric_infos], dict(start.session_start_info.hparams)


# ----------------------------------------------------------------------------- names

SUPERVISED_RECORD = {
    "epoch": 3, "epochs": 10, "lr": 0.1, "time_s": 12.0, "images_per_s": 100.0, "eval_s": 2.0,
    "train": {"loss": 5.0, "loss_cls": 4.0, "loss_kd": 0.0, "vcl": 0.3, "soft_vcl": 0.1, "icl": 0.4, "soft_icl": 0.2,
              "top1": [10.0, 20.0], "top5": [30.0, 40.0], "ens_top1": 25.0, "ens_top5": 45.0},
    "test": {"top1": [11.0, 21.0], "top5": [31.0, 41.0], "ens_top1": 26.0, "ens_top5": 46.0, "nll": [2.0, 1.0],
             "ens_nll": 1.2, "ece": [5.0, 7.0], "ens_ece": 3.0, "loss": 1.5},
    "best_single_top1": 21.0, "best_acc": 22.0, "best_epoch": 2,
}


def test_supervised_names_are_grouped_and_per_network():
    s = epoch_scalars(SUPERVISED_RECORD)
    assert s["lr"] == 0.1 and s["time/train_s"] == 12.0 and s["time/eval_s"] == 2.0
    assert s["train/loss/total"] == 5.0 and s["train/loss/cls"] == 4.0 and s["train/loss/icl"] == 0.4
    assert s["train/top1/net1"] == 20.0 and s["train/top1/ensemble"] == 25.0 and s["train/top1/mean"] == 15.0
    assert s["test/top1/net0"] == 11.0 and s["test/top1/ensemble"] == 26.0 and s["test/top1/mean"] == 16.0
    assert s["test/nll/net1"] == 1.0 and s["test/nll/ensemble"] == 1.2 and s["test/ece/ensemble"] == 3.0
    assert s["test/loss"] == 1.5 and s["test/top1/best_net"] == 21.0
    assert s["best/top1"] == 22.0 and s["best/epoch"] == 2
    assert "epoch" not in s and "epochs" not in s and not any(k.startswith("test/ens_") for k in s)


def test_moco_instance_accuracy_is_not_named_like_a_classification_accuracy():
    record = {"epoch": 1, "epochs": 2, "lr": 0.03, "train": {"loss": 9.0, "vcl": 4.0, "soft_vcl": 1.0, "icl": 3.0,
                                                               "soft_icl": 1.0, "top1": [5.0, 6.0], "top5": [9.0, 9.5]},
              "knn": {"top1": [30.0, 31.0]}}
    s = epoch_scalars(record, MocoMethod.train_accuracy_prefix)
    assert s["train/instance_top1/net0"] == 5.0 and s["train/instance_top5/net1"] == 9.5
    assert not any(k.startswith("train/top1") for k in s)
    assert s["knn/top1/net1"] == 31.0 and s["train/loss/vcl"] == 4.0


def test_step_names_and_the_configuration_as_text_and_hparams():
    assert step_scalars({"loss": 2.0, "icl": 0.5}, 0.1) == {"train_step/loss/total": 2.0, "train_step/loss/icl": 0.5,
                                                              "train_step/lr": 0.1}
    config = {"arch": "resnet32", "milestones": [150, 225], "gpu_id": None, "fast": True,
              "versions": {"torch": "2.14"}}
    flat = flat_config(config)
    assert flat == {"arch": "resnet32", "fast": True, "gpu_id": "None", "milestones": "150 225",
                    "versions.torch": "2.14"}
    assert "| `milestones` | `150 225` |" in config_markdown(config)


# ----------------------------------------------------------------------------- trimming

def write_events(tb_dir, epochs, steps):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tb_dir))
    w.add_text("config", "old configuration")
    w.add_image(IMAGES_TAG, torch.rand(3, 8, 8), 0)
    for step in range(1, steps + 1):
        w.add_scalar("train_step/loss/total", float(step), step)
    for epoch in range(1, epochs + 1):
        w.add_scalar("test/top1/net0", float(epoch), epoch)
    w.close()


def test_trimming_keeps_what_the_checkpoint_holds(tmp_path):
    write_events(tmp_path, epochs=3, steps=9)
    (tmp_path / "00003" / "test_features_net0").mkdir(parents=True)
    (tmp_path / "projector_config.pbtxt").write_text("embeddings {}")
    assert trim_event_files(str(tmp_path), epochs_done=2, steps_done=6)  # the image grid stays
    acc = event_data(tmp_path)
    assert scalar_steps(acc, "test/top1/net0") == [1, 2]
    assert scalar_steps(acc, "train_step/loss/total") == [1, 2, 3, 4, 5, 6]
    assert len(acc.Images(IMAGES_TAG)) == 1 and acc.Tags()["tensors"] == []  # the text is written again
    assert not (tmp_path / "00003").exists() and not (tmp_path / "projector_config.pbtxt").exists()
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 1


def test_a_fresh_start_clears_and_a_torn_file_is_read_up_to_its_tear(tmp_path):
    write_events(tmp_path, epochs=2, steps=4)
    path = glob.glob(str(tmp_path / "events.out.tfevents.*"))[0]
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-5])  # a writer killed in the middle of its last record
    assert trim_event_files(str(tmp_path), epochs_done=1, steps_done=4)
    acc = event_data(tmp_path)
    assert scalar_steps(acc, "test/top1/net0") == [1] and scalar_steps(acc, "train_step/loss/total") == [1, 2, 3, 4]
    assert not trim_event_files(str(tmp_path), epochs_done=0, steps_done=0)
    assert glob.glob(str(tmp_path / "events.out.tfevents.*")) == []


# ----------------------------------------------------------------------------- runs

class Killed(Exception):
    pass


def test_killed_resumed_and_rerun_runs_never_repeat_a_point(tmp_path, monkeypatch, capsys):
    args = RUN + ["--checkpoint-dir", str(tmp_path), "--run-name", "r", "--tb-embeddings", "8"]
    real_save = utils.loop.RunLoop.save

    def save(self, path=None, for_best=False):  # dies at the save after step 2 of epoch 2
        if path is None and (self.state.epoch, self.state.step) == (1, 2):
            raise Killed
        real_save(self, path, for_best)

    monkeypatch.setattr(utils.loop.RunLoop, "save", save)
    with pytest.raises(Killed):
        main_cifar.main(args)
    monkeypatch.undo()
    first_epoch_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/2")][0]
    assert " | ETA " in first_epoch_line  # the whole run's
    tb = tmp_path / "r" / "tb"
    assert scalar_steps(event_data(tb), "train_step/loss/total") == [1, 2, 3, 4, 5]  # step 5: after the checkpoint

    assert main_cifar.main(args + ["--resume"]) == 0
    acc = event_data(tb)
    for tag in acc.Tags()["scalars"]:
        steps = scalar_steps(acc, tag)
        assert steps == sorted(set(steps)), tag
    assert scalar_steps(acc, "test/top1/net0") == [1, 2] and scalar_steps(acc, "test/ece/ensemble") == [1, 2]
    assert scalar_steps(acc, "train_step/loss/icl") == [1, 2, 3, 4, 5, 6]
    assert {"train/loss/icl", "test/top1/ensemble", "test/nll/net1", "lr", "best/top1"} <= set(acc.Tags()["scalars"])
    assert len(acc.Images(IMAGES_TAG)) == 1 and len(acc.Tensors("config/text_summary")) == 1
    metrics, hparams = hparams_of(acc)
    assert {"test/top1/net0", "test/top1/ensemble", "test/ece/ensemble", "best/top1"} <= set(metrics)
    assert hparams["alpha"].number_value == pytest.approx(0.1) and hparams["arch"].string_value == "resnet32"
    projector = (tb / "projector_config.pbtxt").read_text()
    assert "test_features_net0" in projector and "test_features_net1" in projector
    assert (tb / "00002" / "test_features_net1" / "tensors.tsv").read_text().count("\n") == 8

    assert main_cifar.main(RUN + ["--checkpoint-dir", str(tmp_path), "--run-name", "r", "--overwrite",
                                  "--epochs", "1"]) == 0  # a rerun starts the dashboards again
    acc = event_data(tb)
    assert scalar_steps(acc, "test/top1/net0") == [1] and scalar_steps(acc, "train_step/loss/total") == [1, 2, 3]
    assert len(acc.Images(IMAGES_TAG)) == 1 and not (tb / "projector_config.pbtxt").exists()


def test_wandb_offline_gets_the_tensorboard_names(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is an optional extra (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb_dir").mkdir()
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, *args, **kwargs):
        logged.append(dict(data))
        return real_log(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    args = RUN + ["--checkpoint-dir", str(tmp_path), "--run-name", "w", "--epochs", "1", "--wandb", "mcl-test"]
    assert main_cifar.main(args) == 0
    epoch_logs = [d for d in logged if "epoch" in d and IMAGES_TAG not in d]
    step_logs = [d for d in logged if "global_step" in d]
    assert len(epoch_logs) == 1 and [d["global_step"] for d in step_logs] == [1, 2, 3]
    acc = event_data(tmp_path / "w" / "tb")
    tb_tags = set(acc.Tags()["scalars"])
    assert set(epoch_logs[0]) - {"epoch"} == {t for t in tb_tags if not t.startswith("train_step/")}
    assert set(step_logs[0]) - {"global_step"} == {t for t in tb_tags if t.startswith("train_step/")}
    assert any(IMAGES_TAG in d for d in logged)
    run_id = json.loads((tmp_path / "w" / "wandb.json").read_text())["id"]
    assert glob.glob(str(tmp_path / "wandb_dir" / "wandb" / f"offline-run-*-{run_id}"))


def test_wandb_missing_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    code, out, err = run_cli(main_cifar.main, RUN + ["--checkpoint-dir", str(tmp_path), "--wandb", "p"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--wandb needs the wandb package: pip install wandb" in err
    assert not os.path.exists(tmp_path / "cifar100")  # refused before any run directory
