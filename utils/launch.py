"""Starting the processes of the four scripts: one launcher for all.

Three ways: the original's ``--multiprocessing-distributed`` (main_moco_mcl.py and
main_lincls.py: one spawned process per GPU of ``--gpu-ids``, or per visible GPU),
``torchrun`` (the environment describes the group), or one process (CPU or one GPU).
:func:`launch` runs ``worker(local_rank, args, nprocs)`` in every process and returns
the exit code; :func:`run_in_group` makes a worker that joins the group, picks its
device, runs the script's body and leaves the group.
"""
import argparse
import os
import shlex
import signal
import sys
import time
from multiprocessing import connection as mp_connection
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.multiprocessing as mp

from utils import distributed as du
from utils.errors import ConfigError, UserError, user_message

Worker = Callable[[int, argparse.Namespace, int], Optional[int]]


# ----------------------------------------------------------------------------- one process

def processes_per_node(args: argparse.Namespace) -> int:
    """--multiprocessing-distributed: one process per listed (or visible) GPU; 1 otherwise."""
    if not getattr(args, "multiprocessing_distributed", False):
        return 1
    ids = du.parse_gpu_ids(args.gpu_ids)
    if ids:
        return len(ids)
    count = torch.cuda.device_count() if args.device != "cpu" else 0
    return max(count, 1)


def setup_process(args: argparse.Namespace, local_rank: int, nprocs: int) -> du.DistContext:
    """Join the process group the flags (or torchrun) describe; pick the device.

    Explicit --world-size / --rank win; the environment (WORLD_SIZE, RANK, LOCAL_RANK)
    fills what they leave at -1. Scripts without the original's process-group flags
    (main_cifar.py, main_imagenet.py) join torchrun's group, or run as one process.
    """
    timeout = getattr(args, "dist_timeout", du.DEFAULT_TIMEOUT_MINUTES)
    if not hasattr(args, "dist_url"):
        return du.setup_distributed(device=args.device, timeout_minutes=timeout)
    if args.multiprocessing_distributed:
        nodes, node_rank, from_env = du.fill_from_environment(args.world_size, args.rank)
        nodes = max(nodes, 1)
        if nodes > 1 and node_rank == -1:
            raise ConfigError(f"--world-size {nodes} nodes: give this node's index with --rank (or RANK)")
        return du.setup_distributed(args.device, args.gpu_ids, args.dist_backend, group_url(args.dist_url, from_env),
                                    world_size=nodes * nprocs, rank=max(node_rank, 0) * nprocs + local_rank,
                                    local_rank=local_rank, timeout_minutes=timeout)
    gpu_ids, gpu_flag = (str(args.gpu), "--gpu") if args.gpu is not None else (args.gpu_ids, "--gpu-ids")
    world, rank, from_env = du.fill_from_environment(args.world_size, args.rank)
    if world <= 1:
        refuse_one_process_on_several_gpus(args)
    # One process per node unless a launcher says otherwise (torchrun's LOCAL_RANK).
    return du.setup_distributed(args.device, gpu_ids, args.dist_backend, group_url(args.dist_url, from_env), world,
                                rank, local_rank=None, timeout_minutes=timeout, gpu_flag=gpu_flag)


def group_url(dist_url: str, rank_from_env: bool) -> str:
    """``--dist-url``; but ``env://`` when a launcher's environment gave the rank and the URL
    is still the original's placeholder default (a multicast address nobody can reach)."""
    return "env://" if rank_from_env and dist_url == du.ORIGINAL_DIST_URL else dist_url


def refuse_one_process_on_several_gpus(args: argparse.Namespace) -> None:
    """ConfigError when --gpu-ids lists several GPUs for a single process (without
    --multiprocessing-distributed it would train on the first with the whole batch)."""
    ids = du.parse_gpu_ids(args.gpu_ids)
    if args.gpu is None and len(ids) > 1 and du.would_use_cuda(args.device) and torch.cuda.device_count() > 1:
        raise ConfigError(f"--gpu-ids {args.gpu_ids} lists {len(ids)} GPUs but without --multiprocessing-distributed "
                          f"one process trains on the first; add --multiprocessing-distributed --world-size 1 "
                          f"--rank 0 --dist-url tcp://127.0.0.1:23456 (one process per GPU), or pick one GPU with "
                          f"--gpu")


