#!/usr/bin/env python
"""The subprocesses of scripts/gpu_check.py's checks, one per command:

    python scripts/gpu_check_workers.py two --rank R --port P --script main_cifar --work-dir W -- FLAGS...
    python scripts/gpu_check_workers.py nccl --port P --work-dir W
    python scripts/gpu_check_workers.py syncs --work-dir W

``two``: one of two processes of a gloo group on one device; trains ``--script`` with FLAGS, then
compares a digest of every tensor of the trained state with the other rank. ``nccl``: a one-rank
NCCL group; the collectives, then main_cifar.py under compiled DDP. ``syncs``: counts the host
synchronisations of fast-path steps. Each prints its verdict as one ``RESULT {json}`` line
(rank 0 only for ``two``), which gpu_check.py reads.
"""
import argparse
import collections
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence

from gpu_check import MAX_SYNCS_PER_STEP, ROOT, CheckFailed, Context, check_run_dir, cifar_flags, flat_tensors

def _result_line(status: str, reason: str) -> None:
    print("RESULT " + json.dumps({"status": status, "reason": reason}), flush=True)


def run_script_body(script: str, argv: List[str], ctx: Any) -> int:
    """``script``'s training in this process, in the group ``ctx`` describes (the scripts' own set-up
    after their launcher: flags, run directory, data, model, DDP, the run loop)."""
    module = importlib.import_module(script)
    args = module.parse_args(argv)
    if script in ("main_cifar", "main_imagenet"):
        from utils.script_setup import SupervisedEntry

        return SupervisedEntry(module.SCRIPT, module.build_parser, module.train, module.evaluate_checkpoint)(args, ctx)
    if script == "main_moco_mcl":
        return module.train(args, ctx, ctx.world_size)
    return module.run(args, ctx, ctx.world_size)


def capture_run_loop() -> Dict[str, Any]:
    """After the next RunLoop.fit of this process: {"loop": that RunLoop}."""
    import utils.loop

    box: Dict[str, Any] = {}
    fit = utils.loop.RunLoop.fit

    def capturing_fit(self):
        box["loop"] = self
        return fit(self)

    utils.loop.RunLoop.fit = capturing_fit
    return box


def state_digests(loop: Any, skip: Sequence[str] = ()) -> Dict[str, str]:
    """sha256 of every tensor of the trained state: weights, buffers (banks, queues), optimizer, contrast;
    leaving out the keys that end with one of ``skip``."""
    state: Dict[str, Any] = {"model": loop.method.model_state(), "optimizer": loop.optimizer.state_dict()["state"]}
    contrast = getattr(loop.method, "contrast", None)
    if contrast is not None and hasattr(contrast, "state_dict"):
        state["contrast"] = contrast.state_dict()
    import torch

    digests = {}
    for key, tensor in flat_tensors(state).items():
        if key.endswith(tuple(skip)):
            continue
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        digests[key] = hashlib.sha256(data).hexdigest()
    return digests


def worker_two(args: argparse.Namespace) -> int:
    """One of two processes of a gloo group on the same device: train, then compare the state across ranks."""
    import torch
    import torch.distributed as dist
    from utils import distributed as du

    on_cuda = args.argv[args.argv.index("--device") + 1] == "cuda"
    device = torch.device("cuda", 0) if on_cuda else torch.device("cpu")  # both processes share GPU 0
    if on_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=2)
    ctx = du.DistContext(rank=args.rank, world_size=2, local_rank=args.rank, device=device, distributed=True)
    box = capture_run_loop()
    try:
        code = run_script_body(args.script, args.argv, ctx)
        loop = box["loop"]
        # MoCo's BatchNorm statistics stay per rank after the last step (shuffled BN; DDP sends rank 0's
        # before each step and rank 0 saves), the supervised scripts send rank 0's before evaluating.
        skip = ("running_mean", "running_var") if args.script == "main_moco_mcl" else ()
        digests = state_digests(loop, skip)
        gathered = [None, None]
        dist.all_gather_object(gathered, digests)
        differ = sorted(k for k in gathered[0] if gathered[0][k] != gathered[1].get(k))
        if args.rank == 0:
            what = describe_two(loop, args.script, len(digests))
            if code != 0:
                _result_line("FAIL", f"exit code {code}")
            elif differ:
                _result_line("FAIL", f"{len(differ)} of {len(digests)} tensors differ across ranks, e.g. {differ[0]}")
            else:
                _result_line("PASS", f"{what}, on {device}")
        del loop, box
        return code
    finally:
        import gc

        gc.collect()
        dist.destroy_process_group()


def describe_two(loop: Any, script: str, count: int) -> str:
    if script == "main_moco_mcl":
        model = loop.method.model
        shuffled = "shuffled BN" if model.world_size == 2 else "NO shuffled BN"
        return (f"{shuffled}; queues, pointers, weights and optimizer equal across ranks ({count} tensors; "
                "BatchNorm running statistics are per rank, rank 0 saves)")
    if script == "main_imagenet":
        return f"memory banks, weights and optimizer equal across ranks ({count} tensors)"
    import torch.nn as nn

    sync = any(isinstance(m, nn.SyncBatchNorm) for m in loop.method.model.modules())
    return f"weights{' (SyncBatchNorm)' if sync else ''} and optimizer equal across ranks ({count} tensors)"


