"""scripts/summarize.py and utils/results.py on fake run directories."""
import csv
import importlib.util
import io
import json
import os
import statistics
import sys

import pytest

from utils import results
from utils.cli import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summarize = load_script("summarize")


def write_run(root, name, config, curves, finished=True, lrs=None):
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    config = dict(config, checkpoint_dir=root, run_name=name)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for epoch, top1 in enumerate(curves):
            record = {"epoch": epoch, "epochs": config["epochs"], "lr": (lrs or [0.1] * 10)[epoch],
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


@pytest.fixture
def runs_root(tmp_path):
    root = str(tmp_path / "runs")
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


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(summarize.main, argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def read_csv(text):
    return {row["setting"]: row for row in csv.DictReader(io.StringIO(text))}


def test_paper_metric_means_and_stds_in_markdown(runs_root, capsys):
    code, out, err = run_cli([runs_root], capsys)
    assert code == 0, err
    assert "Metric: paper" in out
    assert "| Network | Baseline | MCL(×2) |" in out
    mean_b, std_b = expected("baseline", paper)
    mean_m, std_m = expected("mcl2", paper)
    assert f"| ResNet-32 | {mean_b:.2f} ± {std_b:.2f} (3) | {mean_m:.2f} ± {std_m:.2f} (3) |" in out


def test_csv_and_last_metric(runs_root, capsys):
    code, out, _ = run_cli([os.path.join(runs_root, "*"), "--csv", "--metric", "last"], capsys)
    assert code == 0
    rows = read_csv(out)
    assert set(rows) == {"Baseline", "MCL(×2)"}
    for setting, label in (("baseline", "Baseline"), ("mcl2", "MCL(×2)")):
        mean, std = expected(setting, last)
        assert float(rows[label]["mean"]) == pytest.approx(mean, abs=1e-4)
        assert float(rows[label]["std"]) == pytest.approx(std, abs=1e-4)
        assert rows[label]["n"] == "3" and rows[label]["metric"] == "last"
        assert rows[label]["seeds"] == "0 1 2"


def test_paper_metric_reads_every_epoch_not_only_the_last(runs_root):
    run = results.load_run(os.path.join(runs_root, "baseline_s0"))
    assert results.paper_metric(run) == 70  # epoch 2, net 0; the last epoch's best is 69
    assert results.last_metric(run) == pytest.approx(68.5)


def test_unfinished_run_is_listed_and_excluded_then_marked(runs_root, capsys, tmp_path):
    write_run(runs_root, "mcl2_s3", config_of("mcl2", 3), [[90, 90], [99, 99]], finished=False)
    code, out, _ = run_cli([runs_root], capsys)
    assert code == 0
    mean_m, std_m = expected("mcl2", paper)
    assert f"{mean_m:.2f} ± {std_m:.2f} (3) |" in out
    assert "Unfinished runs" in out and "mcl2_s3: 2/4 epochs" in out

    out_file = str(tmp_path / "table.csv")
    code, out, _ = run_cli([runs_root, "--include-unfinished", "--csv", "--out", out_file], capsys)
    assert code == 0 and out == ""
    with open(out_file) as f:
        rows = read_csv(f.read())
    assert rows["MCL(×2)"]["n"] == "4" and rows["MCL(×2)"]["includes_unfinished"] == "1"
    assert rows["Baseline"]["includes_unfinished"] == "0"

    code, out, _ = run_cli([runs_root, "--include-unfinished"], capsys)
    assert "(4)*" in out


def test_single_run_has_no_std_and_other_settings_get_descriptive_columns(tmp_path, capsys):
    root = str(tmp_path)
    write_run(root, "a", config_of("mcl2", 0), CURVES[("mcl2", 0)])
    write_run(root, "b", dict(config_of("mcl2", 0), tau=0.07), CURVES[("mcl2", 1)])
    write_run(root, "c", dict(config_of("mcl2", 0), number_net=4, logit_distill=True), CURVES[("mcl2", 2)])
    write_run(root, "d", dict(config_of("baseline", 0), alpha=0.1, beta=0.1), CURVES[("mcl2", 2)])
    write_run(root, "e", dict(config_of("baseline", 0), arch="wrn_16_2"), CURVES[("baseline", 0)])
    code, out, _ = run_cli([root], capsys)
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("| Network"))
    assert header == ("| Network | Baseline | MCL(×2) tau=0.07 | MCL(×2) tau=0.1 | MCL(×4)+Logit KD "
                      "| MCL(×2) [VCL+ICL] |")
    assert f"| {paper(CURVES[('mcl2', 0)]):.2f} (1) |" in out
    assert "| WRN-16-2 | 70.00 (1) |  |  |  |  |" in out


def test_ignore_key_merges_runs_that_differ_in_that_flag(tmp_path, capsys):
    root = str(tmp_path)
    write_run(root, "a", dict(config_of("mcl2", 0), amp="none"), CURVES[("mcl2", 0)])
    write_run(root, "b", dict(config_of("mcl2", 1), amp="bf16"), CURVES[("mcl2", 1)])
    code, out, _ = run_cli([root, "--csv"], capsys)
    assert set(read_csv(out)) == {"MCL(×2) amp=bf16", "MCL(×2) amp=none"}
    code, out, _ = run_cli([root, "--csv", "--ignore-key", "amp"], capsys)
    assert read_csv(out)["MCL(×2)"]["n"] == "2"


def test_lincls_runs_take_the_setting_of_their_pretraining(tmp_path, capsys):
    root = str(tmp_path)
    for n, label in ((1, "moco"), (2, "mcl")):
        for seed in range(2):
            pre = os.path.join(root, f"pre_{label}_{seed}")
            os.makedirs(pre)
            with open(os.path.join(pre, "config.json"), "w") as f:
                json.dump({"arch": "resnet18", "number_net": n, "moco_k": 65536, "seed": seed, "epochs": 200}, f)
            config = {"arch": "resnet18", "pretrained": os.path.join(pre, "checkpoint.pth.tar"), "seed": seed,
                      "epochs": 1, "lr": 30.0}
            write_run(root, f"lin_{label}_{seed}", config, [[47.0 + n + seed]])
    code, out, _ = run_cli([os.path.join(root, "lin_*")], capsys)
    assert code == 0
    assert "## Linear evaluation (main_lincls.py)" in out
    assert "| ResNet-18 | 48.50 ± 0.71 (2) | 49.50 ± 0.71 (2) |" in out


def test_torn_last_line_is_dropped(runs_root):
    with open(os.path.join(runs_root, "baseline_s0", "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 4, "te')
    assert len(results.load_run(os.path.join(runs_root, "baseline_s0")).records) == 4


@pytest.mark.parametrize("case", ["empty", "missing", "bad_json"])
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, case):
    if case == "empty":
        argv = [str(tmp_path)]
    elif case == "missing":
        argv = [str(tmp_path / "nope")]
    else:
        write_run(str(tmp_path), "r", config_of("mcl2", 0), CURVES[("mcl2", 0)])
        with open(tmp_path / "r" / "config.json", "w") as f:
            f.write("{not json")
        argv = [str(tmp_path)]
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    if case == "bad_json":
        assert "config.json" in err


def test_plot_without_matplotlib_says_how_to_install(runs_root, capsys, monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, out, err = run_cli([runs_root, "--plot", str(tmp_path / "p.png")], capsys)
    assert code == 2 and out == ""
    assert err == "error: --plot needs matplotlib: pip install matplotlib (or pip install -e .[plot])\n"


def test_plot_writes_one_panel_per_group(runs_root, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = str(tmp_path / "curves.png")
    code, _, err = run_cli([runs_root, "--plot", path], capsys)
    assert code == 0 and "2 panels" in err
    assert os.path.getsize(path) > 0


def test_group_curves_average_over_seeds(runs_root):
    runs = [results.load_run(os.path.join(runs_root, f"baseline_s{s}")) for s in range(3)]
    curves = results.group_curves(runs)
    epochs, net0 = curves["net 0"]
    assert epochs == [0, 1, 2, 3]
    assert net0[1] == pytest.approx(statistics.fmean([60, 61, 63]))
    assert curves["ensemble"][1][0] == pytest.approx(statistics.fmean([52, 51, 53]))
    assert curves["lr"][1] == pytest.approx([0.1] * 4)
