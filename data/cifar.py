"""CIFAR-10 / CIFAR-100 read straight from the official python-pickle layout.

The files are read without any MD5 check, so faithful re-created copies (for
example ``make_cifar10_pickles.py`` output) are accepted. Images come back as
uint8 NHWC arrays, labels as int64, so both the PIL path and the fast tensor path
start from the same bytes.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from utils.errors import ConfigError, DatasetError

DATASET_STATS: dict[str, dict[str, tuple[float, float, float]]] = {
    "cifar100": {"mean": (0.5071, 0.4867, 0.4408), "std": (0.2675, 0.2565, 0.2761)},
    "cifar10": {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)},
}

_LAYOUTS: dict[str, dict[str, Any]] = {
    "cifar100": {
        "folder": "cifar-100-python",
        "train_files": ["train"],
        "test_files": ["test"],
        "meta": "meta",
        "label_key": "fine_labels",
        "num_classes": 100,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "archive_md5": "eb9058c3a382ffc7106e4002c42a8d85",
    },
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train_files": [f"data_batch_{i}" for i in range(1, 6)],
        "test_files": ["test_batch"],
        "meta": "batches.meta",
        "label_key": "labels",
        "num_classes": 10,
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "archive_md5": "c58f30108f718f92721af3b95e74349a",
    },
}

_IMAGE_BYTES = 3 * 32 * 32


def _layout(name: str) -> dict[str, Any]:
    if name not in _LAYOUTS:
        raise ConfigError(f"unknown dataset {name!r}: choose one of {sorted(_LAYOUTS)}")
    return _LAYOUTS[name]


def num_classes(name: str) -> int:
    """Number of classes of ``cifar10`` / ``cifar100``."""
    return int(_layout(name)["num_classes"])


def cifar_folder(root: str, name: str) -> str:
    """The directory holding the pickle files, e.g. ``root/cifar-100-python``."""
    return os.path.join(root, _layout(name)["folder"])


def _expected_files(name: str) -> list[str]:
    layout = _layout(name)
    return layout["train_files"] + layout["test_files"] + [layout["meta"]]


def _try_download(root: str, name: str) -> None:
    """Fetch and unpack the official archive into ``root``; DatasetError if impossible."""
    layout = _layout(name)
    folder = cifar_folder(root, name)
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        os.makedirs(root, exist_ok=True)
        download_and_extract_archive(
            layout["url"], download_root=root, md5=layout["archive_md5"]
        )
    except Exception as exc:  # no network, proxy, disk full: all end the same way
        raise DatasetError(
            f"{name} not found at {folder} and the download failed ({type(exc).__name__}); "
            f"download {layout['url']} and unpack it into {root} (giving {folder})"
        ) from exc


def _read_pickle(path: str, name: str) -> dict[str, Any]:
    """Load one pickle file; keys are returned as str whether stored as bytes or str."""
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise _layout_error(os.path.dirname(path), name, f"cannot read {path}") from exc
    if not isinstance(raw, dict):
        raise _layout_error(os.path.dirname(path), name, f"{path} is not a pickled dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _layout_error(folder: str, name: str, problem: str) -> DatasetError:
    expected = ", ".join(_expected_files(name))
    return DatasetError(
        f"{name} at {folder} is malformed ({problem}); expected the official "
        f"python-pickle files {expected} (re-download {_layout(name)['url']})"
    )


def _as_pixels(values: Any, path: str, folder: str, name: str) -> np.ndarray:
    """``values`` as uint8 pixels; a DatasetError for anything but integers in 0-255.

    A plain cast would turn float pixels in [0, 1) into black images without a word.
    """
    data = np.asarray(values)
    if data.dtype == np.uint8:
        return data
    if data.dtype.kind not in "iu":
        raise _layout_error(folder, name, f"{path} has pixels of dtype {data.dtype}, expected uint8 values 0-255")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise _layout_error(folder, name, f"{path} has {data.dtype} pixels outside 0-255")
    return data.astype(np.uint8)


def _as_labels(values: Any, path: str, folder: str, name: str) -> np.ndarray:
    """``values`` as int64 labels; a DatasetError for non-integers."""
    labels = np.asarray(values)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise _layout_error(folder, name, f"{path} has labels of dtype {labels.dtype} and shape {labels.shape}, "
                                          "expected a list of integers")
    return labels.astype(np.int64)


def _decode_batch(entry: dict[str, Any], path: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3072) row-major R,G,B planes -> (N, 32, 32, 3) uint8 and (N,) int64 labels."""
    folder = os.path.dirname(path)
    label_key = _layout(name)["label_key"]
    if "data" not in entry or label_key not in entry:
        raise _layout_error(folder, name, f"{path} lacks the keys 'data' and {label_key!r}")
    data = _as_pixels(entry["data"], path, folder, name)
    labels = _as_labels(entry[label_key], path, folder, name)
    if data.ndim != 2 or data.shape[1] != _IMAGE_BYTES or data.shape[0] != labels.shape[0]:
        raise _layout_error(
            folder, name, f"{path} has data of shape {data.shape} for {labels.shape[0]} labels"
        )
    n_classes = num_classes(name)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise _layout_error(folder, name, f"{path} has labels outside [0, {n_classes})")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load_cifar(
    root: str, name: str, train: bool, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Read one split of CIFAR-10/100.

    Returns images uint8 (N, 32, 32, 3) and labels int64 (N,).
    Raises DatasetError when the folder is missing (after a failed download) or malformed.
    """
    layout = _layout(name)
    folder = cifar_folder(root, name)
    if not os.path.isdir(folder):
        if not download:
            raise DatasetError(
                f"{name} not found at {folder}; download {layout['url']} and unpack it "
                f"into {root} (or pass a --data directory that holds {layout['folder']}/)"
            )
        _try_download(root, name)
    files = layout["train_files"] if train else layout["test_files"]
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise _layout_error(folder, name, f"missing {', '.join(missing)}")
    paths = [os.path.join(folder, f) for f in files]
    parts = [_decode_batch(_read_pickle(path, name), path, name) for path in paths]
    images = np.concatenate([p[0] for p in parts], axis=0)
    labels = np.concatenate([p[1] for p in parts], axis=0)
    return images, labels


def write_cifar100(root: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> str:
    """Write (images uint8 (N, 32, 32, 3), labels (N,)) splits as ``root/cifar-100-python``, official layout.

    Text keys and CHW-flattened rows, as in the released files, so torchvision's CIFAR100 reads them
    too. Returns the folder written.
    """
    folder = cifar_folder(root, "cifar100")
    os.makedirs(folder, exist_ok=True)
    for name, (images, labels) in (("train", train), ("test", test)):
        rows = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 3, 1, 2)).reshape(len(images), -1)
        entry = {"data": rows, "fine_labels": [int(v) for v in labels], "coarse_labels": [0] * len(labels)}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{i}" for i in range(100)], "coarse_label_names": ["all"]}, f,
                    protocol=2)
    return folder
