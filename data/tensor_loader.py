"""Fast CIFAR loader: the whole uint8 set as one tensor on the device, batches made by indexing.

For training it walks the same MPerClassBatchSampler and draws the same
augment_params as the PIL path (AugmentedBatchSampler + CifarTrainDataset), so
both give the same batches bit for bit in float32. Batches are produced in the
caller's thread, so the sampler's start batch plus the batches consumed is exactly
where a resumed run must start.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from data.augment import augment_batch, augment_params, normalize_batch
from data.samplers import ForwardsSamplerState, MPerClassBatchSampler, ShardedEvalSampler, rank_slice


def needs_pinning(tensor: torch.Tensor, device: torch.device) -> bool:
    """True for a CPU tensor bound for a CUDA device: staged in pinned memory, its copy need not
    block. A tensor already on a GPU is never pinned (pin_memory refuses it)."""
    return device.type == "cuda" and tensor.device.type == "cpu"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``, copied without blocking the host (through pinned memory from the CPU
    to a GPU; the caching host allocator keeps the pinned copy alive until the transfer ends)."""
    if needs_pinning(tensor, device):
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _images_on_device(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images (N, H, W, 3) from a numpy array or a tensor on any device -> on ``device``."""
    if isinstance(images, np.ndarray):
        images = np.ascontiguousarray(images)
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {tensor.dtype}")
    return to_device(tensor, device)


def _labels_on_device(labels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """int64 labels (N,) from a numpy array, a list or a tensor on any device -> on ``device``."""
    if torch.is_tensor(labels):
        return to_device(labels.to(torch.int64), device)
    return to_device(torch.as_tensor(np.asarray(labels, dtype=np.int64)), device)


class TensorBatchLoader(ForwardsSamplerState):
    """Iterates (inputs (b, 3, H, W) out_dtype, targets (b,) int64), both on `device`.

    train=True: batch_sampler is an MPerClassBatchSampler; crops and flips come from
    augment_params(seed, epoch, batch index) on the global batch, sliced per rank.
    train=False: batch_sampler is any iterable of index lists (see for_eval); no
    augmentation.
    """

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_sampler: MPerClassBatchSampler | Iterable[Sequence[int]],
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        seed: int = 0,
        channels_last: bool = False,
        out_dtype: torch.dtype = torch.float32,
        padding: int = 4,
    ) -> None:
        self.device = torch.device(device)
        self.images = _images_on_device(images, self.device)
        self.labels = _labels_on_device(labels, self.device)
        self.batch_sampler = batch_sampler
        self.mean = tuple(mean)
        self.std = tuple(std)
        # On the device once, so that normalising a batch copies nothing from the host.
        self._mean_t = to_device(torch.tensor(self.mean, dtype=torch.float32), self.device)
        self._std_t = to_device(torch.tensor(self.std, dtype=torch.float32), self.device)
        self.train = train
        self.seed = int(seed)
        self.channels_last = channels_last
        self.out_dtype = out_dtype
        self.padding = padding

    @classmethod
    def for_eval(
        cls,
        images: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        batch_size: int,
        device: torch.device | str,
        mean: Sequence[float],
        std: Sequence[float],
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        out_dtype: torch.dtype = torch.float32,
    ) -> "TensorBatchLoader":
        """Sequential batches over this rank's contiguous shard (all of it when world_size=1)."""
        shard = ShardedEvalSampler(len(labels), rank, world_size)
        batches = torch.utils.data.BatchSampler(shard, batch_size, drop_last=False)
        return cls(images, labels, batches, device, mean, std, train=False,
                   channels_last=channels_last, out_dtype=out_dtype)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._train_batches() if self.train else self._eval_batches()

    def _index_tensor(self, indices: Sequence[int]) -> torch.Tensor:
        return to_device(torch.as_tensor(indices, dtype=torch.long), self.device)

    def _train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self.batch_sampler
        local = rank_slice(sampler.batch_size, sampler.rank, sampler.world_size)
        for batch_index, indices in sampler.indexed_batches():
            offsets, flips = augment_params(
                self.seed, sampler.epoch, batch_index, sampler.batch_size, self.padding
            )
            # Indices, crop offsets and flips of the batch in one host-to-device copy: (b, 4) int64.
            params = self._index_tensor(
                torch.cat([torch.as_tensor(indices, dtype=torch.long)[:, None], offsets[local],
                           flips[local, None].long()], dim=1)
            )
            index = params[:, 0]
            inputs = augment_batch(
                self.images[index], params[:, 1:3], params[:, 3], self._mean_t, self._std_t,
                self.out_dtype, self.channels_last, self.padding,
            )
            yield inputs, self.labels[index]

    def _eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices in self.batch_sampler:
            index = self._index_tensor(list(indices))
            inputs = normalize_batch(
                self.images[index], self._mean_t, self._std_t, self.out_dtype, self.channels_last
            )
            yield inputs, self.labels[index]