def visible_devices_for(gpu_id: str) -> str:
    """The CUDA_VISIBLE_DEVICES value for --gpu-id: the ids as given, or, when the environment
    already limits the visible GPUs (a cluster scheduler's choice), the entries its ids index."""
    current = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    wanted = [x.strip() for x in gpu_id.split(",") if x.strip()]
    if not current or not all(x.isdigit() for x in wanted):
        return gpu_id
    missing = [x for x in wanted if int(x) >= len(current)]
    if missing:
        raise ConfigError(f"--gpu-id {gpu_id}: CUDA_VISIBLE_DEVICES={','.join(current)} makes {len(current)} GPU(s) "
                          f"visible and --gpu-id indexes them (0..{len(current) - 1}), so {missing[0]} does not exist")
    return ",".join(current[int(x)] for x in wanted)


def refuse_data_parallel(gpu_id: Optional[str], device: str, script: str, argv: Sequence[str]) -> None:
    """ConfigError when --gpu-id (the original's DataParallel GPUs) lists several visible GPUs
    for one process, with the torchrun command that trains on all of them.

    Call after CUDA_VISIBLE_DEVICES is set from --gpu-id; torchrun's own processes pass.
    """
    listed = [x for x in (gpu_id or "").split(",") if x.strip()]
    in_group = (du.environment_int("WORLD_SIZE") or 1) > 1
    if len(listed) < 2 or in_group or not du.would_use_cuda(device) or torch.cuda.device_count() < 2:
        return
    command = " ".join(shlex.quote(word) for word in ["torchrun", f"--nproc_per_node={len(listed)}", script, *argv])
    raise ConfigError(f"--gpu-id {gpu_id} lists {len(listed)} GPUs but one process trains on one GPU (DataParallel "
                      f"is not used here); to train on all of them (same global --batch-size), run: {command}")


def processes_on_this_node(args: argparse.Namespace, ctx: du.DistContext, nprocs: int) -> int:
    """How many processes share this node's --batch-size and --workers."""
    if not ctx.distributed:
        return 1
    if args.multiprocessing_distributed:
        return nprocs
    local_world = du.environment_int("LOCAL_WORLD_SIZE")
    if local_world is not None:
        return local_world
    # --world-size given without --multiprocessing-distributed: the original's one process per node
    return 1 if getattr(args, "world_size", -1) != -1 else ctx.world_size


def limit_cpu_threads(ctx: du.DistContext, node_procs: int) -> None:
    """Several CPU processes on one node share its cores instead of oversubscribing them."""
    if ctx.device.type == "cpu" and node_procs > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // node_procs))


def per_process(total: int, nprocs: int, flag: str) -> int:
    """This process's share of a per-node total (``flag`` names it in the error)."""
    if total < nprocs:
        raise ConfigError(f"{flag} {total} is smaller than the {nprocs} processes of this node; raise it to at least "
                          f"{nprocs}, or start fewer processes")
    return total // nprocs


def node_share(args: argparse.Namespace, ctx: du.DistContext, nprocs: int) -> Tuple[int, int]:
    """(batch, workers) of this process: --batch-size and --workers split over the node's processes.

    Also limits the CPU threads of each process when several share the node.
    """
    node_procs = processes_on_this_node(args, ctx, nprocs)
    limit_cpu_threads(ctx, node_procs)
    if args.threads > 0:  # an explicit --threads wins
        torch.set_num_threads(args.threads)
    batch = per_process(args.batch_size, node_procs, "--batch-size")
    workers = (args.workers + node_procs - 1) // node_procs
    return batch, workers


# ----------------------------------------------------------------------------- several processes

def _worker_entry(local_rank: int, worker: Worker, args: argparse.Namespace, nprocs: int, codes) -> None:
    """Body of a spawned process: exit codes go through ``codes``; user errors are one line."""
    try:
        codes[local_rank] = worker(local_rank, args, nprocs) or 0
    except UserError as err:
        print(f"error: {user_message(err)}", file=sys.stderr, flush=True)
        codes[local_rank] = err.exit_code
        sys.exit(err.exit_code)


