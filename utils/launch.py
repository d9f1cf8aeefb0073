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
import signal
import sys
import time
from multiprocessing import connection as mp_connection
from typing import Any, Callable, List, Optional, Tuple

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

    Scripts without the original's process-group flags (main_cifar.py, main_imagenet.py)
    join torchrun's group, or run as one process.
    """
    if not hasattr(args, "dist_url"):
        return du.setup_distributed(device=args.device)
    if args.multiprocessing_distributed:
        nodes = max(args.world_size, 1)
        node_rank = max(args.rank, 0)
        return du.setup_distributed(args.device, args.gpu_ids, args.dist_backend, args.dist_url,
                                    world_size=nodes * nprocs, rank=node_rank * nprocs + local_rank,
                                    local_rank=local_rank)
    gpu_ids = str(args.gpu) if args.gpu is not None else args.gpu_ids
    rank = args.rank
    if args.dist_url == "env://" and rank == -1:
        rank = int(os.environ.get("RANK", "0"))
    # One process per node here (torchrun's LOCAL_RANK, if any, takes precedence).
    return du.setup_distributed(args.device, gpu_ids, args.dist_backend, args.dist_url, args.world_size, rank,
                                local_rank=0)


def processes_on_this_node(args: argparse.Namespace, ctx: du.DistContext, nprocs: int) -> int:
    """How many processes share this node's --batch-size and --workers."""
    if not ctx.distributed:
        return 1
    if args.multiprocessing_distributed:
        return nprocs
    return int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))


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
