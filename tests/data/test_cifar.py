"""CIFAR pickle reader and the synthetic data set."""

import os
import pickle

import numpy as np
import pytest

from data.cifar import DATASET_STATS, load_cifar, num_classes, write_cifar100
from data.synthetic import SYNTHETIC_STATS, make_synthetic
from utils.errors import ConfigError, DatasetError


def _random_split(rng, n, n_classes):
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, n_classes, size=n).astype(np.int64)
    return images, labels


def _official_entry(images, labels, label_key, byte_keys=True):
    """A dict as in the official files: data (N, 3072) R,G,B planes, labels as a list."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    entry = {"data": data, label_key: labels.tolist(), "filenames": ["x.png"] * len(images)}
    if byte_keys:
        entry = {k.encode("latin1"): v for k, v in entry.items()}
    return entry


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar100(root, rng, n_train=300, n_test=100):
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    train = _random_split(rng, n_train, 100)
    test = _random_split(rng, n_test, 100)
    _dump(os.path.join(folder, "train"), _official_entry(*train, "fine_labels"))
    _dump(os.path.join(folder, "test"), _official_entry(*test, "fine_labels", byte_keys=False))
    _dump(os.path.join(folder, "meta"), {b"fine_label_names": [f"c{i}" for i in range(100)]})
    return train, test


def write_fake_cifar10(root, rng, per_batch=40):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    batches = [_random_split(rng, per_batch, 10) for _ in range(6)]
    for i, split in enumerate(batches[:5], start=1):
        _dump(os.path.join(folder, f"data_batch_{i}"), _official_entry(*split, "labels"))
    _dump(os.path.join(folder, "test_batch"), _official_entry(*batches[5], "labels"))
    _dump(os.path.join(folder, "batches.meta"), {b"label_names": [f"c{i}" for i in range(10)]})
    train = tuple(np.concatenate(parts) for parts in zip(*batches[:5]))
    return train, batches[5]


def test_cifar100_round_trip(tmp_path):
    train, test = write_fake_cifar100(str(tmp_path), np.random.default_rng(0))
    for split, expected in ((True, train), (False, test)):
        images, labels = load_cifar(str(tmp_path), "cifar100", train=split, download=False)
        assert images.dtype == np.uint8 and images.shape == expected[0].shape
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(images, expected[0])
        np.testing.assert_array_equal(labels, expected[1])


def test_cifar10_round_trip(tmp_path):
    train, test = write_fake_cifar10(str(tmp_path), np.random.default_rng(1))
    images, labels = load_cifar(str(tmp_path), "cifar10", train=True, download=False)
    assert images.shape == (200, 32, 32, 3)
    np.testing.assert_array_equal(images, train[0])
    np.testing.assert_array_equal(labels, train[1])
    images, labels = load_cifar(str(tmp_path), "cifar10", train=False, download=False)
    np.testing.assert_array_equal(images, test[0])
    np.testing.assert_array_equal(labels, test[1])


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_cifar(str(tmp_path), "cifar100", train=True, download=False)
    message = str(info.value)
    assert os.path.join(str(tmp_path), "cifar-100-python") in message
    assert "\n" not in message and "cifar-100-python.tar.gz" in message


def test_malformed_folder_names_expected_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError) as info:
        load_cifar(str(tmp_path), "cifar10", train=True, download=False)
    assert "data_batch_5" in str(info.value) and "test_batch" in str(info.value)


def test_wrong_shape_is_malformed(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _dump(str(folder / "test"), {b"data": np.zeros((3, 100), np.uint8), b"fine_labels": [0, 1, 2]})
    with pytest.raises(DatasetError, match="expected the official"):
        load_cifar(str(tmp_path), "cifar100", train=False, download=False)


@pytest.mark.parametrize("data,labels,words", [
    (np.random.default_rng(0).random((3, 3072)).astype(np.float32), [0, 1, 2], "float32"),
    (np.random.default_rng(0).random((3, 3072)), [0, 1, 2], "float64"),
    (np.full((3, 3072), 300, np.int64), [0, 1, 2], "outside 0-255"),
    (np.zeros((3, 3072), np.uint8), [0.0, 1.5, 2.0], "labels of dtype float64"),
    (np.zeros((3, 32, 32, 3), np.uint8), [0, 1, 2], "shape (3, 32, 32, 3)"),
], ids=["float32-in-0-1", "float64", "int-above-255", "float-labels", "nhwc"])
def test_wrong_dtype_or_shape_is_a_dataset_error(tmp_path, data, labels, words):
    """Float pixels in [0, 1) are not cast to black uint8 images: the reader names the dtype."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _dump(str(folder / "test"), {b"data": data, b"fine_labels": labels})
    with pytest.raises(DatasetError) as info:
        load_cifar(str(tmp_path), "cifar100", train=False, download=False)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_integer_pixel_lists_are_read(tmp_path):
    """Pixels stored as Python ints (or any integer dtype) within 0-255 are accepted."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = np.arange(2 * 3072).reshape(2, 3072) % 256
    _dump(str(folder / "test"), {"data": rows.tolist(), "fine_labels": np.array([3, 4], np.int32)})
    images, labels = load_cifar(str(tmp_path), "cifar100", train=False, download=False)
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3) and labels.tolist() == [3, 4]
    assert images[0, 0, 1, 0] == 1  # R plane, row 0, column 1


def test_stats_and_classes():
    assert num_classes("cifar100") == 100 and num_classes("cifar10") == 10
    assert DATASET_STATS["cifar100"]["mean"] == (0.5071, 0.4867, 0.4408)
    assert DATASET_STATS["cifar10"]["std"] == (0.2470, 0.2435, 0.2616)
    with pytest.raises(ConfigError):
        num_classes("svhn")


def test_synthetic_deterministic_balanced():
    first = make_synthetic(num_train=200, num_test=50, num_classes=10, seed=3)
    again = make_synthetic(num_train=200, num_test=50, num_classes=10, seed=3)
    other = make_synthetic(num_train=200, num_test=50, num_classes=10, seed=4)
    (train_x, train_y), (test_x, test_y) = first
    assert train_x.shape == (200, 32, 32, 3) and train_x.dtype == np.uint8
    assert test_x.shape == (50, 32, 32, 3) and test_y.dtype == np.int64
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(train_x, other[0][0])
    assert np.bincount(train_y, minlength=10).tolist() == [20] * 10
    assert np.bincount(test_y, minlength=10).tolist() == [5] * 10
    assert len(SYNTHETIC_STATS["mean"]) == 3


def test_synthetic_classes_differ():
    (x, y), _ = make_synthetic(num_train=400, num_test=0, num_classes=4, seed=0, image_size=16)
    assert x.shape == (400, 16, 16, 3)
    class_means = np.stack([x[y == c].reshape(-1, 16 * 16 * 3).mean(0) for c in range(4)])
    gaps = [np.abs(class_means[a] - class_means[b]).mean() for a in range(4) for b in range(a)]
    assert min(gaps) > 3.0  # grey levels: class prototypes are visibly distinct


def test_unreadable_pickle_is_malformed(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="cannot read") as info:
        load_cifar(str(tmp_path), "cifar100", train=True, download=False)
    assert "train, test, meta" in str(info.value)


def test_failed_download_is_one_line_dataset_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError) as info:
        load_cifar(str(tmp_path), "cifar10", train=True, download=True)
    message = str(info.value)
    assert "\n" not in message and "cifar-10-python.tar.gz" in message
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in message


def test_write_cifar100_is_read_back_by_us_and_by_torchvision(tmp_path, monkeypatch):
    import torchvision
    import torchvision.datasets.cifar as tv_cifar

    rng = np.random.default_rng(3)
    train = (rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), np.arange(12) * 7 % 100)
    test = (rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), np.arange(5))
    write_cifar100(str(tmp_path), train, test)
    for split, (images, labels) in ((True, train), (False, test)):
        got_images, got_labels = load_cifar(str(tmp_path), "cifar100", train=split, download=False)
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    theirs = torchvision.datasets.CIFAR100(str(tmp_path), train=True, download=False)
    np.testing.assert_array_equal(theirs.data, train[0])
    assert theirs.targets == train[1].tolist() and len(theirs.classes) == 100
