"""Process-group set-up and device choice (utils.distributed), on CPU with stubbed CUDA and NCCL.

tests/fake_cuda.py makes torch.cuda report GPUs and records set_device and
init_process_group, so the CUDA/NCCL paths run here without a GPU.
"""
import datetime

import pytest
import torch
import torch.distributed as dist

from tests.fake_cuda import fake_gpus
from utils import distributed as du
from utils.errors import ConfigError


def test_explicit_world_and_rank_win_over_the_environment(monkeypatch):
    calls = fake_gpus(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    ctx = du.setup_distributed("cuda", "0,1", None, "tcp://127.0.0.1:1", world_size=4, rank=3, local_rank=1)
    (init,) = calls.init
    assert (init["world_size"], init["rank"], init["init_method"]) == (4, 3, "tcp://127.0.0.1:1")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.device) == (3, 4, 1, torch.device("cuda", 1))


def test_unset_world_and_rank_come_from_the_environment(monkeypatch):
    calls = fake_gpus(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ctx = du.setup_distributed("cuda")
    (init,) = calls.init
    assert (init["world_size"], init["rank"], init["init_method"]) == (4, 2, "env://")
    assert ctx.device == torch.device("cuda", 0) and ctx.distributed


def test_nccl_is_told_its_gpu_and_every_group_its_timeout(monkeypatch):
    calls = fake_gpus(monkeypatch, count=4)
    du.setup_distributed("cuda", "2,3", None, "tcp://h:1", world_size=2, rank=1, local_rank=1, timeout_minutes=90)
    du.setup_distributed("cpu", None, None, "tcp://h:1", world_size=2, rank=1, local_rank=1)
    nccl, gloo = calls.init
    assert nccl["backend"] == "nccl" and nccl["device_id"] == torch.device("cuda", 3)
    assert nccl["timeout"] == datetime.timedelta(minutes=90)
    assert gloo["backend"] == "gloo" and "device_id" not in gloo
    assert gloo["timeout"] == datetime.timedelta(minutes=du.DEFAULT_TIMEOUT_MINUTES)
    assert calls.set_device == [torch.device("cuda", 3)]


def test_one_process_on_cuda_makes_its_gpu_current(monkeypatch):
    calls = fake_gpus(monkeypatch, count=4)
    ctx = du.setup_distributed("cuda", "3")
    assert ctx.device == torch.device("cuda", 3) and not ctx.distributed
    assert calls.set_device == [torch.device("cuda", 3)] and calls.init == []
    assert du.setup_distributed("cpu").device == torch.device("cpu")
    assert calls.set_device == [torch.device("cuda", 3)]


def test_a_local_rank_past_the_listed_gpus_is_an_error_not_another_gpu(monkeypatch):
    fake_gpus(monkeypatch, count=4)
    with pytest.raises(ConfigError, match=r"--gpu-ids 0,1 lists 2 GPU\(s\) but this is local process 2"):
        du.resolve_device("cuda", 2, "0,1")
    with pytest.raises(ConfigError, match="--gpu 3 lists 1 GPU"):
        du.resolve_device("cuda", 1, "3", gpu_flag="--gpu")
    with pytest.raises(ConfigError, match="GPU 5 does not exist: 4 visible here .*CUDA_VISIBLE_DEVICES"):
        du.resolve_device("cuda", 0, "5")
    assert du.resolve_device("cuda", 2) == torch.device("cuda", 2)


def test_a_launcher_without_local_rank_on_several_gpus_is_an_error(monkeypatch):
    fake_gpus(monkeypatch, count=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="RANK and WORLD_SIZE are set but LOCAL_RANK is not, and 2 GPUs"):
        du.setup_distributed("cuda")


@pytest.mark.parametrize("case", ["one process per node", "one GPU", "one listed GPU", "cpu"])
def test_a_launcher_without_local_rank_is_fine_when_the_gpu_is_unambiguous(monkeypatch, case):
    calls = fake_gpus(monkeypatch, count=1 if case == "one GPU" else 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    if case == "one process per node":
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    device = "cpu" if case == "cpu" else "cuda"
    ctx = du.setup_distributed(device, "1" if case == "one listed GPU" else None)
    expected = {"one listed GPU": torch.device("cuda", 1), "cpu": torch.device("cpu")}.get(case, torch.device("cuda", 0))
    assert ctx.device == expected and ctx.local_rank == 0 and calls.init[0]["rank"] == 1


def test_ranks_given_by_flags_without_local_rank_mean_one_process_per_node(monkeypatch):
    fake_gpus(monkeypatch, count=2)
    ctx = du.setup_distributed("cuda", None, None, "tcp://h:1", world_size=2, rank=1)
    assert ctx.local_rank == 0 and ctx.device == torch.device("cuda", 0)


@pytest.mark.parametrize("rank", [-1, 2])
def test_a_group_without_a_valid_rank_is_an_error(monkeypatch, rank):
    fake_gpus(monkeypatch)
    with pytest.raises(ConfigError, match=f"needs this process's rank in 0..1 .got {rank}.: pass --rank or set RANK"):
        du.setup_distributed("cpu", None, None, "tcp://h:1", world_size=2, rank=rank, local_rank=0)


def test_a_launcher_variable_that_is_not_a_number_is_one_line(monkeypatch):
    fake_gpus(monkeypatch)
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="environment variable RANK='one' is not an integer"):
        du.setup_distributed("cpu", world_size=2)


@pytest.mark.parametrize("backend,device_ids", [("nccl", [1]), ("gloo", None)])
def test_barrier_names_the_gpu_under_nccl(monkeypatch, backend, device_ids):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(dist, "barrier", lambda **kwargs: calls.append(kwargs))
    du.barrier()
    assert calls == ([{"device_ids": device_ids}] if device_ids else [{}])
