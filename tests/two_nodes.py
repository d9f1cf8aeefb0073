"""Two processes of one group started as torchrun starts them on two nodes (RANK, WORLD_SIZE,
MASTER_ADDR/PORT), each in its own working directory: with ``--checkpoint-dir ck`` the same path
names a different directory for each process, as without a shared filesystem."""
import os
import socket
import subprocess
import sys

from tests import ROOT  # noqa: E402

# 1 epoch of 3 steps of MCL(x2), deterministic on CPU; the global batch of 16 is split over the ranks.
RUN = ["--dataset", "synthetic", "--synthetic-size", "160", "--synthetic-classes", "8", "--batch-size", "16",
       "--m-per-class", "2", "--epochs", "1", "--max-train-batches", "3", "--max-eval-batches", "1",
       "--eval-batch-size", "16", "--num-workers", "0", "--no-progress", "--device", "cpu", "--deterministic",
       "--arch", "resnet32", "--number-net", "2", "--alpha", "0.1", "--gamma", "1.", "--beta", "0.1",
       "--lam", "1.", "--save-every-steps", "0", "--checkpoint-dir", "ck", "--run-name", "r"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(nodes, args, env_extra=None, script="main_cifar.py", timeout=240):
    """Run ``script args`` as ranks 0 and 1 of one group, rank r in the folder nodes[r]: [(code, out, err)].
    A process still running after ``timeout`` seconds (a hang) is killed and the call raises."""
    port = free_port()
    procs = []
    for rank, cwd in enumerate(nodes):
        os.makedirs(cwd, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0",
                   LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env_extra or {}))
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return results
