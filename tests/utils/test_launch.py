"""Which ranks, GPUs and timeouts each way of starting the scripts asks for (utils.launch).

CUDA and init_process_group are stubbed (tests/fake_cuda.py): every test records what
a process would ask of NCCL on a machine with GPUs, without one.
"""
import datetime
import os

import pytest
import torch

import main_cifar
import main_imagenet
import main_lincls
import main_moco_mcl
from tests.fake_cuda import fake_gpus
from utils import distributed as du
from utils.errors import ConfigError
from utils.launch import (processes_on_this_node, processes_per_node, refuse_data_parallel, setup_process,
                          visible_devices_for)

SCRIPTS = {"main_cifar": main_cifar, "main_imagenet": main_imagenet, "main_moco_mcl": main_moco_mcl,
           "main_lincls": main_lincls}


def moco_args(*flags: str):
    return main_moco_mcl.parse_args(["--device", "cuda", *flags])


def ranks_asked(args, calls):
    """(world size, rank, init method, device_id) of every process of this node, in local-rank order."""
    nprocs = processes_per_node(args)
    for local_rank in range(nprocs):
        setup_process(args, local_rank, nprocs)
    return [(c["world_size"], c["rank"], c["init_method"], c["device_id"]) for c in calls.init]


def test_node_1_of_2_with_the_originals_env_convention_asks_for_ranks_2_and_3_of_4(monkeypatch):
    calls = fake_gpus(monkeypatch, count=2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # nodes
    monkeypatch.setenv("RANK", "1")  # this node's index
    args = moco_args("--multiprocessing-distributed", "--dist-url", "env://")
    assert ranks_asked(args, calls) == [(4, 2, "env://", torch.device("cuda", 0)),
                                        (4, 3, "env://", torch.device("cuda", 1))]
    assert calls.set_device == [torch.device("cuda", 0), torch.device("cuda", 1)]


def test_explicit_node_flags_win_over_the_environment(monkeypatch):
    calls = fake_gpus(monkeypatch, count=2)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    args = moco_args("--multiprocessing-distributed", "--world-size", "2", "--rank", "0",
                     "--dist-url", "tcp://10.0.0.1:2345")
    assert [r[:3] for r in ranks_asked(args, calls)] == [(4, 0, "tcp://10.0.0.1:2345"), (4, 1, "tcp://10.0.0.1:2345")]


def test_several_nodes_need_this_nodes_rank(monkeypatch):
    fake_gpus(monkeypatch, count=2)
    args = moco_args("--multiprocessing-distributed", "--world-size", "2", "--dist-url", "tcp://h:1")
    with pytest.raises(ConfigError, match="--world-size 2 nodes: give this node's index with --rank"):
        setup_process(args, 0, 2)


@pytest.mark.parametrize("script", ["main_cifar", "main_moco_mcl"])
def test_torchrun_gives_rank_local_rank_and_env_url(monkeypatch, script):
    calls = fake_gpus(monkeypatch, count=2)
    for name, value in {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    args = SCRIPTS[script].parse_args(["--device", "cuda"])
    ctx = setup_process(args, 0, processes_per_node(args))
    (init,) = calls.init
    assert (init["world_size"], init["rank"], init["init_method"]) == (4, 3, "env://")
    assert ctx.device == torch.device("cuda", 1) and ctx.local_rank == 1
    if script == "main_moco_mcl":
        assert processes_on_this_node(args, ctx, 1) == 2


def test_rank_from_the_environment_with_an_explicit_url_and_gpu(monkeypatch):
    """The original's one process per node without --multiprocessing-distributed: --gpu picks the GPU."""
    calls = fake_gpus(monkeypatch, count=2)
    monkeypatch.setenv("RANK", "1")
    args = moco_args("--world-size", "2", "--dist-url", "tcp://10.0.0.1:2345", "--gpu", "1")
    ctx = setup_process(args, 0, 1)
    assert [c["rank"] for c in calls.init] == [1] and calls.init[0]["init_method"] == "tcp://10.0.0.1:2345"
    assert ctx.device == torch.device("cuda", 1)
    assert processes_on_this_node(args, ctx, 1) == 1  # one process per node: it takes the whole --batch-size


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_dist_timeout_is_a_flag_of_every_script_with_a_60_minute_default(script, capsys):
    parser = SCRIPTS[script].build_parser()
    assert parser.parse_args([]).dist_timeout == 60
    parser.print_help()
    assert "--dist-timeout MINUTES" in capsys.readouterr().out


@pytest.mark.parametrize("launch_way", ["supervised torchrun", "moco torchrun", "moco multiprocessing"])
def test_every_launch_way_passes_the_timeout(monkeypatch, launch_way):
    calls = fake_gpus(monkeypatch, count=2)
    if launch_way.endswith("torchrun"):
        for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
            monkeypatch.setenv(name, value)
    module = main_cifar if launch_way.startswith("supervised") else main_moco_mcl
    flags = ["--dist-timeout", "90", "--device", "cuda"]
    if launch_way.endswith("multiprocessing"):
        flags += ["--multiprocessing-distributed", "--world-size", "1", "--rank", "0", "--dist-url", "tcp://h:1"]
    setup_process(module.parse_args(flags), 0, 2 if launch_way.endswith("multiprocessing") else 1)
    assert calls.init[0]["timeout"] == datetime.timedelta(minutes=90)


def test_several_gpu_ids_in_one_process_is_an_error(monkeypatch):
    calls = fake_gpus(monkeypatch, count=4)
    with pytest.raises(ConfigError, match="--gpu-ids 0,1,2,3 lists 4 GPUs but without --multiprocessing-distributed"):
        setup_process(moco_args("--gpu-ids", "0,1,2,3"), 0, 1)
    assert setup_process(moco_args("--gpu-ids", "2"), 0, 1).device == torch.device("cuda", 2)
    assert setup_process(main_moco_mcl.parse_args(["--device", "cpu", "--gpu-ids", "0,1"]), 0, 1).device.type == "cpu"
    assert calls.init == []


def test_several_gpu_ids_for_the_originals_dataparallel_stop_with_the_torchrun_command(monkeypatch):
    fake_gpus(monkeypatch, count=4)
    with pytest.raises(ConfigError) as error:
        main_imagenet.main(["--gpu-id", "0,1,2,3", "--arch", "resnet18", "--batch-size", "256"])
    message = str(error.value)
    assert "\n" not in message and "DataParallel" in message
    assert message.endswith("run: torchrun --nproc_per_node=4 main_imagenet.py --gpu-id 0,1,2,3 --arch resnet18 "
                            "--batch-size 256")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


@pytest.mark.parametrize("case", ["torchrun", "one GPU visible", "cpu", "one id"])
def test_gpu_id_passes_where_each_process_has_one_gpu(monkeypatch, case):
    fake_gpus(monkeypatch, count=1 if case == "one GPU visible" else 4)
    if case == "torchrun":
        monkeypatch.setenv("WORLD_SIZE", "4")
    refuse_data_parallel("0" if case == "one id" else "0,1,2,3", "cpu" if case == "cpu" else "auto",
                         "main_cifar.py", [])


def test_gpu_id_indexes_an_already_set_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_devices_for("0,1") == "0,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert visible_devices_for("1,3") == "5,7"
    assert visible_devices_for("GPU-abc") == "GPU-abc"
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=4,5,6,7 makes 4 GPU.s. visible .* so 4 does not"):
        visible_devices_for("0,4")


def test_one_gpu_under_multiprocessing_is_one_process_without_a_group(monkeypatch):
    calls = fake_gpus(monkeypatch, count=1)
    args = moco_args("--multiprocessing-distributed", "--world-size", "1", "--rank", "0", "--dist-url", "tcp://h:1")
    assert processes_per_node(args) == 1
    ctx = setup_process(args, 0, 1)
    assert not ctx.distributed and ctx.device == torch.device("cuda", 0) and calls.init == []
    assert du.DEFAULT_TIMEOUT_MINUTES == 60
