"""CIFAR-shaped data for the training engine: which arrays, which path, which loaders.

Two paths give the same batches for the same seed (same indices, crops and flips):
- ``pil`` (default, the original's): PIL transforms per image in DataLoader workers;
- ``tensor`` (the fast path): the whole uint8 set as one tensor on the training
  device, batches augmented by indexing (data.tensor_loader).

The data sets: CIFAR-100/10 (pickles), the generated one, and any image folder
(data/folder.py), whose images are square (S, S, 3) like CIFAR's but of any size S;
random crops pad by S/8 (CIFAR's 4 pixels at 32).
"""
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from data.augment import AugmentedBatchSampler, CifarTestDataset, CifarTrainDataset
from data.cifar import DATASET_STATS, load_cifar, num_classes as cifar_num_classes
from data.folder import (FolderImages, Stats, array_batches, cached_stats, channel_stats, check_same_classes,
                         decode_all, fits_in_memory, folder_splits, image_batches, open_image_folder, write_stats)
from data.samplers import MPerClassBatchSampler, SamplerControlledLoader, ShardedEvalSampler
from data.synthetic import SYNTHETIC_STATS, make_synthetic
from data.tensor_loader import TensorBatchLoader
from utils.errors import ConfigError

DATASETS = ("cifar100", "cifar10", "synthetic", "folder")
CIFAR_SIZE = 32
STATS_FILE = "normalization.json"  # in the run directory: the normalisation computed from a folder's images


@dataclass
class ArrayData:
    """A CIFAR-shaped dataset: uint8 (N, S, S, 3) images and int64 labels.

    The images are arrays in memory, or (an image folder on the PIL path) FolderImages
    sequences that decode an image when it is read.
    """

    train_images: Any
    train_labels: np.ndarray
    test_images: Any
    test_labels: np.ndarray
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    image_size: int = CIFAR_SIZE
    classes: Optional[Sequence[str]] = None  # class names, where the data set has them
    train_root: Optional[str] = None  # the folder of the training images, for an image folder

    @property
    def padding(self) -> int:
        """Zero padding of the random crops: 4 pixels at 32, S/8 in general."""
        return max(1, self.image_size // 8)


def load_arrays(dataset: str, root: str, synthetic_size: int = 5000, synthetic_classes: int = 10,
                synthetic_seed: int = 0, synthetic_test_size: Optional[int] = None,
                image_size: int = CIFAR_SIZE) -> ArrayData:
    """Read CIFAR-100/10 from ``root`` (pickle layout) or make the synthetic set (of ``image_size`` pixels).

    The synthetic test split has ``synthetic_test_size`` images (default: a fifth of the training size).
    """
    if dataset == "synthetic":
        test_size = synthetic_size // 5 if synthetic_test_size is None else synthetic_test_size
        (xtr, ytr), (xte, yte) = make_synthetic(synthetic_size, max(test_size, synthetic_classes),
                                                synthetic_classes, seed=synthetic_seed, image_size=image_size)
        return ArrayData(xtr, ytr, xte, yte, synthetic_classes, SYNTHETIC_STATS["mean"], SYNTHETIC_STATS["std"],
                         image_size)
    if dataset not in DATASET_STATS:
        raise ConfigError(f"--dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    if image_size != CIFAR_SIZE:
        raise ConfigError(f"--image-size {image_size}: {dataset} images are 32 x 32; --image-size is for "
                          "--dataset folder and synthetic")
    xtr, ytr = load_cifar(root, dataset, train=True)
    xte, yte = load_cifar(root, dataset, train=False)
    stats = DATASET_STATS[dataset]
    return ArrayData(xtr, ytr, xte, yte, cifar_num_classes(dataset), stats["mean"], stats["std"])


# ----------------------------------------------------------------------------- image folders

def open_folder_data(root: str, image_size: int) -> ArrayData:
    """An image folder (data/folder.py) with lazily decoded images; its normalisation is not known yet
    (mean and std are placeholders: :func:`folder_stats` computes them)."""
    train_dir, test_dir = folder_splits(root)
    train, test = open_image_folder(train_dir), open_image_folder(test_dir)
    check_same_classes(train, test)
    train_images, test_images = FolderImages(train, image_size), FolderImages(test, image_size)
    return ArrayData(train_images, train_images.labels, test_images, test_images.labels, len(train.classes),
                     (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), image_size, list(train.classes), os.path.abspath(train_dir))


def decode_if_it_fits(data: ArrayData, device: torch.device, processes: int, num_workers: int,
                      say: Callable[[str], None], train: bool = True) -> ArrayData:
    """The folder's images (the test split's only, without ``train``) decoded once into uint8 arrays for
    the tensor path, when they fit in memory (data.folder.fits_in_memory); ``data`` unchanged
    otherwise. ``say`` prints what was decided."""
    splits = (["train"] if train else []) + ["test"]
    nbytes = sum(getattr(data, f"{split}_images").nbytes for split in splits)
    counts = " + ".join(f"{len(getattr(data, f'{split}_labels'))} {split}" for split in splits)
    images = f"{counts} images of {data.image_size} px"
    fits, numbers = fits_in_memory(nbytes, device, processes)
    if not fits:
        say(f"--data-path tensor: the {images} would not fit in memory as one uint8 tensor ({numbers}; at most "
            f"half of it is used); using --data-path pil instead, which decodes every image when it is read")
        return data
    say(f"--data-path tensor: decoding the {images} once into one uint8 tensor ({numbers})")
    return replace(data, **{f"{split}_images": decode_all(getattr(data, f"{split}_images"), num_workers)
                            for split in splits})


def folder_stats(data: ArrayData, num_workers: int, cache_dir: Optional[str], say: Callable[[str], None],
                 write_cache: bool = True) -> Stats:
    """Per-channel (mean, std) of the training images, read from ``cache_dir``/normalization.json when
    it holds them for these images, else computed once (and written there when ``write_cache``)."""
    images = data.train_images
    key = {"train": data.train_root, "images": len(data.train_labels), "image_size": data.image_size,
           "classes": data.num_classes}
    path = os.path.join(cache_dir, STATS_FILE) if cache_dir else None
    stats = cached_stats(path, key) if path else None
    if stats is not None:
        return stats
    where = f"; cached in {path}" if path and write_cache else ""
    say(f"computing the normalisation from the {len(data.train_labels)} training images (once{where})")
    stats = channel_stats(array_batches(images) if isinstance(images, np.ndarray) else
                          image_batches(images, num_workers))
    if path and write_cache:
        write_stats(path, key, stats)
    return stats


def class_balanced_subset(data: ArrayData, per_class: int) -> ArrayData:
    """The first ``per_class`` training images of every class, in file order (the test set is kept whole).

    Deterministic and independent of the seed, so runs of different seeds and methods see the
    same images. ConfigError if a class has fewer than ``per_class`` images.
    """
    labels = data.train_labels
    counts = np.bincount(labels, minlength=data.num_classes)
    if per_class > counts.min():
        raise ConfigError(f"--train-per-class {per_class} is more than the smallest class has "
                          f"({int(counts.min())} images); lower it to at most {int(counts.min())}, or 0 for the "
                          "whole training set")
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(data.num_classes)])
    keep.sort()
    return replace(data, train_images=data.train_images[keep], train_labels=labels[keep])


