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
from typing import Any, List, Tuple

import torch

from data.image_folder import TolerantImageFolder
from data.imagenet import ImageFolderWithContrastIndices, imagenet_eval_transform, imagenet_train_transform
from data.samplers import EpochShuffleBatchSampler, SamplerControlledLoader, ShardedEvalSampler
from utils.errors import DatasetError

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


class ImageNetTrainData(SamplerControlledLoader):
    """The run loop's training data: (images, targets, indices, pos_idx, neg_idx) batches; the
    epoch also reseeds the dataset's draw of positives and negatives."""

    def __init__(self, dataset: ImageFolderWithContrastIndices, sampler: EpochShuffleBatchSampler,
                 num_workers: int, pin_memory: bool) -> None:
        # Not persistent: workers must copy the dataset after set_epoch to see the new epoch.
        super().__init__(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                                     pin_memory=pin_memory), sampler)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)


@dataclass
class TrainSetInfo:
    """What the run needs to know about the training set."""

    n_data: int
    num_classes: int
    classes: List[str]
    class_counts: List[int]


def build_train_data(root: str, *, image_size: int, batch_size: int, pos_k: int, neg_k: int, seed: int,
                     rank: int, world_size: int, num_workers: int, device: torch.device, progress: bool = False
                     ) -> Tuple[ImageNetTrainData, TrainSetInfo]:
    """The training loader over ``root/train`` and a description of the set (``progress``: a bar while the
    class folders are listed)."""
    dataset = open_folder(ImageFolderWithContrastIndices, split_dir(root, "train"),
                          transform=imagenet_train_transform(image_size), pos_k=pos_k, neg_k=neg_k, seed=seed,
                          progress=progress)
    sampler = EpochShuffleBatchSampler(len(dataset), batch_size, seed, rank, world_size)
    info = TrainSetInfo(n_data=len(dataset), num_classes=len(dataset.classes), classes=list(dataset.classes),
                        class_counts=[int(c) for c in dataset.class_count])
    return ImageNetTrainData(dataset, sampler, num_workers, device.type == "cuda"), info


def build_val_loader(root: str, *, image_size: int, batch_size: int, rank: int, world_size: int,
                     num_workers: int, device: torch.device) -> Tuple[torch.utils.data.DataLoader, List[str]]:
    """(loader over this process's shard of ``root/val``, class names); each image counted once overall."""
    dataset = open_folder(TolerantImageFolder, split_dir(root, "val"), transform=imagenet_eval_transform(image_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                         sampler=ShardedEvalSampler(len(dataset), rank, world_size),
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    return loader, list(dataset.classes)
