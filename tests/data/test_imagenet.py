"""ImageNet-style folder with positive/negative contrast indices (docs/method.md §3)."""

import numpy as np
import pytest
import torch
from PIL import Image

from data.image_folder import class_ranges
from data.imagenet import (
    ImageFolderWithContrastIndices,
    imagenet_eval_transform,
    imagenet_train_transform,
    sample_negatives,
    sample_positives,
)
from utils.errors import DatasetError

CLASS_SIZES = {"ant": 5, "bee": 2, "cat": 9, "dog": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet") / "train"
    rng = np.random.default_rng(0)
    for name, count in CLASS_SIZES.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.JPEG", format="JPEG")
    return str(root)


def _dataset(folder, **kwargs):
    options = dict(transform=imagenet_train_transform(8), pos_k=1, neg_k=64, seed=0)
    options.update(kwargs)
    return ImageFolderWithContrastIndices(folder, **options)


def test_item_layout_and_class_membership(folder):
    dataset = _dataset(folder)
    labels = np.asarray(dataset.targets)
    assert len(dataset) == sum(CLASS_SIZES.values())
    for index in range(len(dataset)):
        image, target, idx, pos_idx, neg_idx = dataset[index]
        assert image.shape == (3, 8, 8) and idx == index and target == labels[index]
        assert pos_idx.dtype == torch.long and pos_idx.shape == (2,) and neg_idx.shape == (64,)
        assert pos_idx[0] == index
        assert (labels[pos_idx.numpy()] == target).all()
        if CLASS_SIZES[dataset.classes[target]] > 1:
            assert pos_idx[1] != index
        else:
            assert pos_idx[1] == index  # a single-image class is its own positive
        assert (labels[neg_idx.numpy()] != target).all()


def test_positives_without_replacement_or_with_when_short(folder):
    dataset = _dataset(folder, pos_k=4)
    labels = np.asarray(dataset.targets)
    cat = dataset.class_to_idx["cat"]
    bee = dataset.class_to_idx["bee"]
    anchor = int(np.flatnonzero(labels == cat)[0])
    pos = dataset[anchor][3].numpy()
    assert len(set(pos.tolist())) == 5 and (labels[pos] == cat).all()
    anchor = int(np.flatnonzero(labels == bee)[0])
    pos = dataset[anchor][3].numpy()
    assert (labels[pos] == bee).all() and (pos[1:] != anchor).all()


def test_reproducible_and_changes_with_epoch(folder):
    first = _dataset(folder)
    second = _dataset(folder)
    a, b = first[3], second[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])
    second.set_epoch(1)
    c = second[3]
    assert not torch.equal(a[4], c[4]) and not torch.equal(a[0], c[0])
    assert not torch.equal(a[4], _dataset(folder, seed=1)[3][4])


def test_workers_do_not_change_the_draws(folder):
    dataset = _dataset(folder, neg_k=16)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(dataset, batch_size=6, num_workers=workers)
        batches.append([tuple(part for part in batch) for batch in loader])
    for x, y in zip(*batches):
        assert all(torch.equal(u, v) for u, v in zip(x, y))


def _chi_square_critical(dof, alpha=0.001):
    try:
        from scipy.stats import chi2

        return float(chi2.ppf(1 - alpha, dof))
    except ImportError:  # Wilson-Hilferty approximation
        z = 3.090232  # standard normal quantile for 1 - 0.001
        return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


def test_negatives_uniform_over_other_classes():
    labels = np.repeat(np.arange(4), [5, 2, 9, 1])
    start, count = class_ranges(labels)
    rng = np.random.default_rng(1)
    anchors = np.full(4000, 2)  # class 2 = positions 7..15; others: 8 images
    draws = sample_negatives(anchors, start, count, len(labels), 10, rng).reshape(-1)
    assert not np.isin(draws, np.arange(7, 16)).any()
    others = np.setdiff1d(np.arange(len(labels)), np.arange(7, 16))
    observed = np.array([(draws == i).sum() for i in others])
    assert observed.sum() == draws.size
    expected = draws.size / len(others)
    statistic = ((observed - expected) ** 2 / expected).sum()
    assert statistic < _chi_square_critical(len(others) - 1)


def test_sampling_structures_do_not_grow_with_classes():
    n = 10000
    sizes = []
    for num_classes in (10, 1000):
        labels = np.sort(np.arange(n) % num_classes)
        start, count = class_ranges(labels)
        sizes.append(start.nbytes + count.nbytes)
        rng = np.random.default_rng(0)
        anchors = labels[::97]
        negs = sample_negatives(anchors, start, count, n, 32, rng)
        assert (labels[negs] != anchors[:, None]).all()
        positions = np.arange(n)[::97]
        pos = sample_positives(positions, anchors, start, count, 3, rng)
        assert (labels[pos] == anchors[:, None]).all() and (pos != positions[:, None]).all()
    # O(classes) offsets, never O(classes x images) negative lists
    assert sizes[1] <= 16 * 1000 and sizes[1] < n * 8


def test_dataset_holds_no_per_class_lists(folder):
    dataset = _dataset(folder)
    n = len(dataset)
    for value in vars(dataset).values():
        if isinstance(value, np.ndarray):
            assert value.size <= n
        assert not (isinstance(value, list) and value and isinstance(value[0], np.ndarray))


