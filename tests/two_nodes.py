"""Two processes of one group started as torchrun starts them on two nodes (RANK, WORLD_SIZE,
MASTER_ADDR/PORT), each in its own working directory (forked from the test process, whose imports they
reuse): with ``--checkpoint-dir ck`` the same path
names a different directory for each process, as without a shared filesystem."""
import os
import socket

from tests.script_helpers import start_forked

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


def two_nodes(nodes, args, env_extra=None, main=None, timeout=240):
    """Run ``main(args)`` (main_cifar.main by default) as ranks 0 and 1 of one group, rank r a forked child in
    the folder nodes[r]: [(code, out, err)]. A process still running after ``timeout`` seconds (a hang) is
    killed and the call raises."""
    if main is None:
        import main_cifar

        main = main_cifar.main
    port = free_port()
    children = []
    try:
        for rank, cwd in enumerate(nodes):
            os.makedirs(cwd, exist_ok=True)
            env = dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env_extra or {}))
            children.append(start_forked(main, list(args), env, cwd))
        return [(done.returncode, done.stdout, done.stderr) for done in (c.wait(timeout) for c in children)]
    finally:
        for child in children:
            child.kill()
