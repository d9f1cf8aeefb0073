"""MoCo with a cohort of N networks (self-supervised MCL, docs/method.md §4).

One class, :class:`MoCoMCL`, holds N query encoders, N momentum key encoders and
one queue of negative keys per network. It computes normalised queries and keys;
the losses live in :mod:`losses.moco` and read ``model.queue`` before the training
step calls :meth:`MoCoMCL.enqueue`.

Encoders are torchvision ImageNet networks whose ``fc`` outputs ``dim`` values.
With ``mlp=True`` the fc becomes the MoCo v2 head ``Linear(d, d) -> ReLU ->
Linear(d, dim)`` (the original's ``--mlp`` set an attribute with a dotted name and
so never changed the network; docs/method.md §9).

Shuffled BN: under DDP the key batch is shuffled across ranks before the key
encoders and restored afterwards, so that BatchNorm statistics of a key batch do
not come from the same images as the query batch. In a single process BatchNorm
sees the whole batch at once, where a permutation changes nothing, so the
shuffle is skipped (``world_size == 1``).

Queue size: ``enqueue`` wraps around the end of the queue, so K need not be a
multiple of the global batch (the original asserted that). A global batch larger
than K is refused by :func:`check_queue_size` at start-up.
"""
from typing import Callable, List, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tv_models

from utils.distributed import all_gather_nograd
from utils.errors import ConfigError

# torchvision ImageNet networks whose classifier is an ``fc`` Linear layer.
ENCODER_FAMILIES = ("resnet", "resnext", "wide_resnet")


def encoder_names() -> List[str]:
    """torchvision architectures usable as MoCo encoders (they end in ``fc``)."""
    names = tv_models.list_models(module=tv_models)
    return sorted(n for n in names if n.startswith(ENCODER_FAMILIES))


class Float32Linear(nn.Linear):
    """An ``nn.Linear`` that computes in float32 even inside an autocast region (same state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


class Float32Sequential(nn.Sequential):
    """An ``nn.Sequential`` whose layers compute in float32 even inside an autocast region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def float32_linear(linear: nn.Linear) -> Float32Linear:
    """``linear``'s weights in a :class:`Float32Linear` (built without drawing random numbers)."""
    out = nn.utils.skip_init(Float32Linear, linear.in_features, linear.out_features, bias=linear.bias is not None)
    out.load_state_dict(linear.state_dict())
    return out


def build_encoder(arch: str, dim: int, mlp: bool) -> nn.Module:
    """torchvision ``arch`` with ``fc`` -> ``dim`` outputs (MoCo v2 MLP head if ``mlp``).

    The ``fc`` head (projection) computes in float32 even under ``--amp``: its output is
    L2-normalised and compared with the queue at temperature 0.07, where bfloat16 rounding
    would blur the logits. The backbone runs in the autocast precision.
    """
    if arch not in encoder_names():
        raise ConfigError(f"unknown encoder architecture {arch!r}; choose one of: {', '.join(encoder_names())}")
    encoder = tv_models.get_model(arch, weights=None, num_classes=dim)
    if mlp:
        hidden = encoder.fc.in_features
        encoder.fc = Float32Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), encoder.fc)
    else:
        encoder.fc = float32_linear(encoder.fc)
    return encoder


def check_queue_size(queue_size: int, global_batch: int) -> None:
    """ConfigError unless one global batch of keys fits in the queue."""
    if global_batch > queue_size:
        raise ConfigError(
            f"--moco-k {queue_size} is smaller than the global batch {global_batch}; "
            "use a larger --moco-k or a smaller --batch-size"
        )


@torch.no_grad()
def gather_nograd(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) of every rank along dim 0 -> (world_size * B, ...)."""
    if world_size == 1:
        return x
    return all_gather_nograd(x)


@torch.no_grad()
def batch_shuffle_ddp(x: torch.Tensor, rank: int, world_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Give this rank a random slice of the global batch.

    x: (B, ...) local batch, equal B on every rank. Returns the shuffled local
    batch (B, ...) and the global inverse permutation (world_size * B,) needed by
    :func:`batch_unshuffle_ddp`. Rank 0 draws the permutation and broadcasts it.
    """
    x_all = gather_nograd(x, world_size)
    perm = torch.randperm(x_all.size(0), device=x.device)
    dist.broadcast(perm, src=0)
    idx_unshuffle = torch.argsort(perm)
    idx_this = perm.view(world_size, -1)[rank]
    return x_all[idx_this], idx_unshuffle


