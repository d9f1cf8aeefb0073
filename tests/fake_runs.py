"""Fake run directories (config.json, metrics.jsonl, summary.json) of known curves."""
import csv
import io
import json
import os
import statistics

BASE_CONFIG = {
    "dataset": "cifar100", "arch": "resnet32", "epochs": 4, "init_lr": 0.1, "batch_size": 128, "tau": 0.1,
    "kd_T": 3.0, "alpha": 0.0, "gamma": 0.0, "beta": 0.0, "lam": 0.0, "logit_distill": False,
    "number_net": 2, "num_workers": 8, "device": "auto",
}
MCL_WEIGHTS = {"alpha": 0.1, "gamma": 1.0, "beta": 0.1, "lam": 1.0}

# Per setting and seed: test top-1 per epoch per network (4 epochs, 2 networks).
CURVES = {
    ("baseline", 0): [[50, 51], [60, 62], [70, 69], [69, 68]],
    ("baseline", 1): [[50, 50], [61, 60], [68, 71], [70, 70]],
    ("baseline", 2): [[52, 50], [63, 60], [69, 70], [68, 69]],
    ("mcl2", 0): [[55, 56], [65, 66], [72, 73], [73, 72]],
    ("mcl2", 1): [[54, 55], [66, 65], [74, 72], [73, 73]],
    ("mcl2", 2): [[56, 54], [64, 67], [73, 75], [74, 74]],
}


def write_run(root, name, config, curves, finished=True, lrs=None):
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    config = dict(config, checkpoint_dir=root, run_name=name)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for epoch, top1 in enumerate(curves, start=1):  # records number their epochs from 1
            record = {"epoch": epoch, "epochs": config["epochs"], "lr": (lrs or [0.1] * 10)[epoch - 1],
                      "test": {"top1": top1, "top5": top1, "ens_top1": max(top1) + 1.0},
                      "best_single_top1": max(top1)}
            f.write(json.dumps(record) + "\n")
    if finished:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({"finished": True, "epochs": config["epochs"]}, f)
    return run_dir


def config_of(setting, seed):
    config = dict(BASE_CONFIG, manual_seed=seed)
    if setting == "mcl2":
        config.update(MCL_WEIGHTS)
    return config


def write_runs(root):
    """Three seeds of a baseline and of MCL(×2) under ``root``, every run finished."""
    os.makedirs(root)
    for (setting, seed), curves in CURVES.items():
        write_run(root, f"{setting}_s{seed}", config_of(setting, seed), curves)
    return root


def paper(curves):
    return max(max(top1) for top1 in curves)


def last(curves):
    return statistics.fmean(curves[-1])


def expected(setting, metric):
    values = [metric(CURVES[(setting, seed)]) for seed in range(3)]
    return statistics.fmean(values), statistics.stdev(values)


def read_csv(text):
    return {row["setting"]: row for row in csv.DictReader(io.StringIO(text))}
