"""Image folders that survive a few unreadable files (main_imagenet.py, main_moco_mcl.py, main_lincls.py).

A file PIL cannot read (truncated, garbage, not an image) is skipped: the item is
served from the next readable image of the same class (in folder order), so the
batch keeps its shape and its labels. Each bad file is named once on stderr. The
run stops with one DatasetError when more than ``BAD_IMAGE_FRACTION`` (1 %) of the
images read so far needed a replacement, once more than ``BAD_IMAGE_GRACE`` (10)
did: a damaged or wrong folder fails fast, a stray bad JPEG in ImageNet does not
end a week of training.

The counts and the "already named" flags live in shared memory, so DataLoader
worker processes (new ones every epoch) add to the same totals and name a file
once for the run (per process of a distributed run): a process-shared lock makes
claiming a name atomic, so two workers that fail on one file at once print it
once. The read count is updated without the lock and may lose an increment now
and then; the limit is a safeguard, not an exact measure.
"""
from __future__ import annotations

import multiprocessing
import sys
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torchvision import datasets

from utils.errors import DatasetError
from utils.progress import progress

BAD_IMAGE_FRACTION = 0.01
BAD_IMAGE_GRACE = 10
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def class_ranges(
    labels: np.ndarray, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(class_start (C,), class_count (C,)) int64 of labels sorted by class."""
    labels = np.asarray(labels, dtype=np.int64)
    count = np.bincount(labels, minlength=num_classes or 0).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    return start, count


def too_many_bad(skipped: int, read: int) -> bool:
    """True when ``skipped`` of ``read`` images is past the limit (the module docstring)."""
    return skipped > BAD_IMAGE_GRACE and skipped > BAD_IMAGE_FRACTION * read


def _process_shared_lock() -> Any:
    """A lock that DataLoader workers share whatever their start method (a spawn-context lock can be
    inherited by forked workers and pickled to spawned ones; a fork-context one only the former)."""
    return multiprocessing.get_context("spawn").Lock()


class TolerantImageFolder(datasets.ImageFolder):
    """An ImageFolder that replaces an unreadable image by the next readable one of its class.

    Also gives every subclass the class-sorted index maps: ``labels`` (N,),
    ``sorted_to_index`` / ``index_to_sorted`` (stable sort by class) and ``class_start`` /
    ``class_count`` (C,) in sorted positions (identity maps for ImageFolder's own order).
    """

    def __init__(self, root: str, *args: Any, progress: bool = False, **kwargs: Any) -> None:
        """``progress``: a bar over the class folders while they are listed (on a terminal; ImageNet's
        1.28M files take minutes)."""
        self.index_progress = progress
        super().__init__(root, *args, **kwargs)
        self.labels = np.asarray(self.targets, dtype=np.int64)
        self.sorted_to_index = np.argsort(self.labels, kind="stable")
        self.index_to_sorted = np.empty_like(self.sorted_to_index)
        self.index_to_sorted[self.sorted_to_index] = np.arange(len(self.labels))
        self.class_start, self.class_count = class_ranges(self.labels, len(self.classes))
        self.named = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
        self.counts = torch.zeros(2, dtype=torch.int64).share_memory_()  # (images read, replaced)
        self.name_lock = _process_shared_lock()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a worker process being started: the lock travels; any other copy gets its own lock."""
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            state["name_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.name_lock is None:
            self.name_lock = _process_shared_lock()

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions: Any = None,
                     is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
        """ImageFolder's listing, one class folder at a time (for the progress bar); the same samples."""
        if not getattr(self, "index_progress", False):
            return super().make_dataset(directory, class_to_idx, extensions, is_valid_file, allow_empty)
        samples: list[tuple[str, int]] = []
        for name in progress(sorted(class_to_idx), len(class_to_idx), f"indexing {directory}"):
            samples += super().make_dataset(directory, {name: class_to_idx[name]}, extensions, is_valid_file,
                                            allow_empty)
        return samples

    @property
    def skipped(self) -> int:
        """Items served from a replacement so far (all processes sharing this dataset)."""
        return int(self.counts[1])

    def same_class_from(self, index: int) -> Iterator[int]:
        """``index``, then the other images of its class in folder order, wrapping around."""
        label = self.labels[index]
        start, count = int(self.class_start[label]), int(self.class_count[label])
        offset = int(self.index_to_sorted[index]) - start
        for k in range(count):
            yield int(self.sorted_to_index[start + (offset + k) % count])

    def read_image(self, index: int) -> Any:
        """The image of ``index``, or of the next readable image of its class; DatasetError past the limit."""
        self.counts[0] += 1
        for candidate in self.same_class_from(index):
            if self.named[candidate]:
                continue
            try:
                image = self.loader(self.samples[candidate][0])
            except READ_ERRORS as err:
                self._name_bad(candidate, err)
                continue
            if candidate != index:
                self._count_skip(index)
            return image
        raise DatasetError(f"no readable image in class {self.classes[self.labels[index]]!r} of {self.root}; "
                           "check or re-extract the data set")

    def _claim_name(self, index: int) -> bool:
        """Mark ``index`` as named; True for the one caller (of all processes) that marked it first."""
        with self.name_lock:
            if self.named[index]:
                return False
            self.named[index] = True
            return True

    def _name_bad(self, index: int, err: BaseException) -> None:
        if not self._claim_name(index):
            return
        reason = (str(err).splitlines() or [""])[0][:120]
        print(f"warning: skipping unreadable image {self.samples[index][0]} ({type(err).__name__}: {reason}); "
              "using another image of its class instead", file=sys.stderr, flush=True)

    def _count_skip(self, index: int) -> None:
        self.counts[1] += 1
        read, skipped = int(self.counts[0]), int(self.counts[1])
        if too_many_bad(skipped, read):
            raise DatasetError(
                f"{skipped} of the {read} images read so far from {self.root} were unreadable (more than "
                f"{BAD_IMAGE_FRACTION:.0%}, the limit); check or re-extract the data set (the files are named "
                "above)")

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = self.read_image(index)
        target: Any = self.targets[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target
