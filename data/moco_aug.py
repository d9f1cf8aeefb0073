"""MoCo augmentations: two random views of one image (query, key).

v1 (default) is InstDisc's: RandomResizedCrop(scale 0.2-1), grayscale p=0.2,
ColorJitter(0.4, 0.4, 0.4, 0.4), flip. v2 (``--aug-plus``) is SimCLR-like:
crop, ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur
(sigma in [0.1, 2]) with p=0.5, flip. ``image_size`` is 224 for the paper; tests
use 32 or 64.

The original blurred with PIL's ``GaussianBlur(radius=sigma)``; here
torchvision's v2 ``GaussianBlur`` with a kernel of 2*ceil(3*sigma_max)+1 = 13
pixels, which holds the Gaussian out to three standard deviations.
"""
import math
import os
from typing import Callable, List, Tuple

import torch
from data.image_folder import TolerantImageFolder
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BLUR_SIGMA = (0.1, 2.0)


def to_normalised_tensor() -> List[Callable]:
    """PIL image -> float tensor (3, H, W) normalised with ImageNet statistics."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def gaussian_blur(sigma: Tuple[float, float] = BLUR_SIGMA) -> v2.GaussianBlur:
    """Blur with sigma drawn uniformly from ``sigma`` for every image."""
    kernel = 2 * math.ceil(3 * sigma[1]) + 1
    return v2.GaussianBlur(kernel_size=kernel, sigma=sigma)


def moco_v1_augmentation(image_size: int = 224) -> v2.Compose:
    """MoCo v1 view (InstDisc augmentation)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
            v2.RandomGrayscale(p=0.2),
            v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
            v2.RandomHorizontalFlip(),
            *to_normalised_tensor(),
        ]
    )


def moco_v2_augmentation(image_size: int = 224) -> v2.Compose:
    """MoCo v2 view (``--aug-plus``)."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([gaussian_blur()], p=0.5),
            v2.RandomHorizontalFlip(),
            *to_normalised_tensor(),
        ]
    )


def moco_augmentation(aug_plus: bool, image_size: int = 224) -> v2.Compose:
    """v2 augmentation if ``aug_plus`` else v1."""
    return moco_v2_augmentation(image_size) if aug_plus else moco_v1_augmentation(image_size)


class TwoCropsTransform:
    """Apply ``base_transform`` twice to one image: returns [query view, key view]."""

    def __init__(self, base_transform: Callable) -> None:
        self.base_transform = base_transform

    def __call__(self, image) -> List[torch.Tensor]:
        return [self.base_transform(image), self.base_transform(image)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_transform!r})"


def linear_train_transform(image_size: int = 224) -> v2.Compose:
    """Linear-evaluation training view: RandomResizedCrop + flip (the original's)."""
    return v2.Compose(
        [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *to_normalised_tensor()]
    )


def center_crop_transform(image_size: int = 224, resize_ratio: float = 256 / 224) -> v2.Compose:
    """Evaluation view: Resize(256) + CenterCrop(224), scaled to ``image_size``."""
    resize = int(round(image_size * resize_ratio))
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *to_normalised_tensor()])


# ----------------------------------------------------------------------------- loading

def image_folder(root: str, split: str, transform: Callable, progress: bool = False) -> TolerantImageFolder:
    """``root/split`` as an ImageFolder that skips unreadable images (data.image_folder); DatasetError when
    it is missing or empty. ``progress``: a bar while the class folders are listed."""
    from utils.errors import DatasetError

    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DatasetError(
            f"{path} is not a directory; --data must hold {split}/<class>/<image> folders (ImageNet layout)"
        )
    try:
        return TolerantImageFolder(path, transform, progress=progress)
    except (FileNotFoundError, RuntimeError) as err:
        raise DatasetError(f"no images found under {path} ({err}); expected {split}/<class>/<image>.JPEG") from None
