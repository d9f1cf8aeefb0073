"""CIFAR augmentation: PIL path, batched tensor path, reference Compose, loaders."""

import numpy as np
import pytest
import torch
from PIL import Image

from data.augment import (
    AugmentedBatchSampler,
    CifarTestDataset,
    CifarTrainDataset,
    augment_batch,
    augment_params,
    reference_cifar_transforms,
)
from data.samplers import MPerClassBatchSampler
from data.tensor_loader import TensorBatchLoader

MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(120, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(6), 20)
    return images, labels


def _pil_batch(dataset, keys):
    items = [dataset[key] for key in keys]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def test_augment_params_pure_and_in_range():
    offsets, flips = augment_params(7, 2, 5, 64)
    again = augment_params(7, 2, 5, 64)
    assert offsets.shape == (64, 2) and offsets.dtype == torch.int64 and flips.dtype == torch.bool
    assert torch.equal(offsets, again[0]) and torch.equal(flips, again[1])
    assert 0 <= offsets.min() and offsets.max() <= 8
    assert not torch.equal(offsets, augment_params(7, 2, 6, 64)[0])
    assert not torch.equal(offsets, augment_params(7, 3, 5, 64)[0])


def test_pil_and_tensor_paths_bitwise_equal(data, device):
    images, labels = data
    dataset = CifarTrainDataset(images, labels, MEAN, STD)
    corners = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0], [4, 4], [3, 7], [0, 0], [8, 8]])
    flips = torch.tensor([False, False, True, True, False, True, True, False])
    index = list(range(8))
    keys = [(i, dy, dx, bool(f)) for i, (dy, dx), f in zip(index, corners.tolist(), flips)]
    expected, _ = _pil_batch(dataset, keys)
    nhwc = torch.from_numpy(images[index]).to(device)
    corners, flips = corners.to(device), flips.to(device)
    for batch in (nhwc, nhwc.permute(0, 3, 1, 2).contiguous()):
        got = augment_batch(batch, corners, flips, MEAN, STD)
        assert got.shape == (8, 3, 32, 32) and got.dtype == torch.float32 and got.device == device
        assert torch.equal(got.cpu(), expected)
    last = augment_batch(nhwc, corners, flips, MEAN, STD, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last.cpu(), expected)
    half = augment_batch(nhwc, corners, flips, MEAN, STD, out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_extreme_offsets_show_the_zero_padding(data):
    images, _ = data
    raw = torch.from_numpy(images[:2])
    offsets = torch.tensor([[0, 0], [8, 8]])
    no_flip = torch.tensor([False, False])
    out = augment_batch(raw, offsets, no_flip, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert (out[0, :, :4, :] == 0).all() and (out[0, :, :, :4] == 0).all()
    assert (out[1, :, -4:, :] == 0).all() and (out[1, :, :, -4:] == 0).all()
    assert torch.equal(out[0, :, 4:, 4:], raw[0, :28, :28].permute(2, 0, 1).float() / 255)


def test_reference_compose_gives_the_same_pixels(data):
    images, labels = data
    dataset = CifarTrainDataset(images, labels, MEAN, STD)
    compose = reference_cifar_transforms(MEAN, STD)
    for seed in range(12):
        torch.manual_seed(seed)
        reference = compose(Image.fromarray(images[seed]))
        torch.manual_seed(seed)  # replay the draws RandomCrop and RandomHorizontalFlip make
        dy = torch.randint(0, 9, size=(1,)).item()
        dx = torch.randint(0, 9, size=(1,)).item()
        flip = bool(torch.rand(1) < 0.5)
        ours, _ = dataset[(seed, dy, dx, flip)]
        assert torch.equal(ours, reference)


def test_test_dataset_is_plain_normalisation(data):
    images, labels = data
    x, y = CifarTestDataset(images, labels, MEAN, STD)[3]
    train_x, _ = CifarTrainDataset(images, labels, MEAN, STD)[3]
    assert y == labels[3] and torch.equal(x, train_x)


def _dataloader_batches(images, labels, num_workers, epoch=1):
    sampler = AugmentedBatchSampler(MPerClassBatchSampler(labels, 2, 12, seed=4), seed=9)
    sampler.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(
        CifarTrainDataset(images, labels, MEAN, STD), batch_sampler=sampler, num_workers=num_workers
    )
    return [(x, y) for x, y in loader]


def test_dataloader_workers_and_tensor_loader_agree(data):
    images, labels = data
    no_workers = _dataloader_batches(images, labels, 0)
    two_workers = _dataloader_batches(images, labels, 2)
    tensor_loader = TensorBatchLoader(
        images, labels, MPerClassBatchSampler(labels, 2, 12, seed=4), "cpu", MEAN, STD,
        train=True, seed=9,
    )
    tensor_loader.set_epoch(1)
    fast = list(tensor_loader)
    assert len(no_workers) == len(two_workers) == len(fast) == 10
    for (a, ya), (b, yb), (c, yc) in zip(no_workers, two_workers, fast):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert torch.equal(ya, yb) and torch.equal(ya, yc)


def test_ranks_and_resume_match_the_single_run(data):
    images, labels = data
    whole = TensorBatchLoader(images, labels, MPerClassBatchSampler(labels, 2, 12, seed=4),
                              "cpu", MEAN, STD, train=True, seed=9)
    full = list(whole)
    halves = []
    for rank in (0, 1):
        sampler = MPerClassBatchSampler(labels, 2, 12, seed=4, rank=rank, world_size=2)
        loader = TensorBatchLoader(images, labels, sampler, "cpu", MEAN, STD, train=True, seed=9)
        halves.append(list(loader))
    for (x, y), (x0, y0), (x1, y1) in zip(full, *halves):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    resumed = TensorBatchLoader(images, labels, MPerClassBatchSampler(labels, 2, 12, seed=4),
                                "cpu", MEAN, STD, train=True, seed=9)
    resumed.load_state_dict({"epoch": 0, "start_batch": 6})
    tail = list(resumed)
    assert len(tail) == len(full) - 6
    assert all(torch.equal(a[0], b[0]) for a, b in zip(tail, full[6:]))


def test_eval_loader_shards(data):
    images, labels = data
    whole = list(TensorBatchLoader.for_eval(images, labels, 32, "cpu", MEAN, STD))
    assert [len(y) for _, y in whole] == [32, 32, 32, 24]
    reference = torch.stack([CifarTestDataset(images, labels, MEAN, STD)[i][0] for i in range(120)])
    assert torch.equal(torch.cat([x for x, _ in whole]), reference)
    shards = [TensorBatchLoader.for_eval(images, labels, 32, "cpu", MEAN, STD, rank=r, world_size=2)
              for r in (0, 1)]
    joined = torch.cat([y for shard in shards for _, y in shard])
    assert torch.equal(joined, torch.from_numpy(labels))
