"""utils/run_dirs.py and utils/groups.py through scripts/summarize.py: finding, reading and grouping runs."""
import json
import os

import pytest

from tests.fake_runs import CURVES, config_of, read_csv, write_run
from tests.script_helpers import script_cli
from utils.run_dirs import load_run

summarize_cli = script_cli("summarize")


def test_ignore_key_merges_runs_that_differ_in_that_flag(tmp_path, capsys):
    root = str(tmp_path)
    write_run(root, "a", dict(config_of("mcl2", 0), amp="none"), CURVES[("mcl2", 0)])
    write_run(root, "b", dict(config_of("mcl2", 1), amp="bf16"), CURVES[("mcl2", 1)])
    code, out, _ = summarize_cli([root, "--csv"], capsys)
    assert set(read_csv(out)) == {"MCL(×2) amp=bf16", "MCL(×2) amp=none"}
    code, out, _ = summarize_cli([root, "--csv", "--ignore-key", "amp"], capsys)
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
    code, out, _ = summarize_cli([os.path.join(root, "lin_*")], capsys)
    assert code == 0
    assert "## Linear evaluation (main_lincls.py)" in out
    assert "| ResNet-18 | 48.50 ± 0.71 (2) | 49.50 ± 0.71 (2) |" in out


def test_torn_last_line_is_dropped(runs_root):
    with open(os.path.join(runs_root, "baseline_s0", "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 4, "te')
    assert len(load_run(os.path.join(runs_root, "baseline_s0")).records) == 4


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
    code, out, err = summarize_cli(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    if case == "bad_json":
        assert "config.json" in err


@pytest.mark.parametrize("damage", [b"\xff\xfe\x00\x81 not utf-8\n", b"{\"epoch\": 0}\nnot json\n{\"epoch\": 1}\n"],
                         ids=["undecodable", "bad-line"])
def test_an_unreadable_metrics_file_skips_that_run_only(runs_root, capsys, damage):
    """One damaged metrics.jsonl: one line on stderr naming that run; the table of the others is written."""
    bad = os.path.join(runs_root, "mcl2_s2")
    with open(os.path.join(bad, "metrics.jsonl"), "wb") as f:
        f.write(damage)
    code, out, err = summarize_cli([runs_root, "--csv"], capsys)
    assert code == 0, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("skipped a run: cannot read ") and os.path.join(bad, "metrics.jsonl") in err
    rows = read_csv(out)
    assert rows["Baseline"]["n"] == "3" and rows["MCL(×2)"]["n"] == "2"