def build_cifar_loaders(data: ArrayData, *, path: str, batch_size: int, eval_batch_size: int, m_per_class: int,
                        visit_all: bool, seed: int, rank: int, world_size: int, device: torch.device,
                        num_workers: int, channels_last: bool) -> Tuple[Any, Any]:
    """(train data, eval data) for the run loop.

    The train object iterates this rank's share of every global batch as
    ``(inputs, targets)`` and has set_epoch / set_start_batch / __len__.
    """
    sampler = MPerClassBatchSampler(data.train_labels, m_per_class, batch_size, seed=seed,
                                    rank=rank, world_size=world_size, visit_all=visit_all)
    test = build_cifar_eval_loader(data, path=path, eval_batch_size=eval_batch_size, rank=rank,
                                   world_size=world_size, device=device, num_workers=num_workers,
                                   channels_last=channels_last)
    if path == "tensor":
        train = TensorBatchLoader(data.train_images, data.train_labels, sampler, device, data.mean, data.std,
                                  train=True, seed=seed, channels_last=channels_last, padding=data.padding)
        return train, test
    batches = AugmentedBatchSampler(sampler, seed, image_size=data.image_size, padding=data.padding)
    train_loader = torch.utils.data.DataLoader(
        CifarTrainDataset(data.train_images, data.train_labels, data.mean, data.std, padding=data.padding),
        batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda")
    return SamplerControlledLoader(train_loader, batches), test


def build_cifar_eval_loader(data: ArrayData, *, path: str, eval_batch_size: int, rank: int, world_size: int,
                            device: torch.device, num_workers: int, channels_last: bool) -> Any:
    """Test batches ``(inputs, targets)`` of this rank's contiguous shard, unaugmented."""
    if path == "tensor":
        return TensorBatchLoader.for_eval(data.test_images, data.test_labels, eval_batch_size, device,
                                          data.mean, data.std, rank=rank, world_size=world_size,
                                          channels_last=channels_last)
    if path != "pil":
        raise ConfigError(f"unknown data path {path!r}; valid: pil, tensor")
    return torch.utils.data.DataLoader(
        CifarTestDataset(data.test_images, data.test_labels, data.mean, data.std),
        batch_size=eval_batch_size, sampler=ShardedEvalSampler(len(data.test_labels), rank, world_size),
        num_workers=num_workers, pin_memory=device.type == "cuda")
