"""torch.distributed helpers: set-up for torchrun or the original's flags, gathers, reductions.

Two ways to start several processes:
- ``torchrun --nproc_per_node=K script.py ...``: the environment (RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR/PORT) describes the group;
- the original's ``--multiprocessing-distributed --dist-url URL --world-size W --rank R
  --gpu-ids 0,1``: utils.launch starts one process per listed GPU and each calls
  :func:`setup_distributed` with explicit values.
Backend: NCCL when the device is CUDA, gloo on CPU.
"""
import datetime
import gc
import os
import pickle
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from utils.errors import ConfigError, PeerError, UserError

DEVICES = ("auto", "cpu", "cuda")
# How long a collective waits for the slowest rank: well above the work rank 0 does alone
# (checkpoint writes to slow storage); NCCL's own default, 10 minutes, is not.
DEFAULT_TIMEOUT_MINUTES = 60.0
# The original's --dist-url default: a placeholder (a multicast address), not a reachable one.
ORIGINAL_DIST_URL = "tcp://224.66.41.62:23456"


@dataclass
class DistContext:
    """Where this process runs and which part of the group it is."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0



def resolve_device(device: str, local_rank: int = 0, gpu_ids: Optional[str] = None,
                   gpu_flag: str = "--gpu-ids") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cuda`` without CUDA is a ConfigError.

    With ``gpu_ids`` ("0,2": indices within CUDA_VISIBLE_DEVICES), process ``local_rank``
    uses the local_rank-th listed GPU; a local rank past the end of the list is a
    ConfigError naming ``gpu_flag`` (two processes on one GPU would fail later in NCCL).
    Without a list, process ``local_rank`` uses GPU ``local_rank``.
    """
    if device not in DEVICES:
        raise ConfigError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but CUDA is not available here; use --device cpu or auto")
    ids = parse_gpu_ids(gpu_ids)
    if ids and local_rank >= len(ids):
        raise ConfigError(f"{gpu_flag} {gpu_ids} lists {len(ids)} GPU(s) but this is local process {local_rank} of "
                          f"its node; list one GPU per process of the node")
    index = ids[local_rank] if ids else local_rank
    if index >= torch.cuda.device_count():
        raise ConfigError(f"GPU {index} does not exist: {torch.cuda.device_count()} visible here (ids are indices "
                          f"within CUDA_VISIBLE_DEVICES); list existing ones in {gpu_flag} (or CUDA_VISIBLE_DEVICES), "
                          "or start fewer processes")
    return torch.device("cuda", index)


def parse_gpu_ids(gpu_ids: Optional[str]) -> List[int]:
    """"0,1,2" -> [0, 1, 2]; empty or None -> []."""
    if not gpu_ids:
        return []
    try:
        return [int(x) for x in str(gpu_ids).split(",") if x.strip() != ""]
    except ValueError:
        raise ConfigError(f"--gpu-ids {gpu_ids!r} must be a comma-separated list of integers, e.g. 0,1") from None


def environment_int(name: str) -> Optional[int]:
    """The integer in environment variable ``name``; None when it is unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def fill_from_environment(world_size: int, rank: int) -> Tuple[int, int, bool]:
    """(world size, rank, whether the rank came from the environment).

    Explicit values win; one left at -1 takes WORLD_SIZE / RANK from the environment
    (set by torchrun, or by hand for the original's ``--dist-url env://``).
    """
    env_world, env_rank = environment_int("WORLD_SIZE"), environment_int("RANK")
    if world_size == -1 and env_world is not None:
        world_size = env_world
    rank_from_env = rank == -1 and env_rank is not None
    if rank_from_env:
        rank = env_rank
    return world_size, rank, rank_from_env


def would_use_cuda(device: str) -> bool:
    return device != "cpu" and torch.cuda.is_available()


def launcher_local_rank(device: str, gpu_ids: Optional[str], rank_from_env: bool) -> int:
    """This process's index on its node when the flags do not give it.

    LOCAL_RANK when the launcher sets it (torchrun does). Otherwise 0 where that is
    unambiguous: ranks given by flags (the original's one process per node),
    LOCAL_WORLD_SIZE=1, or at most one GPU to choose from. A launcher that sets RANK
    but not LOCAL_RANK while several GPUs are visible is a ConfigError: every rank
    would take GPU 0.
    """
    local = environment_int("LOCAL_RANK")
    if local is not None:
        return local
    if not rank_from_env or environment_int("LOCAL_WORLD_SIZE") == 1 or not would_use_cuda(device):
        return 0
    choices = len(parse_gpu_ids(gpu_ids)) if gpu_ids else torch.cuda.device_count()
    if choices > 1:
        raise ConfigError(f"RANK and WORLD_SIZE are set but LOCAL_RANK is not, and {choices} GPUs are visible: "
                          f"which one this process uses is unknown; start the processes with torchrun (it sets "
                          f"LOCAL_RANK), set LOCAL_RANK (or LOCAL_WORLD_SIZE=1), or give each process one GPU "
                          f"through CUDA_VISIBLE_DEVICES")
    return 0


def use_device(device: torch.device) -> None:
    """Make ``device`` the current CUDA device, so that nothing (pinned-memory threads,
    NCCL, cuDNN handles) opens a context on GPU 0 by default."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def setup_distributed(
    device: str = "auto",
    gpu_ids: Optional[str] = None,
    dist_backend: Optional[str] = None,
    dist_url: Optional[str] = None,
    world_size: int = -1,
    rank: int = -1,
    local_rank: Optional[int] = None,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
    gpu_flag: str = "--gpu-ids",
) -> DistContext:
    """Join the process group if there is one and pick this process's device.

    ``world_size`` / ``rank`` left at -1 come from WORLD_SIZE / RANK (torchrun);
    ``local_rank`` None from LOCAL_RANK (see :func:`launcher_local_rank`). A world
    size of at most 1 is a single process. ``dist_url`` None means ``env://``.
    Collectives wait ``timeout_minutes`` for the slowest rank before failing.
    """
    world_size, rank, rank_from_env = fill_from_environment(world_size, rank)
    if world_size <= 1:
        dev = resolve_device(device, 0, gpu_ids, gpu_flag)
        use_device(dev)
        return DistContext(device=dev)
    if not 0 <= rank < world_size:
        raise ConfigError(f"a process group of {world_size} needs this process's rank in 0..{world_size - 1} "
                          f"(got {rank}): pass --rank or set RANK")
    if local_rank is None:
        local_rank = launcher_local_rank(device, gpu_ids, rank_from_env)
    dev = resolve_device(device, local_rank, gpu_ids, gpu_flag)
    use_device(dev)
    backend = dist_backend or ("nccl" if dev.type == "cuda" else "gloo")
    if backend == "nccl" and dev.type != "cuda":
        raise ConfigError("--dist-backend nccl needs CUDA; use gloo on CPU")
    if not dist.is_initialized():
        options: Dict[str, Any] = {}
        if backend == "nccl":  # NCCL never has to guess this process's GPU
            options["device_id"] = dev
        dist.init_process_group(backend=backend, init_method=dist_url or "env://", world_size=world_size,
                                rank=rank, timeout=datetime.timedelta(minutes=timeout_minutes), **options)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, distributed=True)


