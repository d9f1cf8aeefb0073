"""Any image-folder data set, CIFAR-style (main_cifar.py ``--dataset folder --data DIR``).

Layout: ``DIR/train/<class>/<images>`` and ``DIR/val/`` (or ``DIR/test/``) with the same
class folders. Every image is decoded (an unreadable one is replaced by another of its class,
data/image_folder.py), converted to RGB, resized so that its shorter side is the image size
and center-cropped to a square: ``square_image``, an (S, S, 3) uint8 array. From there on it
is treated like a CIFAR image (data/augment.py).

The pixels are held either way the CIFAR script knows (data/pipeline.py):

- the PIL path: :class:`FolderImages` decodes an image each time it is read, in the
  DataLoader workers;
- the tensor path: :func:`decode_all` decodes every image once into one uint8 array, when
  :func:`fits_in_memory` says that it fits.

Both give the same bytes. The normalisation is the per-channel mean and standard deviation
of the training images as decoded (:func:`channel_stats`, exact integer sums, so every
process and every rerun gets the same numbers), cached in a JSON file (:func:`cached_stats`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torchvision.transforms import functional as TF

from data.image_folder import TolerantImageFolder
from utils.errors import DatasetError

TEST_SPLITS = ("val", "test")
LAYOUT = "DIR/train/<class>/<images> and DIR/val/<class>/<images> (or DIR/test/), the same class folders"
MEMORY_FRACTION = 0.5  # of the free memory, at most, for the decoded images (the networks need the rest)
DECODE_BATCH = 256
Stats = Tuple[Tuple[float, float, float], Tuple[float, float, float]]  # (mean, std) per channel, in [0, 1]


def folder_splits(root: str) -> Tuple[str, str]:
    """(train folder, test folder: val/ or else test/) of ``root``; DatasetError naming the layout."""
    if not os.path.isdir(root):
        raise DatasetError(f"--data {root} does not exist; --dataset folder expects {LAYOUT}")
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        raise DatasetError(f"--data {root} has no train/ folder; --dataset folder expects {LAYOUT}")
    for split in TEST_SPLITS:
        if os.path.isdir(os.path.join(root, split)):
            return train, os.path.join(root, split)
    raise DatasetError(f"--data {root} has no val/ or test/ folder; --dataset folder expects {LAYOUT}")


def open_image_folder(path: str) -> TolerantImageFolder:
    """``path`` as an ImageFolder that replaces unreadable images; DatasetError when it has no images."""
    try:
        return TolerantImageFolder(path)
    except (FileNotFoundError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or ["no image files"])[0]
        raise DatasetError(f"{path}: {first}; --dataset folder expects {LAYOUT}") from None


def check_same_classes(train: TolerantImageFolder, test: TolerantImageFolder) -> None:
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))[:3]
        only_test = sorted(set(test.classes) - set(train.classes))[:3]
        raise DatasetError(f"{train.root} has {len(train.classes)} class folders and {test.root} {len(test.classes)}, "
                           f"with different names (only in train: {only_train}, only in the test split: "
                           f"{only_test}); both need the same class folders")


def square_image(image: Any, size: int) -> np.ndarray:
    """A PIL image as (size, size, 3) uint8: RGB, shorter side resized to ``size``, center crop."""
    image = image.convert("RGB")
    if image.size != (size, size):
        image = TF.center_crop(TF.resize(image, size), [size, size])
    return np.asarray(image, dtype=np.uint8)


class FolderImages:
    """The images of an image folder as a sequence of (S, S, 3) uint8 arrays, decoded when read.

    ``images[i]`` decodes image i (of ``indices``, default all); ``images[index_array]`` is
    the subset those positions select (still lazy). Works as a Dataset for DataLoader workers.
    """

    def __init__(self, folder: TolerantImageFolder, image_size: int, indices: Optional[np.ndarray] = None) -> None:
        self.folder = folder
        self.image_size = int(image_size)
        self.indices = np.arange(len(folder.samples)) if indices is None else np.asarray(indices, dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 class of every image."""
        return self.folder.labels[self.indices]

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (len(self.indices), self.image_size, self.image_size, 3)

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded images."""
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (np.ndarray, list, slice)):
            return FolderImages(self.folder, self.image_size, self.indices[index])
        return square_image(self.folder.read_image(int(self.indices[index])), self.image_size)


def _stack(images: List[np.ndarray]) -> np.ndarray:
    return np.stack(images)


def image_batches(images: FolderImages, num_workers: int) -> Iterable[np.ndarray]:
    """(B, S, S, 3) uint8 batches of ``images`` in order, decoded by ``num_workers`` DataLoader workers."""
    loader = torch.utils.data.DataLoader(images, batch_size=DECODE_BATCH, num_workers=num_workers,
                                         collate_fn=_stack)
    return iter(loader)


def decode_all(images: FolderImages, num_workers: int) -> np.ndarray:
    """Every image of ``images`` decoded into one (N, S, S, 3) uint8 array."""
    out = np.empty(images.shape, dtype=np.uint8)
    start = 0
    for batch in image_batches(images, num_workers):
        out[start:start + len(batch)] = batch
        start += len(batch)
    return out


def channel_stats(batches: Iterable[np.ndarray]) -> Stats:
    """Per-channel (mean, std) in [0, 1] of uint8 (B, H, W, 3) batches: exact integer sums, then float64."""
    total = np.zeros(3, dtype=np.int64)
    squares = np.zeros(3, dtype=np.int64)
    count = 0
    for batch in batches:
        pixels = np.asarray(batch).reshape(-1, 3).astype(np.int64)
        total += pixels.sum(axis=0)
        squares += (pixels * pixels).sum(axis=0)
        count += len(pixels)
    if count == 0:
        raise DatasetError("no training images to compute the normalisation from")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    std = np.where(std > 0, std, 255.0)  # a constant channel: leave its scale alone
    return tuple(float(v) for v in mean / 255), tuple(float(v) for v in std / 255)  # type: ignore[return-value]


def array_batches(images: np.ndarray) -> Iterable[np.ndarray]:
    for start in range(0, len(images), DECODE_BATCH * 16):
        yield images[start:start + DECODE_BATCH * 16]


def cached_stats(path: str, key: dict) -> Optional[Stats]:
    """The (mean, std) a cache file holds for ``key`` (what they were computed from), or None."""
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(cache, dict) or cache.get("key") != key:
        return None
    return tuple(cache["mean"]), tuple(cache["std"])  # type: ignore[return-value]


def write_stats(path: str, key: dict, stats: Stats) -> None:
    """Write the cache file atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"key": key, "mean": list(stats[0]), "std": list(stats[1])}, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- memory

def available_host_memory() -> Optional[int]:
    """Bytes of RAM available to new allocations (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fits_in_memory(nbytes: int, device: torch.device, processes: int = 1) -> Tuple[bool, str]:
    """(whether ``nbytes`` of decoded images fit, the numbers that decided it).

    They fit when every process of this node can hold them in at most MEMORY_FRACTION of
    the RAM available now and, on CUDA, in at most that fraction of the device's free memory.
    """
    host = available_host_memory()
    words = [f"{byte_size(nbytes)} per process"]
    fits = True
    if host is not None:
        fits = nbytes * processes <= MEMORY_FRACTION * host
        words.append(f"{byte_size(host)} of RAM available" + (f" to {processes} processes" if processes > 1 else ""))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fits = fits and nbytes <= MEMORY_FRACTION * free
        words.append(f"{byte_size(free)} free on {device}")
    return fits, ", ".join(words)


def byte_size(nbytes: float) -> str:
    """e.g. "12.3 MiB", "4.0 GiB"."""
    if nbytes < 2 ** 30:
        return f"{nbytes / 2 ** 20:.1f} MiB"
    return f"{nbytes / 2 ** 30:.1f} GiB"
