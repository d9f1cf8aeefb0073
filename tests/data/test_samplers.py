"""MPerClassBatchSampler and ShardedEvalSampler."""

import numpy as np
import pytest

from data.samplers import MPerClassBatchSampler, ShardedEvalSampler, _choose_positions, smallest_m
from utils.errors import ConfigError

LABELS = np.repeat(np.arange(10), 30)  # 300 images, 10 classes


def _batches(sampler):
    return [list(b) for b in sampler]


def test_every_batch_has_m_per_class():
    sampler = MPerClassBatchSampler(LABELS, m=2, batch_size=12, seed=0)
    batches = _batches(sampler)
    assert len(batches) == len(sampler) == 300 // 12
    for batch in batches:
        labels = LABELS[batch]
        assert len(batch) == 12
        counts = np.bincount(labels, minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [2] * 6
        assert len(set(batch)) == 12  # classes with >= m images: no repeats
        assert (labels[0::2] == labels[1::2]).all()  # m images of a class are adjacent


def test_length_option_and_small_classes_use_replacement():
    labels = np.array([0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    sampler = MPerClassBatchSampler(labels, m=3, batch_size=6, seed=1, length=60)
    batches = _batches(sampler)
    assert len(batches) == 10
    for batch in batches:
        counts = np.bincount(labels[batch], minlength=4)
        assert sorted(counts[counts > 0].tolist()) == [3, 3]


@pytest.mark.parametrize(
    "kwargs, text",
    [
        (dict(m=3, batch_size=128), r"not divisible by --m-per-class 3; use a --batch-size that is a multiple of 3 "
                                    r"\(e.g. 126\) or an --m-per-class that divides 128"),
        (dict(m=2, batch_size=30), r"lower --batch-size to at most 20, raise --m-per-class to 3 .* "
                                   r"\(--synthetic-classes with --dataset synthetic\)"),
        (dict(m=2, batch_size=12, world_size=5), "number of processes 5"),
        (dict(m=2, batch_size=12, length=8), "shorter than --batch-size 12; lower --batch-size or train on more "
                                             r"images \(--train-per-class, --synthetic-size\)"),
    ],
)
def test_config_errors(kwargs, text):
    with pytest.raises(ConfigError, match=text):
        MPerClassBatchSampler(LABELS, **kwargs)


@pytest.mark.parametrize("batch,classes,m", [(128, 10, 16), (30, 10, 3), (12, 12, 1), (7, 2, 7), (64, 100, 1)])
def test_smallest_m_divides_the_batch_and_fills_it(batch, classes, m):
    assert smallest_m(batch, classes) == m


def test_ranks_split_the_global_batch():
    single = _batches(MPerClassBatchSampler(LABELS, 2, 12, seed=5))
    parts = [
        _batches(MPerClassBatchSampler(LABELS, 2, 12, seed=5, rank=r, world_size=2))
        for r in (0, 1)
    ]
    assert [a + b for a, b in zip(*parts)] == single
    assert all(len(b) == 6 for b in parts[0])


def test_epochs_and_seeds_differ_and_repeat():
    sampler = MPerClassBatchSampler(LABELS, 2, 12, seed=0)
    epoch0 = _batches(sampler)
    assert _batches(sampler) == epoch0
    sampler.set_epoch(1)
    assert _batches(sampler) != epoch0
    sampler.set_epoch(0)
    assert _batches(sampler) == epoch0
    assert _batches(MPerClassBatchSampler(LABELS, 2, 12, seed=1)) != epoch0


def test_resume_yields_the_tail():
    full = MPerClassBatchSampler(LABELS, 2, 12, seed=2)
    full.set_epoch(3)
    expected = list(full.indexed_batches())
    resumed = MPerClassBatchSampler(LABELS, 2, 12, seed=2)
    resumed.load_state_dict({"epoch": 3, "start_batch": 7})
    resumed.set_epoch(3)  # same epoch: the start batch is kept
    assert resumed.state_dict() == {"epoch": 3, "start_batch": 7}
    assert len(resumed) == len(expected) - 7
    assert list(resumed.indexed_batches()) == expected[7:]
    resumed.set_epoch(4)
    assert resumed.start_batch == 0 and len(resumed) == len(expected)
    with pytest.raises(ConfigError):
        resumed.set_start_batch(len(expected) + 1)


def test_visit_all_covers_every_index_once():
    labels = np.repeat(np.arange(4), 8)
    sampler = MPerClassBatchSampler(labels, 2, 8, seed=0, visit_all=True)
    batches = _batches(sampler)
    assert len(batches) == 4
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(32))
    for batch in batches:
        assert np.bincount(labels[batch], minlength=4).tolist() == [2, 2, 2, 2]
    sampler.set_epoch(1)
    assert _batches(sampler) != batches


def test_visit_all_more_classes_than_batch():
    sampler = MPerClassBatchSampler(LABELS, 2, 12, seed=3, visit_all=True)
    flat = np.concatenate(_batches(sampler))
    assert len(flat) == 300 and len(set(flat.tolist())) == 300
    for batch in sampler:
        counts = np.bincount(LABELS[batch], minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [2] * 6


def test_choose_positions_distinct_and_uniform():
    rng = np.random.default_rng(0)
    draws = _choose_positions(rng, np.full(20000, 5), 3)
    assert all(len(set(row)) == 3 for row in draws[:500].tolist())
    assert draws.min() == 0 and draws.max() == 4
    frequencies = np.bincount(draws[:, 2], minlength=5) / 20000
    assert np.abs(frequencies - 0.2).max() < 0.02


def test_sharded_eval_sampler_covers_exactly():
    shards = [list(ShardedEvalSampler(103, r, 4)) for r in range(4)]
    assert sum(shards, []) == list(range(103))
    assert {len(s) for s in shards} <= {25, 26}