@torch.no_grad()
def batch_unshuffle_ddp(x: torch.Tensor, idx_unshuffle: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Undo :func:`batch_shuffle_ddp`: x (B, ...) shuffled -> (B, ...) in the original order."""
    x_all = gather_nograd(x, world_size)
    idx_this = idx_unshuffle.view(world_size, -1)[rank]
    return x_all[idx_this]


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, m: float) -> None:
    """param_k <- m * param_k + (1 - m) * param_q for every parameter (buffers untouched)."""
    for p_k, p_q in zip(key_encoder.parameters(), query_encoder.parameters()):
        p_k.mul_(m).add_(p_q.detach(), alpha=1.0 - m)


@torch.no_grad()
def write_into_queue(queue: torch.Tensor, ptr: Union[int, torch.Tensor], keys: torch.Tensor
                     ) -> Union[int, torch.Tensor]:
    """Overwrite columns ptr, ptr+1, ... (mod K) of queue (D, K) with keys (M, D), M <= K.

    Returns the new pointer (ptr + M) mod K. A 0-dim device tensor ``ptr`` never waits for the
    device (the training step reads no pointer on the host).
    """
    size = queue.size(1)
    cols = (ptr + torch.arange(keys.size(0), device=queue.device)) % size
    queue[:, cols] = keys.t().to(queue.dtype)
    return (ptr + keys.size(0)) % size


class MoCoMCL(nn.Module):
    """N query encoders, N momentum key encoders and N queues.

    Args:
        arch: torchvision architecture of every encoder (see :func:`encoder_names`).
        number_net: N, networks in the cohort.
        dim: embedding size (``--moco-dim``).
        queue_size: K, negatives per queue (``--moco-k``).
        momentum: m of the key encoders (``--moco-m``).
        mlp: MoCo v2 two-layer head instead of a linear fc.
        rank, world_size: this process in the DDP group; shuffled BN needs them.

    Buffers: ``queue`` (N, dim, K), columns L2-normalised; ``queue_ptr`` (N,) long.
    """

    def __init__(
        self,
        arch: str,
        number_net: int = 2,
        dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        mlp: bool = False,
        rank: int = 0,
        world_size: int = 1,
        encoder_factory: Callable[[str, int, bool], nn.Module] = build_encoder,
    ) -> None:
        super().__init__()
        if number_net < 1:
            raise ConfigError(f"--number-net must be at least 1, got {number_net}")
        self.number_net = number_net
        self.queue_size = queue_size
        self.momentum = momentum
        self.rank = rank
        self.world_size = world_size
        self.encoders_q = nn.ModuleList(encoder_factory(arch, dim, mlp) for _ in range(number_net))
        self.encoders_k = nn.ModuleList(encoder_factory(arch, dim, mlp) for _ in range(number_net))
        for enc_q, enc_k in zip(self.encoders_q, self.encoders_k):
            enc_k.load_state_dict(enc_q.state_dict())
            enc_k.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(number_net, dim, queue_size), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(number_net, dtype=torch.long))

    @torch.no_grad()
    def momentum_update_key_encoders(self) -> None:
        """Move every key encoder towards its query encoder."""
        for enc_q, enc_k in zip(self.encoders_q, self.encoders_k):
            momentum_update(enc_k, enc_q, self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: Sequence[torch.Tensor]) -> None:
        """Gather each network's keys (B, D) over ranks and write them into its queue."""
        for n, k in enumerate(keys):
            k_all = gather_nograd(k.detach(), self.world_size)
            ptr = write_into_queue(self.queue[n], self.queue_ptr[n], k_all)
            self.queue_ptr[n] = ptr

    @torch.no_grad()
    def compute_keys(self, im_k: torch.Tensor) -> List[torch.Tensor]:
        """Normalised keys (B, D) of every key encoder, with shuffled BN under DDP."""
        shuffled = self.world_size > 1
        if shuffled:
            im_k, idx_unshuffle = batch_shuffle_ddp(im_k, self.rank, self.world_size)
        keys = [F.normalize(enc(im_k), dim=1) for enc in self.encoders_k]
        if shuffled:
            keys = [batch_unshuffle_ddp(k, idx_unshuffle, self.rank, self.world_size) for k in keys]
        return keys

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """im_q, im_k (B, 3, H, W) -> (queries, keys): two lists of N normalised (B, D).

        Updates the key encoders by momentum first, as MoCo does.
        """
        queries = [F.normalize(enc(im_q), dim=1) for enc in self.encoders_q]
        self.momentum_update_key_encoders()
        keys = self.compute_keys(im_k)
        return queries, keys


def pooled_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Globally pooled backbone feature (B, F) of a torchvision encoder: the input of its ``fc``."""
    captured: List[torch.Tensor] = []
    handle = encoder.fc.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        encoder(images)
    finally:
        handle.remove()
    return captured[0]
