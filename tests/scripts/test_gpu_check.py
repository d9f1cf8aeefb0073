"""scripts/gpu_check.sh: its CPU dry run (--quick) prints one well-formed line per check and nothing FAILs;
the report's format and exit code with checks that fail or break."""
import json
import os
import re
import subprocess

from tests import ROOT  # noqa: E402
from tests.script_helpers import load_script

SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$")


def test_quick_dry_run_prints_a_line_per_check_and_nothing_fails(tmp_path):
    gpu_check = load_script("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(["bash", "scripts/gpu_check.sh", "--no-install", "--quick", "--device", "cpu",
                          "--work-dir", str(tmp_path), "--budget", "1200"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1500, env=env)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    found = [gpu_check.LINE.match(line) for line in lines[:-1]]
    assert all(found), [line for line, m in zip(lines, found) if not m]
    results = {m.group(2): (m.group(1), m.group(3)) for m in found}
    checks = gpu_check.all_checks()
    assert sorted(results) == sorted(c.name for c in checks)  # each check once
    statuses = [status for status, _ in results.values()]
    assert "FAIL" not in statuses
    assert SUMMARY.match(lines[-1]).groups() == (str(statuses.count("PASS")), "0")
    for check in checks:
        status, reason = results[check.name]
        if check.cuda_only:
            assert (status, reason) == ("SKIP", check.cuda_only)
        elif not check.in_quick:
            assert (status, reason) == ("SKIP", "left out by --quick")
        else:
            assert status == "PASS", (check.name, reason)
    benchmark = json.loads(results["benchmark resnet32 x2"][1])
    assert set(benchmark["images_per_s"]) == {"reference", "fast", "fast_compile"}
    assert "ratio_fast_compile_over_fast" in benchmark
    assert "work directory" in out.stderr
    assert not list(tmp_path.rglob("*.pth.tar"))  # checkpoints removed, logs kept
    assert list((tmp_path / "logs").glob("*.log"))


def test_a_failing_or_broken_check_is_one_line_and_exit_code_1(tmp_path, capsys, monkeypatch):
    gpu_check = load_script("gpu_check")

    def broken(ctx):
        raise RuntimeError("a bug\nwith a second line")

    checks = [gpu_check.Check("fine", lambda ctx: gpu_check.Result("PASS", "all\ngood")),
              gpu_check.Check("fails", lambda ctx: gpu_check.Result("FAIL", "wrong")),
              gpu_check.Check("broken", broken),
              gpu_check.Check("needs a GPU", broken, cuda_only="needs CUDA"),
              gpu_check.Check("timed", lambda ctx: gpu_check.Result("PASS", "late"), alone=True)]
    monkeypatch.setattr(gpu_check, "all_checks", lambda: checks)
    code = gpu_check.main(["--device", "cpu", "--work-dir", str(tmp_path), "--install", "PASS install: ok"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert lines[0] == "PASS install: ok" and lines[-1] == "3 passed, 2 failed"
    assert set(lines[1:-2]) == {"PASS fine: all good", "FAIL fails: wrong", "FAIL broken: RuntimeError: a bug",
                                "SKIP needs a GPU: needs CUDA"}
    assert lines[-2] == "PASS timed: late"  # the checks that time things run last, alone
    assert "Traceback" in (tmp_path / "logs" / "broken.log").read_text()


def test_checks_not_started_within_the_budget_are_skipped(tmp_path, capsys, monkeypatch):
    gpu_check = load_script("gpu_check")
    monkeypatch.setattr(gpu_check, "all_checks", lambda: [gpu_check.Check("late", lambda ctx: 1 / 0)])
    assert gpu_check.main(["--device", "cpu", "--work-dir", str(tmp_path), "--budget", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "SKIP late: not started: the time budget (--budget) was used up", "0 passed, 0 failed"]