def test_missing_folder_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "nope")):
        _dataset(str(tmp_path / "nope"))


def test_eval_transform_sizes():
    image = Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8))
    out = imagenet_eval_transform(8)(image)
    assert out.shape == (3, 8, 8)
    sizes = [t.size for t in imagenet_eval_transform(224).transforms[:2]]
    assert sizes[0] == 256 and tuple(sizes[1]) == (224, 224)


# ----------------------------------------------------------------------------- unreadable images

def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    import io

    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def damaged(tmp_path):
    """class a: 000 good, 001 garbage, 002 truncated, 003 good; class b: three good images."""
    root = tmp_path / "train"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    for i, data in enumerate([jpeg_bytes(0), b"this is not a JPEG", jpeg_bytes(1, 64)[:300], jpeg_bytes(2)]):
        (root / "a" / f"{i:03d}.JPEG").write_bytes(data)
    for i in range(3):
        (root / "b" / f"{i:03d}.JPEG").write_bytes(jpeg_bytes(10 + i))
    return root


def test_unreadable_images_are_replaced_from_their_class_and_named_once(damaged, capfd):
    from data.image_folder import TolerantImageFolder

    dataset = TolerantImageFolder(str(damaged))
    for _ in range(2):
        items = [dataset[i] for i in range(len(dataset))]
        assert [target for _, target in items] == dataset.targets
        assert all(image.size == (16, 16) for image, _ in items)
        assert np.array_equal(np.asarray(items[1][0]), np.asarray(items[3][0]))  # the next readable of class a
        assert np.array_equal(np.asarray(items[2][0]), np.asarray(items[3][0]))
    assert dataset.skipped == 4
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in "".join(lines)
    assert str(damaged / "a" / "001.JPEG") in lines[0] and str(damaged / "a" / "002.JPEG") in lines[1]


def test_workers_share_the_counts_and_name_a_file_once(damaged, capfd):
    """DataLoader workers (new ones each epoch) add to one count and name each bad file once."""
    from torchvision.transforms import v2

    from data.image_folder import TolerantImageFolder

    dataset = TolerantImageFolder(str(damaged), v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    for _ in range(2):
        assert sum(images.shape[0] for images, _ in loader) == len(dataset)
    assert dataset.skipped == 4
    err = capfd.readouterr().err
    assert err.count("001.JPEG") == 1 and err.count("002.JPEG") == 1


def _claim_after(barrier, dataset, index, wins):
    barrier.wait()
    wins.put(dataset._claim_name(index))


def test_a_name_is_claimed_by_one_process_of_many(damaged):
    """Workers failing on one file at the same moment print it once: claiming a name is atomic."""
    import multiprocessing

    from data.image_folder import TolerantImageFolder

    dataset = TolerantImageFolder(str(damaged))
    ctx = multiprocessing.get_context("fork")
    barrier, wins = ctx.Barrier(6), ctx.Queue()
    workers = [ctx.Process(target=_claim_after, args=(barrier, dataset, 1, wins)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(wins.get(timeout=10) for _ in workers) == [False] * 5 + [True]
    assert bool(dataset.named[1]) and not dataset._claim_name(1)


def test_spawned_workers_share_the_names(damaged, capfd):
    """With spawned DataLoader workers (macOS's default) the lock and the flags travel to the workers."""
    from torchvision.transforms import v2

    from data.image_folder import TolerantImageFolder

    dataset = TolerantImageFolder(str(damaged), v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]))
    assert len([dataset[i] for i in range(len(dataset))]) == len(dataset)  # names both bad files here
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    assert sum(images.shape[0] for images, _ in loader) == len(dataset)  # the worker sees them named
    assert dataset.skipped == 4
    err = capfd.readouterr().err
    assert err.count("001.JPEG") == 1 and err.count("002.JPEG") == 1


def test_a_copy_of_the_folder_has_its_own_lock(damaged):
    import copy

    from data.image_folder import TolerantImageFolder

    dataset = TolerantImageFolder(str(damaged))
    twin = copy.deepcopy(dataset)
    assert twin.name_lock is not dataset.name_lock and twin._claim_name(1)


def test_too_many_unreadable_images_stop_with_one_error(tmp_path, capfd):
    from data.image_folder import BAD_IMAGE_GRACE, TolerantImageFolder

    root = tmp_path / "train"
    (root / "a").mkdir(parents=True)
    (root / "a" / "000.JPEG").write_bytes(jpeg_bytes(0))
    for i in range(1, BAD_IMAGE_GRACE + 3):
        (root / "a" / f"{i:03d}.JPEG").write_bytes(b"garbage")
    dataset = TolerantImageFolder(str(root))
    with pytest.raises(DatasetError) as info:
        for i in range(len(dataset)):
            dataset[i]
    assert f"{BAD_IMAGE_GRACE + 1} of the " in str(info.value) and "more than 1%" in str(info.value)
    (root / "a" / "000.JPEG").write_bytes(b"garbage too")
    with pytest.raises(DatasetError, match="no readable image in class 'a'"):
        TolerantImageFolder(str(root))[0]
