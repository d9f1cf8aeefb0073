"""CIFAR augmentation (RandomCrop(32, padding=4) + RandomHorizontalFlip) with explicit randomness.

The random choices of a batch are a pure function of (seed, epoch, batch index):
augment_params draws, for the whole GLOBAL batch, crop offsets (dy, dx) in
[0, 2*padding] and flip flags. Two implementations apply them and give the same
float32 pixels bit for bit:

- the PIL path (CifarTrainDataset + AugmentedBatchSampler through a DataLoader),
  made of the very torchvision functional ops that the original's Compose calls;
- the batched tensor path (augment_batch), which pads in uint8 with zeros and crops
  and flips by indexing the whole batch at once, on any device.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from data.samplers import ForwardsSamplerState, MPerClassBatchSampler, rank_slice

AugmentedIndex = tuple[int, int, int, bool]  # (dataset index, dy, dx, flip)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixing non-negative integers (e.g. seed, epoch, batch index)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & ((1 << 63) - 1)


def augment_params(
    seed: int, epoch: int, batch_index: int, batch_size: int, padding: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets (B, 2) int64 in [0, 2*padding] as (dy, dx), and flips (B,) bool."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, batch_index))
    offsets = torch.randint(0, 2 * padding + 1, (batch_size, 2), generator=generator)
    flips = torch.rand(batch_size, generator=generator) < 0.5
    return offsets, flips


# ---- PIL path ---------------------------------------------------------------------------


def _normalize_tensor(
    image: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    return TF.normalize(image, list(mean), list(std))


class CifarTrainDataset(torch.utils.data.Dataset):
    """Items are (image (3, 32, 32) float32, label int) for a key (index, dy, dx, flip).

    The image is padded with `padding` zero pixels, cropped at (dy, dx), optionally
    flipped, scaled to [0, 1] and normalised: the original's transforms with the
    random draws given explicitly. A plain int key gives the unaugmented image.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int = 4,
    ) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.padding = padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | AugmentedIndex) -> tuple[torch.Tensor, int]:
        if isinstance(key, (tuple, list)):
            index, dy, dx, flip = key
        else:
            index, dy, dx, flip = int(key), self.padding, self.padding, False
        image = Image.fromarray(self.images[index])
        height, width = self.images[index].shape[:2]
        image = TF.pad(image, self.padding, fill=0)
        image = TF.crop(image, int(dy), int(dx), height, width)
        if flip:
            image = TF.hflip(image)
        return _normalize_tensor(TF.to_tensor(image), self.mean, self.std), int(self.labels[index])


class CifarTestDataset(torch.utils.data.Dataset):
    """Items are (image (3, 32, 32) float32 normalised, label int); no augmentation."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = TF.to_tensor(Image.fromarray(self.images[index]))
        return _normalize_tensor(image, self.mean, self.std), int(self.labels[index])


class AugmentedBatchSampler(ForwardsSamplerState):
    """Wraps an MPerClassBatchSampler; yields lists of (index, dy, dx, flip) for CifarTrainDataset.

    The parameters are drawn for the global batch and sliced like the indices, so an
    image gets the same crop and flip whatever the number of ranks or workers.
    """

    def __init__(
        self,
        batch_sampler: MPerClassBatchSampler,
        seed: int,
        image_size: int = 32,
        padding: int = 4,
    ) -> None:
        self.batch_sampler = batch_sampler
        self.seed = int(seed)
        self.image_size = image_size  # kept for clarity: crops have the input's size
        self.padding = padding

    def __iter__(self) -> Iterator[list[AugmentedIndex]]:
        sampler = self.batch_sampler
        local = rank_slice(sampler.batch_size, sampler.rank, sampler.world_size)
        for batch_index, indices in sampler.indexed_batches():
            offsets, flips = augment_params(
                self.seed, sampler.epoch, batch_index, sampler.batch_size, self.padding
            )
            dy, dx = offsets[local, 0].tolist(), offsets[local, 1].tolist()
            yield list(zip(indices, dy, dx, flips[local].tolist()))

    def __len__(self) -> int:
        return len(self.batch_sampler)

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch



def reference_cifar_transforms(mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """The original's training Compose, drawing from torch's global RNG (benchmark baseline)."""
    return transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(list(mean), list(std)),
    ])


# ---- batched tensor path -----------------------------------------------------------------


def _to_nhwc(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) or (B, 3, H, W) -> (B, H, W, 3) view."""
    if images.dim() != 4:
        raise ValueError(
            f"expected images (B, H, W, 3) or (B, 3, H, W), got {tuple(images.shape)}"
        )
    if images.shape[-1] == 3 and images.shape[1] != 3:
        return images
    if images.shape[1] == 3:
        return images.permute(0, 2, 3, 1)
    raise ValueError(f"cannot find the 3 colour channels in shape {tuple(images.shape)}")


def normalize_batch(
    images_nhwc: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, H, W) normalised, in float32 like ToTensor + Normalize.

    ``mean``/``std``: 3 values, or float32 (3,) tensors already on the images' device (then
    nothing is copied from the host).
    """
    x = _to_nhwc(images_nhwc)
    # Elementwise in NHWC order (same per-pixel float32 ops, so same bits as the PIL path);
    # the permuted result is already channels_last.
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    x = x.to(torch.float32).div(255).sub(mean_t).div(std_t).permute(0, 3, 1, 2)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(dtype=out_dtype, memory_format=memory_format)


def crop_and_flip(
    images_nhwc: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int = 4
) -> torch.Tensor:
    """Zero-pad by `padding`, crop (H, W) at offsets (B, 2) = (dy, dx), flip where flips (B,).

    uint8 (B, H, W, C) in and out; one gather for the whole batch. Offsets and flips on
    another device are copied to the images' (pass them on that device to copy nothing).
    """
    b, h, w, c = images_nhwc.shape
    device = images_nhwc.device
    padded = images_nhwc.new_zeros((b, h + 2 * padding, w + 2 * padding, c))
    padded[:, padding:padding + h, padding:padding + w] = images_nhwc
    offsets = offsets.to(device=device, dtype=torch.long)
    flips = flips.to(device=device, dtype=torch.bool)
    row_steps = torch.arange(h, device=device)
    col_steps = torch.arange(w, device=device)
    rows = offsets[:, :1] + row_steps  # (B, H)
    cols = offsets[:, 1:] + torch.where(flips[:, None], col_steps.flip(0), col_steps)  # (B, W)
    # One flat gather of whole pixels (C bytes each) from the padded batch.
    padded_h, padded_w = h + 2 * padding, w + 2 * padding
    image_rows = torch.arange(b, device=device)[:, None] * padded_h + rows  # (B, H)
    flat = image_rows[:, :, None] * padded_w + cols[:, None, :]  # (B, H, W)
    return padded.view(-1, c)[flat.view(-1)].view(b, h, w, c)


def augment_batch(
    images: torch.Tensor,
    offsets: torch.Tensor,
    flips: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    padding: int = 4,
) -> torch.Tensor:
    """uint8 images (B, 32, 32, 3) or (B, 3, 32, 32) -> augmented, normalised (B, 3, 32, 32).

    Same pixels as CifarTrainDataset for the same (offsets, flips), on any device.
    """
    cropped = crop_and_flip(_to_nhwc(images), offsets, flips, padding)
    return normalize_batch(cropped, mean, std, out_dtype, channels_last)