STOP_GRACE_S = 10.0  # after a worker died: how long the others get to exit on SIGTERM before SIGKILL


def first_failure(processes: List[Any]) -> Optional[Tuple[int, int]]:
    """(local rank, exit code) of the first process to exit non-zero, or None when all exit 0.

    Among processes found dead together, one killed by a signal comes first: the others
    usually failed because it did (a broken process group).
    """
    pending = {proc.sentinel: rank for rank, proc in enumerate(processes)}
    while pending:
        failed = []
        for sentinel in mp_connection.wait(list(pending)):
            rank = pending.pop(sentinel)
            processes[rank].join()
            if processes[rank].exitcode != 0:
                failed.append((rank, processes[rank].exitcode))
        if failed:
            return min(failed, key=lambda f: (f[1] >= 0, f[0]))
    return None


def stop_all(processes: List[Any], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every live process; SIGKILL those still alive ``grace_s`` seconds later."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in processes:
        proc.join(max(deadline - time.monotonic(), 0))
    for proc in processes:
        if proc.is_alive():
            proc.kill()
        proc.join()


def describe_exit(rank: int, code: int) -> str:
    """``the process of local rank 1 was killed by SIGKILL`` / ``... exited with code 1``."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the process of local rank {rank} was killed by {name}"
    return f"the process of local rank {rank} exited with code {code}"


def launch(worker: Worker, args: argparse.Namespace) -> int:
    """Run ``worker(local_rank, args, nprocs)`` in this process or in one spawned process per GPU.

    Returns the exit code (the largest of the workers'). A SIGTERM or SIGINT that reaches
    this parent process is passed on to the workers as SIGTERM: they finish their step,
    rank 0 saves, and the parent exits 130 after SIGINT, 0 after SIGTERM. (A Ctrl-C in a
    terminal reaches the workers directly too; Python runs their SIGINT handler first, so
    the forwarded SIGTERM does not count as a second Ctrl-C.) A worker that dies without
    saying why (a signal, an exit code without an error line) is named in one line on
    stderr, with its exit code or signal; the others are stopped.
    """
    nprocs = processes_per_node(args)
    if nprocs == 1 and not getattr(args, "multiprocessing_distributed", False):
        return worker(0, args, 1) or 0
    codes = mp.get_context("spawn").Array("i", [0] * nprocs)
    context = mp.start_processes(_worker_entry, args=(worker, args, nprocs, codes), nprocs=nprocs,
                                 join=False, start_method="spawn")
    received: List[int] = []

    def forward(signum, _frame):
        received.append(signum)
        for proc in context.processes:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        failure = first_failure(context.processes)
        if failure is not None:
            stop_all(context.processes)
        while not context.join():
            pass
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as err:
        # A process that died first (above) usually made the others fail (a broken process group):
        # name that one; otherwise the one join reports (it raised: exit code 1).
        failure = failure or (err.error_index, getattr(err, "exit_code", 1))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    code = max(codes[:])
    if failure is not None:
        rank, exit_code = failure
        if codes[rank] == 0:  # it died without its own error line
            print(f"error: {describe_exit(rank, exit_code)}; the other processes were stopped", file=sys.stderr,
                  flush=True)
        return max(exit_code if exit_code > 0 else 1, code)
    return 130 if signal.SIGINT in received and code == 0 else code


def run_in_group(body: Callable[[argparse.Namespace, du.DistContext, int], int]) -> Worker:
    """A worker that joins the group, runs ``body(args, ctx, nprocs)`` and always leaves the group.

    ``body`` must be a module-level function (spawned processes pickle the worker).
    """
    return _GroupWorker(body)


class _GroupWorker:
    """Picklable worker (a closure is not) for :func:`run_in_group`."""

    def __init__(self, body: Callable[[argparse.Namespace, du.DistContext, int], int]) -> None:
        self.body = body

    def __call__(self, local_rank: int, args: argparse.Namespace, nprocs: int) -> int:
        ctx = setup_process(args, local_rank, nprocs)
        return du.run_then_leave(lambda: self.body(args, ctx, nprocs))
