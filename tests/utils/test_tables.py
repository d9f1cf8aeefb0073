"""utils/tables.py through scripts/summarize.py: metrics, mean ± std cells, markdown and CSV."""
import os

import pytest

from tests.fake_runs import CURVES, config_of, expected, last, paper, read_csv, write_run
from tests.script_helpers import script_cli
from utils import tables
from utils.run_dirs import load_run

summarize_cli = script_cli("summarize")


def test_paper_metric_means_and_stds_in_markdown(runs_root, capsys):
    code, out, err = summarize_cli([runs_root], capsys)
    assert code == 0, err
    assert "Metric: paper" in out
    assert "| Network | Baseline | MCL(×2) |" in out
    mean_b, std_b = expected("baseline", paper)
    mean_m, std_m = expected("mcl2", paper)
    assert f"| ResNet-32 | {mean_b:.2f} ± {std_b:.2f} (3) | {mean_m:.2f} ± {std_m:.2f} (3) |" in out


def test_csv_and_last_metric(runs_root, capsys):
    code, out, _ = summarize_cli([os.path.join(runs_root, "*"), "--csv", "--metric", "last"], capsys)
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
    run = load_run(os.path.join(runs_root, "baseline_s0"))
    assert tables.paper_metric(run) == 70  # epoch 2, net 0; the last epoch's best is 69
    assert tables.last_metric(run) == pytest.approx(68.5)


def test_unfinished_run_is_listed_and_excluded_then_marked(runs_root, capsys, tmp_path):
    write_run(runs_root, "mcl2_s3", config_of("mcl2", 3), [[90, 90], [99, 99]], finished=False)
    code, out, _ = summarize_cli([runs_root], capsys)
    assert code == 0
    mean_m, std_m = expected("mcl2", paper)
    assert f"{mean_m:.2f} ± {std_m:.2f} (3) |" in out
    assert "Unfinished runs" in out and "mcl2_s3: 2/4 epochs" in out

    out_file = str(tmp_path / "table.csv")
    code, out, _ = summarize_cli([runs_root, "--include-unfinished", "--csv", "--out", out_file], capsys)
    assert code == 0 and out == ""
    with open(out_file) as f:
        rows = read_csv(f.read())
    assert rows["MCL(×2)"]["n"] == "4" and rows["MCL(×2)"]["includes_unfinished"] == "1"
    assert rows["Baseline"]["includes_unfinished"] == "0"

    code, out, _ = summarize_cli([runs_root, "--include-unfinished"], capsys)
    assert "(4)*" in out


def test_single_run_has_no_std_and_other_settings_get_descriptive_columns(tmp_path, capsys):
    root = str(tmp_path)
    write_run(root, "a", config_of("mcl2", 0), CURVES[("mcl2", 0)])
    write_run(root, "b", dict(config_of("mcl2", 0), tau=0.07), CURVES[("mcl2", 1)])
    write_run(root, "c", dict(config_of("mcl2", 0), number_net=4, logit_distill=True), CURVES[("mcl2", 2)])
    write_run(root, "d", dict(config_of("baseline", 0), alpha=0.1, beta=0.1), CURVES[("mcl2", 2)])
    write_run(root, "e", dict(config_of("baseline", 0), arch="wrn_16_2"), CURVES[("baseline", 0)])
    code, out, _ = summarize_cli([root], capsys)
    assert code == 0
    header = next(line for line in out.splitlines() if line.startswith("| Network"))
    assert header == ("| Network | Baseline | MCL(×2) tau=0.07 | MCL(×2) tau=0.1 | MCL(×4)+Logit KD "
                      "| MCL(×2) [VCL+ICL] |")
    assert f"| {paper(CURVES[('mcl2', 0)]):.2f} (1) |" in out
    assert "| WRN-16-2 | 70.00 (1) |  |  |  |  |" in out


def _add_calibration(run_dir, nll, ece):
    """Give every record of a fake run test NLL/ECE (per network and of the ensemble)."""
    import json

    path = os.path.join(run_dir, "metrics.jsonl")
    records = [json.loads(line) for line in open(path)]
    for record in records:
        record["test"].update(nll=nll, ens_nll=min(nll) - 0.1, ece=ece, ens_ece=min(ece) - 1.0)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_calibration_metrics_table_nll_and_ece(tmp_path, capsys):
    root = str(tmp_path)
    for seed, (nll, ece) in enumerate([([1.0, 1.2], [4.0, 6.0]), ([1.4, 1.6], [6.0, 8.0])]):
        _add_calibration(write_run(root, f"mcl_s{seed}", config_of("mcl2", seed), CURVES[("mcl2", seed)]), nll, ece)
    write_run(root, "old_s2", config_of("mcl2", 2), CURVES[("mcl2", 2)])  # before calibration was measured
    code, out, _ = summarize_cli([root, "--metric", "ece"], capsys)
    assert code == 0
    assert "Test ECE % (lower is better)" in out and "| ResNet-32 | 6.00 ± 1.41 (2) |" in out
    assert "old_s2: no NLL/ECE in metrics.jsonl" in out
    code, out, _ = summarize_cli([root, "--metric", "ensemble_nll", "--csv"], capsys)
    row = read_csv(out)["MCL(×2)"]
    assert float(row["mean"]) == pytest.approx(1.1) and row["n"] == "2"  # (0.9 + 1.3) / 2
    assert tables.nll_metric(load_run(os.path.join(root, "mcl_s1"))) == pytest.approx(1.5)


def test_lmcl_runs_get_their_column_and_the_aggregated_metric(tmp_path, capsys):
    """L-MCL runs form an "L-MCL(×2)" column; MCL runs written with the L-MCL flags in their config (method
    "mcl") group with MCL runs from before those flags existed."""
    import json

    from tests.fake_runs import BASE_CONFIG, MCL_WEIGHTS

    root = str(tmp_path)
    mcl = dict(BASE_CONFIG, **MCL_WEIGHTS)
    write_run(root, "mcl_old", dict(mcl, manual_seed=0), CURVES[("mcl2", 0)])
    write_run(root, "mcl_new", dict(mcl, manual_seed=1, method="mcl", meta_freq=50, times=2),
              CURVES[("mcl2", 1)])
    lmcl = dict(mcl, method="lmcl", meta_freq=50, times=2, exact_hypergradient=False)
    write_run(root, "lmcl", dict(lmcl, manual_seed=0), CURVES[("mcl2", 2)])
    metrics = os.path.join(root, "lmcl", "metrics.jsonl")
    records = [json.loads(line) for line in open(metrics)]
    for record in records:
        record["test"]["agg_top1"] = [80.0, 82.0]
    with open(metrics, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    code, out, err = summarize_cli([root, "--metric", "aggregated"], capsys)
    assert code == 0, err
    assert "| ResNet-32 | 81.00 (1) |" in out  # MCL runs have no aggregated logits
    code, out, _ = summarize_cli([root], capsys)
    assert "| Network | MCL(×2) | L-MCL(×2) |" in out
    code, out, _ = summarize_cli([root, "--csv"], capsys)
    rows = read_csv(out)
    assert rows["MCL(×2)"]["n"] == "2" and rows["L-MCL(×2)"]["n"] == "1"
