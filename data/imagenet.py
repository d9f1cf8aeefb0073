"""ImageNet-style folders with positive/negative indices for the memory-bank contrast (docs/method.md §3).

Memory is O(number of images): no per-class list of negatives (the original's
lists hold about N * (C - 1) / C indices per class, ~5 GB for ImageNet-1k).
Indices are handled in "class-sorted position" space: sorting the dataset by class
(stable) puts class c in the contiguous range [start_c, start_c + count_c). For
ImageFolder the samples are already in that order, so positions equal indices.

Negatives: a uniform draw r in [0, N - count_c) is shifted past the anchor's class
range (r += count_c when r >= start_c). That maps [0, N - count_c) one-to-one onto
the other classes' positions, so every other-class image has probability
1 / (N - count_c): the same distribution as the original's uniform choice from its
per-class negative list, with O(1) work and memory per draw.

Positives: pos_k other images of the anchor's class without replacement (with
replacement if the class has fewer than pos_k other images; a class with a single
image uses the image itself as its positives).

Randomness: in __getitem__ a generator is seeded with (seed, epoch, index), so the
indices (and the random crop/flip, drawn inside a forked torch RNG seeded alike)
are reproducible, differ per epoch, and do not depend on the DataLoader worker
that loads them. Call set_epoch(epoch) on the dataset before creating the epoch's
iterator; with persistent_workers=True the workers keep their own copy of the
dataset and would not see the new epoch, so do not use persistent workers.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch
from torchvision import transforms

from data.augment import derive_seed
from data.image_folder import TolerantImageFolder
from utils.errors import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_train_transform(image_size: int = 224) -> transforms.Compose:
    """RandomResizedCrop(image_size) + horizontal flip + ToTensor + Normalize (ImageNet stats)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def imagenet_eval_transform(image_size: int = 224, resize: int | None = None) -> transforms.Compose:
    """Resize(resize) + CenterCrop(image_size) + ToTensor + Normalize; resize defaults to
    round(image_size * 256 / 224) (256 for 224)."""
    if resize is None:
        resize = int(round(image_size * 256 / 224))
    return transforms.Compose([
        transforms.Resize(resize),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def check_image_folder(root: str, what: str = "ImageNet split") -> None:
    """DatasetError unless root is a directory holding at least one class folder."""
    if not os.path.isdir(root):
        raise DatasetError(
            f"{what} not found at {root}; expected {root}/<class name>/<image files> "
            f"(ImageNet: train/ and val/ with one folder per class)"
        )
    if not any(entry.is_dir() for entry in os.scandir(root)):
        raise DatasetError(
            f"{what} at {root} has no class folders; expected {root}/<class name>/<images>"
        )


# ---- pure sampling functions (class-sorted positions) ----------------------------------------


def sample_negatives(
    anchor_labels: np.ndarray,
    class_start: np.ndarray,
    class_count: np.ndarray,
    n_total: int,
    neg_k: int,
    generator: np.random.Generator,
) -> np.ndarray:
    """(A, neg_k) int64 class-sorted positions drawn uniformly, with replacement, outside each
    anchor's class. anchor_labels (A,); class_start/class_count (C,)."""
    anchor_labels = np.asarray(anchor_labels, dtype=np.int64)
    start = class_start[anchor_labels][:, None]
    count = class_count[anchor_labels][:, None]
    if np.any(count >= n_total):
        raise DatasetError("negatives need at least two classes, but all images share one class")
    draws = generator.integers(0, n_total - count, size=(anchor_labels.shape[0], neg_k))
    return draws + count * (draws >= start)


def sample_positives(
    anchor_positions: np.ndarray,
    anchor_labels: np.ndarray,
    class_start: np.ndarray,
    class_count: np.ndarray,
    pos_k: int,
    generator: np.random.Generator,
) -> np.ndarray:
    """(A, pos_k) int64 class-sorted positions of other images of each anchor's class.

    Without replacement when the class has >= pos_k other images, else with
    replacement; a single-image class returns the anchor itself.
    """
    anchor_positions = np.asarray(anchor_positions, dtype=np.int64)
    anchor_labels = np.asarray(anchor_labels, dtype=np.int64)
    out = np.empty((anchor_positions.shape[0], pos_k), dtype=np.int64)
    for row, (pos, label) in enumerate(zip(anchor_positions, anchor_labels)):
        start, count = int(class_start[label]), int(class_count[label])
        others = count - 1
        if others == 0:
            out[row] = pos
            continue
        draws = generator.choice(others, size=pos_k, replace=others < pos_k)
        offset = pos - start
        out[row] = start + draws + (draws >= offset)  # skip the anchor's own slot
    return out


# ---- dataset ---------------------------------------------------------------------------------


class ImageFolderWithContrastIndices(TolerantImageFolder):
    """ImageFolder whose items are (image, target, index, pos_idx (1+pos_k,), neg_idx (neg_k,)).

    pos_idx[0] is the index itself; all indices are dataset indices (torch.long). An
    unreadable image is replaced by another of its class (data.image_folder); its
    indices stay those of ``index``.
    """

    def __init__(
        self,
        root: str,
        transform: Callable[[Any], Any] | None = None,
        pos_k: int = 1,
        neg_k: int = 8192,
        seed: int = 0,
        target_transform: Callable[[int], Any] | None = None,
        deterministic_transform: bool = True,
        progress: bool = False,
    ) -> None:
        check_image_folder(root, "image folder")
        super().__init__(root, transform=transform, target_transform=target_transform, progress=progress)
        self.pos_k = int(pos_k)
        self.neg_k = int(neg_k)
        self.seed = int(seed)
        self.epoch = 0
        self.deterministic_transform = deterministic_transform
        # labels, sorted_to_index, index_to_sorted, class_start, class_count: TolerantImageFolder's.

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def contrast_indices(
        self, index: int, epoch: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(pos_idx (1 + pos_k,), neg_idx (neg_k,)) int64 dataset indices for one anchor."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch, index])
        label = self.labels[index : index + 1]
        position = self.index_to_sorted[index : index + 1]
        pos = sample_positives(position, label, self.class_start, self.class_count, self.pos_k, rng)
        neg = sample_negatives(
            label, self.class_start, self.class_count, len(self.labels), self.neg_k, rng
        )
        pos_idx = np.concatenate([[index], self.sorted_to_index[pos[0]]])
        return pos_idx, self.sorted_to_index[neg[0]]

    def _load_image(self, index: int) -> Any:
        image = self.read_image(index)
        if self.transform is None:
            return image
        if not self.deterministic_transform:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, self.epoch, index, 1))
            return self.transform(image)

    def __getitem__(self, index: int) -> tuple[Any, Any, int, torch.Tensor, torch.Tensor]:
        target: Any = int(self.labels[index])
        image = self._load_image(index)
        if self.target_transform is not None:
            target = self.target_transform(target)
        pos_idx, neg_idx = self.contrast_indices(index)
        return image, target, index, torch.from_numpy(pos_idx), torch.from_numpy(neg_idx)
