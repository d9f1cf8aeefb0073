"""A small learnable stand-in for CIFAR, generated from a seed (no download needed).

Each class has a prototype: a base colour plus a few low-frequency cosine
patterns per channel. An image is its class prototype, mixed with a random other
class's prototype (weight up to 0.5), circularly shifted by up to +-4 pixels,
with a random contrast/brightness change and Gaussian pixel noise. A small CNN
learns it well above chance in a few hundred steps, but the mixing and noise keep
it from being trivially separable.

Normalisation: the pixels are built around 0.5 with a spread near 0.25, so
SYNTHETIC_STATS uses the fixed mean 0.5 and std 0.25 per channel (fixed, so that
train and test and every seed share them).
"""

from __future__ import annotations

import numpy as np

SYNTHETIC_STATS: dict[str, tuple[float, float, float]] = {
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
}

_NUM_PATTERNS = 4  # cosine patterns per channel and class
_MAX_FREQ = 3  # cycles per image, so patterns stay low-frequency
_MAX_SHIFT = 4
_MAX_MIX = 0.5
_NOISE_STD = 0.2
_CHUNK = 1024  # images generated at once; fixed so the output never depends on it


def _class_prototypes(rng: np.random.Generator, num_classes: int, size: int) -> np.ndarray:
    """(C, size, size, 3) float32 prototypes with values around 0.5."""
    coords = np.arange(size, dtype=np.float64) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    base = rng.uniform(0.3, 0.7, size=(num_classes, 1, 1, 3))
    freq = rng.integers(0, _MAX_FREQ + 1, size=(num_classes, 3, _NUM_PATTERNS, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(num_classes, 3, _NUM_PATTERNS))
    amp = rng.uniform(0.04, 0.12, size=(num_classes, 3, _NUM_PATTERNS))
    arg = (
        2 * np.pi * (freq[..., 0, None, None] * yy + freq[..., 1, None, None] * xx)
        + phase[..., None, None]
    )
    patterns = (amp[..., None, None] * np.cos(arg)).sum(axis=2)  # (C, 3, H, W)
    return (base + patterns.transpose(0, 2, 3, 1)).astype(np.float32)


def _balanced_labels(rng: np.random.Generator, n: int, num_classes: int) -> np.ndarray:
    """(n,) int64 labels with class counts differing by at most one, in random order."""
    return rng.permutation(np.arange(n, dtype=np.int64) % num_classes)


def _roll_each(x: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Circularly shift each image x[i] (H, W, C) by shifts[i] = (dy, dx)."""
    n, h, w, _ = x.shape
    rows = (np.arange(h)[None, :] - shifts[:, :1]) % h  # (n, H)
    cols = (np.arange(w)[None, :] - shifts[:, 1:]) % w  # (n, W)
    return x[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _render_chunk(
    rng: np.random.Generator, prototypes: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Images (n, H, W, 3) uint8 for the given labels."""
    n = labels.shape[0]
    num_classes = prototypes.shape[0]
    other = (labels + rng.integers(1, max(num_classes, 2), size=n)) % num_classes
    mix = rng.uniform(0.0, _MAX_MIX, size=(n, 1, 1, 1)).astype(np.float32)
    x = (1 - mix) * prototypes[labels] + mix * prototypes[other]
    x = _roll_each(x, rng.integers(-_MAX_SHIFT, _MAX_SHIFT + 1, size=(n, 2)))
    contrast = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
    brightness = rng.uniform(-0.08, 0.08, size=(n, 1, 1, 1)).astype(np.float32)
    x = (x - 0.5) * contrast + 0.5 + brightness
    x = x + rng.normal(0.0, _NOISE_STD, size=x.shape).astype(np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def _render(
    seed: int, split: int, prototypes: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    chunks = []
    for start in range(0, labels.shape[0], _CHUNK):
        rng = np.random.default_rng([seed, split, start // _CHUNK])
        chunks.append(_render_chunk(rng, prototypes, labels[start:start + _CHUNK]))
    size = prototypes.shape[1]
    if not chunks:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.concatenate(chunks, axis=0)


def make_synthetic(
    num_train: int = 5000,
    num_test: int = 1000,
    num_classes: int = 10,
    seed: int = 0,
    image_size: int = 32,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Deterministic synthetic data set shaped like CIFAR.

    Returns ((train_images (N, S, S, 3) uint8, train_labels (N,) int64),
             (test_images (M, S, S, 3) uint8, test_labels (M,) int64)).
    Classes are balanced (counts differ by at most one).
    """
    if num_classes < 1 or num_train < 0 or num_test < 0 or image_size < 1:
        raise ValueError("make_synthetic needs num_classes >= 1, sizes >= 0")
    rng = np.random.default_rng([seed, 0])
    prototypes = _class_prototypes(rng, num_classes, image_size)
    train_labels = _balanced_labels(rng, num_train, num_classes)
    test_labels = _balanced_labels(rng, num_test, num_classes)
    train_images = _render(seed, 1, prototypes, train_labels)
    test_images = _render(seed, 2, prototypes, test_labels)
    return (train_images, train_labels), (test_images, test_labels)
