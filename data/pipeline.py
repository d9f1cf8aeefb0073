"""CIFAR-shaped data for the training engine: which arrays, which path, which loaders.

Two paths give the same batches for the same seed (same indices, crops and flips):
- ``pil`` (default, the original's): PIL transforms per image in DataLoader workers;
- ``tensor`` (the fast path): the whole uint8 set as one tensor on the training
  device, batches augmented by indexing (data.tensor_loader).
"""
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import torch

from data.augment import AugmentedBatchSampler, CifarTestDataset, CifarTrainDataset
from data.cifar import DATASET_STATS, load_cifar, num_classes as cifar_num_classes
from data.samplers import MPerClassBatchSampler, SamplerControlledLoader, ShardedEvalSampler
from data.synthetic import SYNTHETIC_STATS, make_synthetic
from data.tensor_loader import TensorBatchLoader
from utils.errors import ConfigError

DATASETS = ("cifar100", "cifar10", "synthetic")


@dataclass
class ArrayData:
    """A CIFAR-shaped dataset in memory: uint8 (N, 32, 32, 3) images and int64 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


def load_arrays(dataset: str, root: str, synthetic_size: int = 5000, synthetic_classes: int = 10,
                synthetic_seed: int = 0, synthetic_test_size: Optional[int] = None) -> ArrayData:
    """Read CIFAR-100/10 from ``root`` (pickle layout) or make the synthetic set.

    The synthetic test split has ``synthetic_test_size`` images (default: a fifth of the training size).
    """
    if dataset == "synthetic":
        test_size = synthetic_size // 5 if synthetic_test_size is None else synthetic_test_size
        (xtr, ytr), (xte, yte) = make_synthetic(synthetic_size, max(test_size, synthetic_classes),
                                                synthetic_classes, seed=synthetic_seed)
        return ArrayData(xtr, ytr, xte, yte, synthetic_classes, SYNTHETIC_STATS["mean"], SYNTHETIC_STATS["std"])
    if dataset not in DATASET_STATS:
        raise ConfigError(f"--dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    xtr, ytr = load_cifar(root, dataset, train=True)
    xte, yte = load_cifar(root, dataset, train=False)
    stats = DATASET_STATS[dataset]
    return ArrayData(xtr, ytr, xte, yte, cifar_num_classes(dataset), stats["mean"], stats["std"])


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
    return ArrayData(data.train_images[keep], labels[keep], data.test_images, data.test_labels,
                     data.num_classes, data.mean, data.std)


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
                                  train=True, seed=seed, channels_last=channels_last)
        return train, test
    batches = AugmentedBatchSampler(sampler, seed)
    train_loader = torch.utils.data.DataLoader(
        CifarTrainDataset(data.train_images, data.train_labels, data.mean, data.std),
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
