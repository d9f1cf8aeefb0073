"""What config.json records to reproduce a run, and the CPUs a run may use."""
import re
import sys

from utils import machine


def test_provenance_names_command_code_host_hardware_and_versions():
    record = machine.provenance()
    for key in ("command", "git", "host", "cpu", "gpus", "cuda", "cudnn", "packages", "platform", "cwd"):
        assert key in record, key
    assert record["command"].split()[1] == sys.argv[0]
    assert record["packages"]["torch"] and record["packages"]["python"]
    commit = record["git"]["commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert record["git"]["dirty"] in (True, False, None)


def test_arguments_parsed_from_python_are_recorded(monkeypatch):
    monkeypatch.setattr(machine, "_parsed_arguments", None)
    assert "arguments" not in machine.provenance()
    machine.record_arguments(["--epochs", "3"])
    assert machine.provenance()["arguments"] == ["--epochs", "3"]
    monkeypatch.setattr(machine, "_parsed_arguments", None)


def test_available_cpus_honours_a_container_quota(monkeypatch):
    monkeypatch.setattr(machine, "_cgroup_cpu_limit", lambda: 1)
    assert machine.available_cpus() == 1
    monkeypatch.setattr(machine, "_cgroup_cpu_limit", lambda: None)
    assert machine.available_cpus() >= 1


def test_cpu_name_and_flags_come_from_the_first_processor_of_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(
        cpuinfo if path == "/proc/cpuinfo" else path, *a, **k))
    assert machine.cpu_name() == "Some CPU 9000"
    assert machine.cpu_flags() == ["fpu", "avx2", "avx512_bf16"]