def worker_nccl(args: argparse.Namespace) -> int:
    """A one-rank NCCL group: the collectives of utils/distributed.py and models/moco.py, then main_cifar.py's
    training with DDP, --sync-bn and --compile through the script's own set-up."""
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from models.moco import batch_shuffle_ddp, batch_unshuffle_ddp
    from utils import distributed as du

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    init = dict(backend="nccl", init_method=f"tcp://127.0.0.1:{args.port}", rank=0, world_size=1)
    try:
        dist.init_process_group(**init, device_id=device)
    except TypeError:  # torch < 2.3 has no device_id
        dist.init_process_group(**init)
    ctx = du.DistContext(rank=0, world_size=1, local_rank=0, device=device, distributed=True)
    box = capture_run_loop()
    try:
        x = torch.randn(6, 3, device=device, requires_grad=True)
        gathered = du._GatherWithGrad.apply(x)  # the helpers skip a one-rank group; call the collective itself
        gathered.square().sum().backward()
        if not torch.allclose(x.grad, 2 * x.detach()):
            raise CheckFailed("all_gather_grad's gradient is wrong")
        total = torch.ones(3, device=device)
        dist.all_reduce(total)
        dist.broadcast(total, src=0)
        box_obj = [{"seed": 1}]
        dist.broadcast_object_list(box_obj, src=0)
        shuffled, undo = batch_shuffle_ddp(x.detach(), 0, 1)
        if not torch.equal(batch_unshuffle_ddp(shuffled, undo, 0, 1), x.detach()):
            raise CheckFailed("batch_unshuffle_ddp does not undo batch_shuffle_ddp")
        dist.barrier()
        run_dir = os.path.join(args.work_dir, "runs", "nccl")
        ctx_args = cifar_flags(Context("cuda", args.work_dir, False, 0.0)) + [
            "--checkpoint-dir", os.path.dirname(run_dir), "--run-name", "nccl", "--sync-bn", "--compile", "--fast"]
        code = run_script_body("main_cifar", ctx_args, ctx)
        loop = box["loop"]
        ddp = isinstance(getattr(loop.method.ddp_model, "_orig_mod", None), nn.parallel.DistributedDataParallel)
        sync = any(isinstance(m, nn.SyncBatchNorm) for m in loop.method.model.modules())
        if code != 0 or not ddp or not sync:
            raise CheckFailed(f"main_cifar: exit code {code}, compiled DDP {ddp}, SyncBatchNorm {sync}")
        words = check_run_dir(run_dir)
        _result_line("PASS", "all_gather (with gradient), all_reduce, broadcast, broadcast_object_list, barrier, "
                             f"shuffle/unshuffle; main_cifar --fast --sync-bn --compile under compiled DDP: {words}")
        del loop, box
        return 0
    except CheckFailed as err:
        _result_line("FAIL", str(err))
        return 1
    finally:
        import gc

        gc.collect()
        dist.destroy_process_group()


def worker_syncs(args: argparse.Namespace) -> int:
    """Count the host synchronisations of fast-path steps (scripts/benchmark.py's fast mode, which is
    main_cifar.py --fast's data, step and run loop) with torch.cuda.set_sync_debug_mode("warn")."""
    import torch
    from data.pipeline import load_arrays
    from utils import distributed as du
    from utils.script_setup import configure_determinism

    spec = importlib.util.spec_from_file_location("benchmark_script", os.path.join(ROOT, "scripts", "benchmark.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bargs = bench.build_parser().parse_args(["--device", "cuda"])
    ctx = du.setup_distributed(device="cuda")
    configure_determinism(False, ctx.device)
    data = load_arrays("synthetic", bargs.data, bargs.synthetic_size, bargs.synthetic_classes, bargs.seed)
    step = bench.fast_step_fn(bargs, data, ctx)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    steps = 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = collections.Counter(f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}" for w in syncs)
    per_step = len(syncs) / steps
    places = ", ".join(f"{place} x{n / steps:g}" for place, n in where.most_common(5)) or "none"
    status = "FAIL" if per_step > MAX_SYNCS_PER_STEP else "PASS"
    _result_line(status, f"{per_step:g} per step ({len(syncs)} in {steps} steps of resnet32 x2, batch 128; "
                         f"per step at: {places})")
    return 0


WORKERS = {"two": worker_two, "nccl": worker_nccl, "syncs": worker_syncs}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("worker", choices=sorted(WORKERS), help="which subprocess to be")
    p.add_argument("--rank", type=int, default=0, help="two: this process's rank (0 or 1)")
    p.add_argument("--port", type=int, default=0, help="two, nccl: the TCP port of the group's rendezvous")
    p.add_argument("--script", default="", help="two: the script to train (main_cifar, main_imagenet, ...)")
    p.add_argument("--work-dir", default="", help="gpu_check.py's work directory (runs/ and images/)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """The script's flags come after ``--`` (kept whole: argparse would match them against ours)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    args.argv = argv[cut + 1:]
    return WORKERS[args.worker](args)


if __name__ == "__main__":
    sys.exit(main())
