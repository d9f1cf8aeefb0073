"""Where a run starts is rank 0's decision, shared with every rank (utils/start.py, utils/distributed.py).

The two-process runs are two "nodes" without a shared filesystem (tests/two_nodes.py); the
helpers' test runs two gloo processes in two working directories the same way.
"""
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils import distributed as du
from utils.checkpoint import atomic_save, load_checkpoint
from utils.errors import CheckpointError, PeerError
from utils.start import Start, decide_start, file_digest, fingerprint, read_identical_copy

from tests.two_nodes import RUN, free_port, two_nodes


def latest(node):
    return load_checkpoint(os.path.join(node, "ck", "r", "checkpoint.pth.tar"))


def assert_same_training(a, b):
    for key in ("model", "heads"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"])
    assert (a["epoch"], a["step"], a["best_acc"]) == (b["epoch"], b["step"], b["best_acc"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted two-process run: its final checkpoint; only rank 0 wrote a run directory."""
    base = tmp_path_factory.mktemp("reference")
    nodes = [str(base / "node0"), str(base / "node1")]
    for code, _, err in two_nodes(nodes, RUN):
        assert code == 0, err[-3000:]
    assert not os.path.exists(os.path.join(nodes[1], "ck"))
    return latest(nodes[0]), nodes


def test_a_rank_without_the_checkpoint_resumes_rank_0s(tmp_path, reference):
    """Stopped after step 1, then resumed where rank 1's ck/r holds another run's finished checkpoint
    (deciding alone, it would stop as finished while rank 0 resumes): both resume rank 0's checkpoint and
    end bitwise where the uninterrupted run ended."""
    final, ref_nodes = reference
    nodes = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    stopped = two_nodes(nodes, RUN, {"MCL_DEBUG_SIGNAL_AFTER_STEPS": "1:TERM:1"})
    assert [code for code, _, _ in stopped] == [0, 0], stopped[0][2][-3000:] + stopped[1][2][-3000:]
    assert (latest(nodes[0])["epoch"], latest(nodes[0])["step"]) == (0, 1)
    os.makedirs(os.path.join(nodes[1], "ck", "r"))
    stale = os.path.join(nodes[1], "ck", "r", "checkpoint.pth.tar")
    shutil.copyfile(os.path.join(ref_nodes[0], "ck", "r", "checkpoint.pth.tar"), stale)
    before = file_digest(stale)
    resumed = two_nodes(nodes, RUN + ["--resume"])
    for code, out, err in resumed:
        assert code == 0, err[-3000:]
        assert "already finished" not in out
    assert_same_training(final, latest(nodes[0]))
    assert file_digest(stale) == before and sorted(os.listdir(os.path.join(nodes[1], "ck", "r"))) == [
        "checkpoint.pth.tar"]  # rank 1 wrote nothing


# ----------------------------------------------------------------------------- the helpers, in-process

def test_without_a_group_the_decision_is_local(tmp_path):
    path = str(tmp_path / "c.pth.tar")
    atomic_save({"format": "mcl-checkpoint", "epoch": 1, "step": 0}, path)
    start = decide_start(lambda: Start(path, load_checkpoint(path)))
    assert start.ckpt["epoch"] == 1 and not start.finished
    with pytest.raises(CheckpointError):
        decide_start(lambda: (_ for _ in ()).throw(CheckpointError("bad")))


def test_an_identical_copy_is_recognised_and_another_is_not(tmp_path):
    a, b = str(tmp_path / "a.pth.tar"), str(tmp_path / "b.pth.tar")
    ckpt = {"format": "mcl-checkpoint", "epoch": 3, "step": 7, "w": torch.arange(600_000.0)}  # over 2 MiB
    atomic_save(ckpt, a)
    shutil.copyfile(a, b)
    expected = fingerprint(a, ckpt)
    assert torch.equal(read_identical_copy(b, expected)["w"], ckpt["w"])
    atomic_save({**ckpt, "w": ckpt["w"] + 1}, b)  # same size, other content
    assert read_identical_copy(b, expected) is None
    assert read_identical_copy(str(tmp_path / "missing"), expected) is None


def fake_checkpoint(path, **fields):
    """A main_cifar.py checkpoint of RUN's flags (``fields`` change it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save({"format": "mcl-checkpoint", "version": 2, "script": "main_cifar", "arch": "resnet32",
                 "number_net": 2, "topology": "independent", "num_classes": 8, "config": {"tau": 0.1},
                 "epoch": 0, "step": 1, "finished": False, "w": torch.arange(4.0), **fields}, path)


def node_folders(base):
    """Two "nodes": rank 0's ck/ holds a finished run (fin), a resumable one (res) and one of another
    --tau (tau); rank 1's ck/ holds another run's checkpoint under res."""
    nodes = [os.path.join(base, "node0"), os.path.join(base, "node1")]
    fake_checkpoint(os.path.join(nodes[0], "ck", "fin", "checkpoint.pth.tar"), epoch=1, step=0, finished=True)
    fake_checkpoint(os.path.join(nodes[0], "ck", "res", "checkpoint.pth.tar"))
    fake_checkpoint(os.path.join(nodes[0], "ck", "tau", "checkpoint.pth.tar"), config={"tau": 0.2})
    fake_checkpoint(os.path.join(nodes[1], "ck", "res", "checkpoint.pth.tar"), w=torch.zeros(4), step=2)
    os.makedirs(nodes[1], exist_ok=True)
    return nodes


SCENARIOS = ("rank 1 fails", "rank 0 crashes", "rank 0 decides", "finished", "resume", "other flags")


def _plan(rank, run_name):
    import main_cifar
    from utils.script_setup import plan_supervised_run

    args = main_cifar.parse_args(RUN + ["--run-name", run_name, "--resume"])
    ctx = du.DistContext(rank=rank, world_size=2, distributed=True)
    plan = plan_supervised_run(args, ctx, "main_cifar", main_cifar.build_parser())
    return plan


def _run_scenario(scenario, rank):
    if scenario == "rank 1 fails":
        du.on_every_rank(lambda: _fail_on_rank_1(rank))
    elif scenario == "rank 0 crashes":
        du.decided_on_main(lambda: 1 / 0)
    elif scenario == "rank 0 decides":
        return f"ok {int(du.decided_on_main(lambda: {'t': torch.ones(3) * 5})['t'].sum())}"
    elif scenario == "finished":
        plan = _plan(rank, "fin")
        return f"finished={plan.already_finished} holds={plan.ckpt is not None}"
    elif scenario == "resume":
        plan = _plan(rank, "res")
        return f"{plan.resume_path} step {plan.ckpt['step']} w {plan.ckpt['w'].tolist()}"
    else:
        _plan(rank, "tau")


def _agreement_worker(rank, port, nodes, results):
    os.chdir(nodes[rank])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for scenario in SCENARIOS:
            try:
                results[(scenario, rank)] = _run_scenario(scenario, rank)
            except Exception as err:
                results[(scenario, rank)] = f"{type(err).__name__}: {err}"
    finally:
        dist.destroy_process_group()


def _fail_on_rank_1(rank):
    if rank == 1:
        raise CheckpointError("rank 1 cannot read it")
    return "fine"


def test_every_rank_learns_the_outcome(tmp_path):
    """Two gloo processes in two folders, as on two nodes: a failure on rank 1 stops both; rank 0's crash
    reaches rank 1 as one line; rank 0's decision (CPU tensors) reaches rank 1; a run finished on rank 0
    stops rank 1, which never reads a checkpoint; rank 1 resumes rank 0's checkpoint, not its own file of
    the same name; a checkpoint of other flags stops both with rank 0's line. Nobody waits."""
    nodes = node_folders(str(tmp_path))
    results = mp.get_context("fork").Manager().dict()
    mp.start_processes(_agreement_worker, args=(free_port(), nodes, results), nprocs=2, join=True,
                       start_method="fork")
    got = {scenario: [results[(scenario, 0)], results[(scenario, 1)]] for scenario in SCENARIOS}
    refused = got.pop("other flags")
    assert got == {
        "rank 1 fails": ["CheckpointError: rank 1 cannot read it"] * 2,
        "rank 0 crashes": ["ZeroDivisionError: division by zero",
                           "PeerError: process 0 of the group stopped with ZeroDivisionError: division by zero"],
        "rank 0 decides": ["ok 15", "ok 15"],
        "finished": ["finished=True holds=True", "finished=True holds=False"],
        "resume": ["ck/res/checkpoint.pth.tar step 1 w [0.0, 1.0, 2.0, 3.0]"] * 2,
    }
    assert refused[0] == refused[1] and refused[0].startswith("CheckpointError: --resume ck/tau/checkpoint.pth.tar "
                                                              "was trained with --tau 0.2")
    assert sorted(os.listdir(os.path.join(nodes[1], "ck"))) == ["res"]  # rank 1 claimed no run directory
    assert PeerError.exit_code == 1
