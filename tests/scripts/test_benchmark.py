"""scripts/benchmark.py on a tiny configuration: it runs both modes and prints well-formed JSON (no timing asserts)."""
import json

import pytest
import torch

from tests.script_helpers import load_script, restored_global_state, run_in_process

TINY = ["--steps", "1", "--warmup", "1", "--repeats", "1", "--batch-size", "8", "--synthetic-size", "160",
        "--device", "cpu", "--threads", "1"]
MODE_KEYS = {"mode", "arch", "number_net", "topology", "batch_size", "images_per_s", "images_per_s_rounds",
             "s_per_step", "data_s_per_step", "peak_memory_mb", "memory_measure", "torch", "device", "threads"}
SUMMARY_KEYS = {"summary", "ratio_fast_over_reference", "command", "cpu", "cores", "torch", "torchvision",
                "python", "load_avg_before", "steps", "warmup", "repeats"}


def run_benchmark(*extra):
    out = run_in_process(load_script("benchmark").main, [*TINY, *extra])
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_benchmark_prints_one_line_per_mode_and_a_ratio():
    lines = run_benchmark("--arch", "resnet32", "--number-net", "2")
    assert [line.get("mode") for line in lines[:2]] == ["reference", "fast"]
    for line in lines[:2]:
        assert MODE_KEYS <= set(line), MODE_KEYS - set(line)
        assert line["images_per_s"] > 0 and line["s_per_step"] > 0 and line["data_s_per_step"] >= 0
        assert line["peak_memory_mb"] > 0 and line["device"] == "cpu" and line["threads"] == 1
        assert line["arch"] == "resnet32" and line["number_net"] == 2 and line["topology"] == "independent"
        assert len(line["images_per_s_rounds"]) == 1
    summary = lines[2]
    assert len(lines) == 3 and summary["summary"] is True
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    ratio = lines[1]["images_per_s"] / lines[0]["images_per_s"]
    assert abs(summary["ratio_fast_over_reference"] - ratio) < 1e-9
    assert summary["command"].startswith("python scripts/benchmark.py")


def test_benchmark_one_mode_of_a_branched_cohort(capsys):
    with restored_global_state():
        assert load_script("benchmark").main(TINY + ["--arch", "resnet32", "--number-net", "3", "--modes", "fast"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [line.get("mode") for line in lines] == ["fast", None]
    assert lines[0]["topology"] == "branched"
    assert "ratio_fast_over_reference" not in lines[1]


def test_convolutions_profile_reports_the_time_in_convolutions(capsys):
    with restored_global_state():
        assert load_script("benchmark").main(TINY + ["--arch", "resnet32", "--number-net", "2", "--convolutions"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [(line.get("mode"), line.get("profile")) for line in lines] == [
        ("reference", None), ("fast", None), ("reference", True), ("fast", True), (None, None)]
    for profile in lines[2:4]:
        assert 0 < profile["convolution_ms_per_step"] < profile["profiled_ms_per_step"]
        assert profile["convolution_fraction"] == profile["convolution_ms_per_step"] / profile["profiled_ms_per_step"]
    summary = lines[4]
    assert summary["convolution_ratio"] == lines[2]["convolution_ms_per_step"] / lines[3]["convolution_ms_per_step"]
    bound = lines[0]["s_per_step"] / (lines[1]["s_per_step"] * lines[3]["convolution_fraction"])
    assert abs(summary["ratio_bound_convolutions_only"] - bound) < 1e-9


def test_default_modes_add_the_compiled_fast_path_on_cuda_only():
    module = load_script("benchmark")
    assert module.parse_modes(None, torch.device("cpu")) == ["reference", "fast"]
    assert module.parse_modes(None, torch.device("cuda")) == ["reference", "fast", "fast_compile"]
    assert module.parse_modes("fast_compile", torch.device("cpu")) == ["fast_compile"]


def test_ratios_of_the_compiled_fast_path():
    rounds = {"reference": [10.0, 20.0], "fast": [30.0, 40.0], "fast_compile": [60.0, 60.0]}
    results = {mode: {"images_per_s": sum(r) / 2, "images_per_s_rounds": r, "images_per_s_best": max(r)}
               for mode, r in rounds.items()}
    ratios = load_script("benchmark").ratios(results)
    assert ratios["ratio_fast_over_reference"] == 35.0 / 15.0
    assert ratios["ratio_fast_compile_over_reference"] == 60.0 / 15.0
    assert ratios["ratio_fast_compile_over_fast"] == 60.0 / 35.0
    assert set(load_script("benchmark").ratios({"fast": results["fast"]})) == set()


def test_lmcl_times_the_normal_update_and_the_meta_step_against_mcl(capsys):
    """--method lmcl: one line per mode (mcl, lmcl, lmcl_meta), the iteration cost with the meta step averaged
    over --meta-freq, and the ratios to an MCL step (tiny: batch 4, no warm-up, one step each)."""
    tiny = ["--steps", "1", "--warmup", "0", "--repeats", "1", "--batch-size", "4", "--synthetic-size", "40",
            "--device", "cpu", "--threads", "1"]
    with restored_global_state():
        assert load_script("benchmark").main(tiny + ["--method", "lmcl", "--meta-freq", "10"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [line.get("mode") for line in lines] == ["mcl", "lmcl", "lmcl_meta", None]
    seconds = {line["mode"]: line["s_per_step"] for line in lines[:3]}
    assert all(s > 0 for s in seconds.values())
    assert all(line["method"] == "lmcl" and line["timed_steps"] == 1 for line in lines[:3])
    summary = lines[3]
    assert summary["meta_freq"] == 10 and summary["times"] == 2 and summary["precision"] == "float32"
    iteration = seconds["lmcl"] + seconds["lmcl_meta"] / 10
    assert summary["lmcl_s_per_iteration"] == pytest.approx(iteration, rel=1e-12)
    assert summary["ratio_lmcl_iteration_over_mcl"] == pytest.approx(iteration / seconds["mcl"], rel=1e-12)
    assert summary["ratio_normal_update_over_mcl"] == pytest.approx(seconds["lmcl"] / seconds["mcl"], rel=1e-12)
    assert summary["ratio_meta_step_over_mcl"] == pytest.approx(seconds["lmcl_meta"] / seconds["mcl"], rel=1e-12)
    cpu_seconds = {line["mode"]: line["cpu_s_per_step"] for line in lines[:3]}
    cpu_iteration = cpu_seconds["lmcl"] + cpu_seconds["lmcl_meta"] / 10
    assert summary["cpu_ratio_lmcl_iteration_over_mcl"] == pytest.approx(cpu_iteration / cpu_seconds["mcl"],
                                                                         rel=1e-12)
    assert "ratio_fast_over_reference" not in summary


def test_lmcl_modes_are_checked():
    module = load_script("benchmark")
    assert module.parse_modes(None, torch.device("cpu"), "lmcl") == ["mcl", "lmcl", "lmcl_meta"]
    assert module.parse_modes("lmcl,mcl", torch.device("cpu"), "lmcl") == ["lmcl", "mcl"]
    with pytest.raises(SystemExit, match="--method lmcl"):
        module.parse_modes("fast", torch.device("cpu"), "lmcl")
