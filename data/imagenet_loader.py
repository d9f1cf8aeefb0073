"""ImageNet-layout loaders for main_imagenet.py: sharded, seeded, resumable mid-epoch.

Training order: a permutation of the training set drawn from a generator seeded
with (seed, epoch), cut into global batches of ``batch_size`` (the original's
shuffled DataLoader, last partial batch kept); every process takes its contiguous
share of each global batch. The order is therefore a pure function of (seed,
epoch), the same for any number of processes or DataLoader workers, and a resumed
run skips exactly the batches already done (``set_start_batch``). Crops, flips and
the contrast indices are seeded per (seed, epoch, index) by the dataset
(data.imagenet.ImageFolderWithContrastIndices).
"""
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torchvision import datasets

from data.imagenet import ImageFolderWithContrastIndices, imagenet_eval_transform, imagenet_train_transform
from data.samplers import ShardedEvalSampler
from utils.errors import ConfigError, DatasetError

LAYOUT = "<data>/train/<class>/<images> and <data>/val/<class>/<images> (one folder per class, same names)"


def split_dir(root: str, split: str) -> str:
    """``root/split``; DatasetError naming the expected layout when it is missing or empty."""
    path = os.path.join(root, split)
    if not os.path.isdir(root):
        raise DatasetError(f"--data {root} does not exist; expected {LAYOUT}")
    if not os.path.isdir(path):
        raise DatasetError(f"--data {root} has no {split}/ folder; expected {LAYOUT}")
    if not any(entry.is_dir() for entry in os.scandir(path)):
        raise DatasetError(f"{path} has no class folders; expected {LAYOUT}")
    return path


def open_folder(factory, path: str, **kwargs: Any):
    """Build an ImageFolder-like dataset, turning torchvision's 'no images' errors into DatasetError."""
    try:
        return factory(path, **kwargs)
    except FileNotFoundError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else "no image files"
        raise DatasetError(f"{path}: {first_line}; expected {LAYOUT}") from None


def check_same_classes(train_classes: List[str], val_classes: List[str], root: str) -> None:
    if list(train_classes) != list(val_classes):
        only_train = sorted(set(train_classes) - set(val_classes))[:3]
        only_val = sorted(set(val_classes) - set(train_classes))[:3]
        raise DatasetError(
            f"{root}: train/ has {len(train_classes)} classes and val/ has {len(val_classes)} with different "
            f"names (e.g. only in train: {only_train}, only in val: {only_val}); val/ must use the train "
            f"class folders (for ImageNet, sort the validation images into class folders first)")


class EpochShuffleBatchSampler:
    """Yields this process's dataset indices of every global batch of an epoch.

    n: training-set size; batch_size: the GLOBAL batch (divisible by world_size).
    One process keeps the last partial batch (the original's DataLoader). With W
    processes the last partial batch is cut to a multiple of W (dropped if smaller
    than W), so every process gets the same number of images in every step.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be positive (got {batch_size})")
        if batch_size % world_size:
            raise ConfigError(f"--batch-size {batch_size} is not divisible by the number of processes "
                              f"{world_size}; use a multiple of {world_size}")
        if n < world_size:
            raise ConfigError(f"{n} training images cannot be shared by {world_size} processes")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.start_batch = 0
        self._cache: Optional[Tuple[int, np.ndarray]] = None

    def permutation(self, epoch: Optional[int] = None) -> np.ndarray:
        """(n,) int64: the epoch's order of the dataset indices."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._cache[1]

    @property
    def num_batches(self) -> int:
        """Global batches in a whole epoch."""
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.world_size else 0)

    def global_batch(self, k: int) -> np.ndarray:
        """Indices of global batch k of the current epoch (cut to a multiple of world_size)."""
        batch = self.permutation()[k * self.batch_size:(k + 1) * self.batch_size]
        return batch[:len(batch) - len(batch) % self.world_size]

    def __iter__(self) -> Iterator[List[int]]:
        for k in range(self.start_batch, self.num_batches):
            batch = self.global_batch(k)
            share = len(batch) // self.world_size
            yield batch[self.rank * share:(self.rank + 1) * share].tolist()

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a change of epoch restarts at its first batch."""
        if int(epoch) != self.epoch:
            self.start_batch = 0
        self.epoch = int(epoch)

    def set_start_batch(self, start_batch: int) -> None:
        """Skip the first ``start_batch`` global batches of the current epoch."""
        if not 0 <= int(start_batch) <= self.num_batches:
            raise ConfigError(f"cannot resume at batch {start_batch}: an epoch has {self.num_batches} batches "
                              f"(were --batch-size or the training set changed?)")
        self.start_batch = int(start_batch)


class ImageNetTrainData:
    """The engine's training data: iterates (images, targets, indices, pos_idx, neg_idx) batches."""

    def __init__(self, dataset: ImageFolderWithContrastIndices, sampler: EpochShuffleBatchSampler,
                 num_workers: int, pin_memory: bool) -> None:
        self.dataset = dataset
        self.sampler = sampler
        # Not persistent: workers must copy the dataset after set_epoch to see the new epoch.
        self.loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                                  pin_memory=pin_memory)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def set_start_batch(self, start_batch: int) -> None:
        self.sampler.set_start_batch(start_batch)


@dataclass
class TrainSetInfo:
    """What the run needs to know about the training set."""

    n_data: int
    num_classes: int
    classes: List[str]
    class_counts: List[int]


def build_train_data(root: str, *, image_size: int, batch_size: int, pos_k: int, neg_k: int, seed: int,
                     rank: int, world_size: int, num_workers: int, device: torch.device
                     ) -> Tuple[ImageNetTrainData, TrainSetInfo]:
    """The training loader over ``root/train`` and a description of the set."""
    dataset = open_folder(ImageFolderWithContrastIndices, split_dir(root, "train"),
                          transform=imagenet_train_transform(image_size), pos_k=pos_k, neg_k=neg_k, seed=seed)
    sampler = EpochShuffleBatchSampler(len(dataset), batch_size, seed, rank, world_size)
    info = TrainSetInfo(n_data=len(dataset), num_classes=len(dataset.classes), classes=list(dataset.classes),
                        class_counts=[int(c) for c in dataset.class_count])
    return ImageNetTrainData(dataset, sampler, num_workers, device.type == "cuda"), info


def build_val_loader(root: str, *, image_size: int, batch_size: int, rank: int, world_size: int,
                     num_workers: int, device: torch.device) -> Tuple[torch.utils.data.DataLoader, List[str]]:
    """(loader over this process's shard of ``root/val``, class names); each image counted once overall."""
    dataset = open_folder(datasets.ImageFolder, split_dir(root, "val"), transform=imagenet_eval_transform(image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                         sampler=ShardedEvalSampler(len(dataset), rank, world_size),
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    return loader, list(dataset.classes)
