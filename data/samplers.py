"""Batch samplers whose output is a pure function of (seed, epoch, batch index).

MPerClassBatchSampler reproduces the original's MPerClassSampler (with
length_before_new_iter = len(labels)): every global batch holds batch_size // m
distinct classes with m images each. All ranks compute the same global batch from
a NumPy generator seeded with (seed, epoch) and keep their contiguous slice, so a
run split over any number of processes (or DataLoader workers) sees the same
global batches, and a resumed run (set_start_batch) continues bitwise-exactly.

Resume protocol: record {"epoch": e, "start_batch": batches already consumed in
epoch e}; on resume call load_state_dict(that). set_epoch(e) keeps the start
batch when e is the epoch already set (so load_state_dict followed by
set_epoch(same epoch) is safe) and resets it to 0 when the epoch changes.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from utils.errors import ConfigError


def rank_slice(global_batch_size: int, rank: int, world_size: int) -> slice:
    """Slice [rank*b, (rank+1)*b) of a global batch, b = global_batch_size // world_size."""
    per_rank = global_batch_size // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def smallest_m(batch_size: int, num_classes: int) -> int:
    """The smallest images-per-class that divides ``batch_size`` and fills it from ``num_classes`` classes."""
    low = -(-batch_size // max(num_classes, 1))
    return next(m for m in range(low, batch_size + 1) if batch_size % m == 0)


def _as_label_array(labels: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels, dtype=np.int64).reshape(-1)


def _choose_positions(rng: np.random.Generator, n: np.ndarray, m: int) -> np.ndarray:
    """Per count n[...], m positions in [0, n): distinct if n >= m, else with replacement.

    Returns (*n.shape, m) int64. Distinct draws use sequential insertion: draw r in
    [0, n - j) and step it past the already chosen positions in ascending order, which
    gives a uniformly random ordered sample without replacement, vectorised over n.
    """
    out = np.empty(n.shape + (m,), dtype=np.int64)
    small = n < m
    for j in range(m):
        high = np.where(small, n, n - j)
        r = rng.integers(0, high)
        if j:
            chosen = np.sort(out[..., :j], axis=-1)
            for t in range(j):
                r += (r >= chosen[..., t]) & ~small
        out[..., j] = r
    return out


class ForwardsSamplerState:
    """Passes the resume controls to the wrapped ``self.batch_sampler`` (set_epoch, set_start_batch, and
    state_dict / load_state_dict where the sampler has them)."""

    batch_sampler: Any

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def set_start_batch(self, start_batch: int) -> None:
        self.batch_sampler.set_start_batch(start_batch)

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)



class SamplerControlledLoader(ForwardsSamplerState):
    """A DataLoader whose epoch and start batch are set through its resumable batch sampler.

    What the run loop iterates: ``len`` is the number of batches left in the epoch.
    """

    def __init__(self, loader: "torch.utils.data.DataLoader", batch_sampler: Any) -> None:
        self.loader = loader
        self.batch_sampler = batch_sampler

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.batch_sampler)

