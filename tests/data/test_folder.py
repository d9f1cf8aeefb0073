"""Image folders CIFAR-style (data/folder.py, data/pipeline.py): decoding, both paths, normalisation, memory."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data import folder
from data.augment import CifarTrainDataset
from data.folder import FolderImages, channel_stats, fits_in_memory, folder_splits, square_image
from data.pipeline import (build_cifar_loaders, class_balanced_subset, decode_if_it_fits, folder_stats, load_arrays,
                           open_folder_data)
from tests.image_files import write_jpeg_folder
from utils.errors import ConfigError, DatasetError


@pytest.fixture
def jpegs(tmp_path):
    return write_jpeg_folder(str(tmp_path / "images"), classes=3, train=8, test=2, size=(20, 24))


def test_square_image_resizes_the_shorter_side_and_crops_the_centre():
    wide = Image.fromarray(np.arange(20 * 40 * 3, dtype=np.uint32).reshape(20, 40, 3).astype(np.uint8))
    out = square_image(wide, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    grey = Image.fromarray(np.full((16, 16), 7, np.uint8), mode="L")
    assert (square_image(grey, 16) == 7).all()  # converted to RGB, same size: untouched


def test_the_folder_reads_as_cifar_shaped_data(jpegs):
    data = open_folder_data(jpegs, 16)
    assert data.num_classes == 3 and data.classes == ["class0", "class1", "class2"]
    assert len(data.train_labels) == 24 and len(data.test_labels) == 6
    assert np.bincount(data.train_labels).tolist() == [8, 8, 8]
    assert data.train_images[0].shape == (16, 16, 3) and data.padding == 2
    subset = class_balanced_subset(data, 3)
    assert isinstance(subset.train_images, FolderImages) and len(subset.train_images) == 9
    assert np.array_equal(subset.train_images[4], data.train_images[9])  # class 1 starts at 8


def test_test_split_may_be_called_test(tmp_path):
    root = write_jpeg_folder(str(tmp_path / "t"), classes=2, train=2, test=1, test_split="test")
    assert folder_splits(root)[1].endswith("test")


def test_layout_errors_name_the_expected_layout(tmp_path):
    with pytest.raises(DatasetError, match="does not exist; --dataset folder expects DIR/train/<class>"):
        folder_splits(str(tmp_path / "none"))
    (tmp_path / "a" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no val/ or test/ folder"):
        folder_splits(str(tmp_path / "a"))
    root = write_jpeg_folder(str(tmp_path / "b"), classes=2, train=1, test=1)
    (tmp_path / "b" / "val" / "class1").rename(tmp_path / "b" / "val" / "other")
    with pytest.raises(DatasetError, match=r"only in train: \['class1'\], only in the test split: \['other'\]"):
        open_folder_data(root, 16)


def test_both_paths_hold_the_same_bytes(jpegs):
    lazy = open_folder_data(jpegs, 16)
    decoded = decode_if_it_fits(lazy, torch.device("cpu"), 1, 0, print)
    assert isinstance(decoded.train_images, np.ndarray) and decoded.train_images.shape == (24, 16, 16, 3)
    for i in (0, 11, 23):
        assert np.array_equal(decoded.train_images[i], lazy.train_images[i])
    assert np.array_equal(decoded.test_images[5], lazy.test_images[5])


def test_tensor_and_pil_batches_are_equal(jpegs):
    lazy = open_folder_data(jpegs, 16)
    decoded = decode_if_it_fits(lazy, torch.device("cpu"), 1, 0, print)
    kwargs = dict(batch_size=6, eval_batch_size=6, m_per_class=2, visit_all=False, seed=3, rank=0, world_size=1,
                  device=torch.device("cpu"), num_workers=0, channels_last=False)
    pil_train, pil_test = build_cifar_loaders(lazy, path="pil", **kwargs)
    tensor_train, tensor_test = build_cifar_loaders(decoded, path="tensor", **kwargs)
    for (x1, y1), (x2, y2) in zip(pil_train, tensor_train):
        assert x1.shape == (6, 3, 16, 16) and torch.equal(x1, x2) and torch.equal(y1, y2)
    for (x1, _), (x2, _) in zip(pil_test, tensor_test):
        assert torch.equal(x1, x2)


def test_a_folder_too_large_stays_on_the_pil_path_and_says_so(jpegs, monkeypatch):
    lines = []
    monkeypatch.setattr(folder, "available_host_memory", lambda: 1000)
    data = decode_if_it_fits(open_folder_data(jpegs, 16), torch.device("cpu"), 1, 0, lines.append)
    assert isinstance(data.train_images, FolderImages)
    assert len(lines) == 1 and "would not fit in memory" in lines[0] and "using --data-path pil instead" in lines[0]


def test_fits_in_memory_counts_every_process_of_the_node(monkeypatch):
    monkeypatch.setattr(folder, "available_host_memory", lambda: 4 * 2 ** 30)
    assert fits_in_memory(2 ** 30, torch.device("cpu"), processes=2)[0]
    fits, numbers = fits_in_memory(2 ** 30, torch.device("cpu"), processes=3)
    assert not fits and "1.0 GiB per process, 4.0 GiB of RAM available to 3 processes" in numbers
    monkeypatch.setattr(folder, "available_host_memory", lambda: None)  # unknown: assume it fits
    assert fits_in_memory(2 ** 40, torch.device("cpu"))[0]


def test_channel_stats_are_exact():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    mean, std = channel_stats([images[:4], images[4:]])
    pixels = images.reshape(-1, 3).astype(np.float64) / 255
    assert np.allclose(mean, pixels.mean(0), atol=1e-12) and np.allclose(std, pixels.std(0), atol=1e-12)
    assert channel_stats([np.full((1, 2, 2, 3), 9, np.uint8)])[1] == (1.0, 1.0, 1.0)  # constant: scale 1


def test_normalisation_is_computed_once_and_cached(jpegs, tmp_path):
    lazy = open_folder_data(jpegs, 16)
    lines = []
    stats = folder_stats(lazy, 0, str(tmp_path), lines.append)
    assert len(lines) == 1 and "computing the normalisation from the 24 training images" in lines[0]
    cache = json.loads((tmp_path / "normalization.json").read_text())
    assert cache["mean"] == list(stats[0]) and cache["key"]["images"] == 24
    decoded = decode_if_it_fits(lazy, torch.device("cpu"), 1, 0, print)
    again = folder_stats(decoded, 0, str(tmp_path), lines.append)
    assert again == stats and len(lines) == 1  # read back, not recomputed
    assert channel_stats([decoded.train_images]) == stats  # the same numbers from either path
    other = folder_stats(class_balanced_subset(lazy, 2), 0, str(tmp_path), lines.append)
    assert other != stats and len(lines) == 2  # other images: recomputed


def test_a_folder_dataset_pads_crops_by_an_eighth():
    images = np.zeros((1, 24, 24, 3), np.uint8)
    item, _ = CifarTrainDataset(images, [0], (0, 0, 0), (1, 1, 1), padding=3)[(0, 0, 0, False)]
    assert item.shape == (3, 24, 24) and item[:, :3].sum() == 0


def test_synthetic_data_takes_an_image_size_and_cifar_refuses_one():
    data = load_arrays("synthetic", "", 20, 2, synthetic_test_size=4, image_size=24)
    assert data.train_images.shape == (20, 24, 24, 3) and data.padding == 3
    with pytest.raises(ConfigError, match="cifar10 images are 32 x 32; --image-size is for --dataset folder"):
        load_arrays("cifar10", "", image_size=24)