def cleanup(wait_for_all: bool = False, error: Optional[BaseException] = None) -> None:
    """Leave the process group; ``wait_for_all`` first waits for every rank (after a
    normal end), since gloo may abort a rank whose peer tears the group down first.

    DistributedDataParallel wrappers must be gone before the group is destroyed: one
    that outlives it (still referenced, or only by a reference cycle) is torn down at
    interpreter exit, and that aborted about one exit in ten with SIGABRT ("terminate
    called without an active exception") in a 2-process gloo run. So the frames of
    ``error``'s traceback (which hold the trainer) are cleared and garbage is collected first.
    """
    if dist.is_available() and dist.is_initialized():
        if error is not None:
            traceback.clear_frames(error.__traceback__)
        gc.collect()
        if wait_for_all:
            barrier()
        dist.destroy_process_group()


def run_then_leave(body: Callable[[], int]) -> int:
    """``body()``, then leave the process group: after every rank on a normal end, at once
    (no barrier: the other ranks may never reach it) when ``body`` raises."""
    try:
        code = body()
    except BaseException as error:
        cleanup(error=error)
        raise
    cleanup(wait_for_all=True)
    return code


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank; under NCCL on this process's GPU (named, so NCCL does not guess)."""
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks.

    Every rank computes the same loss on the gathered batch, so the gradient of a
    rank's own slice is the sum over ranks of that slice's gradient; DDP then
    averages parameter gradients over ranks, which yields exactly the gradient of
    one process on the whole batch.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.batch = tensor.size(0)
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def all_gather_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (W*B, ...) in rank order, differentiable. Identity without a group."""
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def all_gather_nograd(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (W*B, ...) in rank order, no gradient."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(M_r, ...) on rank r -> (sum of M_r, ...) in rank order; the M_r may differ (eval shards)."""
    if world_size() == 1:
        return tensor
    sizes = all_gather_nograd(torch.tensor([tensor.size(0)], device=tensor.device)).tolist()
    if max(sizes) == 0:
        return tensor
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.size(0)] = tensor
    parts = all_gather_nograd(padded).split(max(sizes))
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; returns the tensor."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, in place; returns the tensor."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics, memory banks) to every rank."""
    if world_size() > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src=src)


@torch.no_grad()
def broadcast_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s whole state_dict (parameters and buffers) to every rank."""
    if world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------- deciding together

def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` without a group)."""
    if world_size() == 1:
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def portable_error(error: Exception, source: int) -> UserError:
    """``error`` as another rank can raise it: the user error itself when it survives pickling,
    else a PeerError naming it (its traceback stays with the process of rank ``source``)."""
    if isinstance(error, UserError):
        try:
            return pickle.loads(pickle.dumps(error))
        except Exception:
            copy = PeerError(str(error))
            copy.exit_code = error.exit_code
            return copy
    first_line = (str(error).strip().splitlines() or [""])[0]
    return PeerError(f"process {source} of the group stopped with {type(error).__name__}: {first_line}")


def decided_on_main(decide: Callable[[], Any]) -> Any:
    """``decide()`` run on rank 0 alone, its result given to every rank (pickled: CPU objects).

    An exception it raises is raised on every rank -- on rank 0 itself, on the others the
    same user error (or a PeerError naming it) -- so no rank waits in a collective for a rank
    that has stopped.
    """
    if world_size() == 1:
        return decide()
    outcome: Any = None
    error: Optional[Exception] = None
    if rank() == 0:
        try:
            outcome = ("ok", decide())
        except Exception as err:
            error = err
            outcome = ("error", portable_error(err, 0))
    outcome = broadcast_object(outcome)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def on_every_rank(step: Callable[[], Any]) -> Any:
    """``step()`` on every rank, then every rank learns whether all succeeded: when any rank
    raised, every rank raises (its own error, or the first failing rank's), none waits."""
    try:
        value, error = step(), None
    except Exception as err:
        value, error = None, err
    reports = all_gather_object(None if error is None else portable_error(error, rank()))
    if error is not None:
        raise error
    for report in reports:
        if report is not None:
            raise report
    return value


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    return any(all_gather_object(bool(flag)))