class MPerClassBatchSampler:
    """Yields, per global batch, this rank's list of dataset indices.

    labels: (N,) class of every dataset index. m: images per class in a batch.
    batch_size: the GLOBAL batch size (divisible by m and by world_size).
    length: images per epoch before rounding down to batches (default N).
    visit_all: instead of independent draws, consume per-class shuffled queues m at
    a time so every image is seen at most once per epoch (see _visit_all_plan).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        m: int,
        batch_size: int,
        seed: int = 0,
        length: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        visit_all: bool = False,
    ) -> None:
        self.labels = _as_label_array(labels)
        self.m = int(m)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.visit_all = bool(visit_all)
        self.length = len(self.labels) if length is None else int(length)
        self._length_given = length is not None
        self.classes, self._counts = np.unique(self.labels, return_counts=True)
        self._check_config()
        class_of = np.searchsorted(self.classes, self.labels)
        # Dataset indices grouped by class: class c occupies [_starts[c], _starts[c] + _counts[c]).
        self._order = np.argsort(class_of, kind="stable")
        self._class_of = class_of
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]]).astype(np.int64)
        self.epoch = 0
        self.start_batch = 0
        self._plan_cache: tuple[int, np.ndarray] | None = None

    def _check_config(self) -> None:
        b, m, ws = self.batch_size, self.m, self.world_size
        if m < 1 or b < 1:
            raise ConfigError(f"--batch-size {b} and --m-per-class {m} must be positive")
        if b % m:
            raise ConfigError(f"--batch-size {b} is not divisible by --m-per-class {m}; use a --batch-size that is a "
                              f"multiple of {m} (e.g. {max(m, b - b % m)}) or an --m-per-class that divides {b}")
        if ws < 1 or not 0 <= self.rank < ws:
            raise ConfigError(f"rank {self.rank} is outside a world of size {ws}")
        if b % ws:
            raise ConfigError(
                f"--batch-size {b} is not divisible by the number of processes {ws}; "
                f"use a multiple of {ws}, or a number of processes that divides {b}"
            )
        num_classes = len(self.classes)
        if m * num_classes < b:
            raise ConfigError(
                f"--batch-size {b} needs {b // m} classes of --m-per-class {m} images but the data has "
                f"{num_classes} classes; lower --batch-size to at most {m * num_classes}, raise --m-per-class to "
                f"{smallest_m(b, num_classes)} (it must divide the batch), or train on more classes "
                f"(--synthetic-classes with --dataset synthetic)"
            )
        if self.length < b:
            raise ConfigError(f"an epoch of {self.length} images is shorter than --batch-size {b}; lower "
                              "--batch-size or train on more images (--train-per-class, --synthetic-size)")

    # ---- epoch plan -------------------------------------------------------------------

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def _independent_plan(self, epoch: int) -> np.ndarray:
        """(num_batches, B) indices: per batch, B/m random classes x m random images."""
        rng = self._rng(epoch)
        num_batches = self.length // self.batch_size
        per_batch = self.batch_size // self.m
        all_classes = np.tile(np.arange(len(self.classes)), (num_batches, 1))
        classes = rng.permuted(all_classes, axis=1)[:, :per_batch]  # (nb, B/m)
        positions = _choose_positions(rng, self._counts[classes], self.m)  # (nb, B/m, m)
        flat = self._starts[classes][..., None] + positions
        return self._order[flat].reshape(num_batches, self.batch_size)

    def _visit_all_plan(self, epoch: int) -> np.ndarray:
        """(num_batches, B) indices visiting every image at most once.

        Each class's images are shuffled into a queue cut into chunks of m. A batch
        takes one chunk from each of B/m distinct classes, chosen as those with the
        most chunks left (random tie-break), then shuffled. Left out of the epoch:
        the last (count % m) images of each shuffled queue, and the chunks still left
        once fewer than B/m classes have any (for balanced classes: fewer than one
        batch). The queues are reshuffled every epoch, so different images are left out.
        """
        rng = self._rng(epoch)
        shuffled = np.lexsort((rng.random(len(self.labels)), self._class_of))
        per_batch = self.batch_size // self.m
        remaining = self._counts // self.m
        taken = np.zeros_like(remaining)
        max_batches = self.length // self.batch_size if self._length_given else None
        batches = []
        while (remaining > 0).sum() >= per_batch:
            if max_batches is not None and len(batches) >= max_batches:
                break
            score = remaining + rng.random(len(remaining))
            chosen = rng.permutation(np.argpartition(-score, per_batch - 1)[:per_batch])
            first = self._starts[chosen] + taken[chosen] * self.m
            batches.append(shuffled[first[:, None] + np.arange(self.m)].reshape(-1))
            taken[chosen] += 1
            remaining[chosen] -= 1
        if not batches:
            return np.zeros((0, self.batch_size), dtype=np.int64)
        return np.stack(batches)

    def epoch_plan(self, epoch: int | None = None) -> np.ndarray:
        """All global batches of an epoch, (num_batches, batch_size) int64 dataset indices."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            plan = self._visit_all_plan(epoch) if self.visit_all else self._independent_plan(epoch)
            self._plan_cache = (epoch, plan)
        return self._plan_cache[1]

    # ---- iteration and state ----------------------------------------------------------

    @property
    def num_batches(self) -> int:
        """Global batches in the whole current epoch (ignoring start_batch)."""
        return int(self.epoch_plan().shape[0])

    @property
    def local_slice(self) -> slice:
        return rank_slice(self.batch_size, self.rank, self.world_size)

    def indexed_batches(self) -> Iterator[tuple[int, list[int]]]:
        """(global batch index, this rank's indices) from start_batch to the epoch's end."""
        plan = self.epoch_plan()
        local = self.local_slice
        for batch_index in range(self.start_batch, plan.shape[0]):
            yield batch_index, plan[batch_index, local].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for _, indices in self.indexed_batches():
            yield indices

    def __len__(self) -> int:
        return max(self.num_batches - self.start_batch, 0)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a change of epoch restarts at batch 0."""
        epoch = int(epoch)
        if epoch != self.epoch:
            self.start_batch = 0
        self.epoch = epoch

    def set_start_batch(self, start_batch: int) -> None:
        """Skip the first start_batch global batches of the current epoch."""
        start_batch = int(start_batch)
        if not 0 <= start_batch <= self.num_batches:
            raise ConfigError(
                f"cannot resume at batch {start_batch}: epoch {self.epoch} has "
                f"{self.num_batches} batches (was the batch size changed?)"
            )
        self.start_batch = start_batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start_batch": self.start_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(state["epoch"])
        self.set_start_batch(state.get("start_batch", 0))


class ShardedEvalSampler(torch.utils.data.Sampler):
    """Indices [start, end) of this rank's contiguous shard of range(n); no padding.

    Shards differ in size by at most one and together cover range(n) exactly once,
    so summed counts over ranks give the exact test accuracy.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside a world of size {world_size}")
        self.n = int(n)
        self.start = rank * self.n // world_size
        self.end = (rank + 1) * self.n // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.end))

    def __len__(self) -> int:
        return self.end - self.start


class EpochShuffleBatchSampler:
    """Yields this process's dataset indices of every global batch of a seeded epoch permutation.

    n: training-set size; batch_size: the GLOBAL batch (divisible by world_size); epoch e
    uses the permutation drawn from (seed, e) and global batch k is its k-th slice of
    batch_size, of which rank r keeps the r-th contiguous share. ``drop_last`` drops the
    last partial batch (MoCo pre-training, like the original); otherwise it is kept, cut
    to a multiple of W processes (dropped if smaller than W) so that every process gets
    the same number of images in every step. ``set_start_batch(k)`` skips the first k
    batches of the current epoch (resume).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be positive (got {batch_size})")
        if batch_size % world_size:
            raise ConfigError(f"--batch-size {batch_size} is not divisible by the number of processes "
                              f"{world_size}; use a multiple of {world_size}, or a number of processes that divides "
                              f"{batch_size}")
        if n < world_size:
            raise ConfigError(f"{n} training images cannot be shared by {world_size} processes; start at most {n} "
                              "processes or train on more images")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.drop_last = drop_last
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
        return full + (1 if rest >= self.world_size and not self.drop_last else 0)

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
