"""Datasets, samplers and augmentation for MCL.

Training data is a pure function of (seed, epoch, batch index): samplers and
augmentation parameters are drawn from generators seeded with those numbers, so
runs resume bitwise-exactly and the PIL path and the fast tensor path agree.
"""

from data.augment import (
    AugmentedBatchSampler,
    CifarTestDataset,
    CifarTrainDataset,
    augment_batch,
    augment_params,
    crop_and_flip,
    derive_seed,
    normalize_batch,
    reference_cifar_transforms,
)
from data.cifar import DATASET_STATS, cifar_folder, load_cifar, num_classes
from data.imagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderWithContrastIndices,
    check_image_folder,
    class_ranges,
    imagenet_eval_transform,
    imagenet_train_transform,
    sample_negatives,
    sample_positives,
)
from data.samplers import MPerClassBatchSampler, ShardedEvalSampler, rank_slice
from data.synthetic import SYNTHETIC_STATS, make_synthetic
from data.tensor_loader import TensorBatchLoader

__all__ = [
    "AugmentedBatchSampler",
    "CifarTestDataset",
    "CifarTrainDataset",
    "DATASET_STATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolderWithContrastIndices",
    "MPerClassBatchSampler",
    "SYNTHETIC_STATS",
    "ShardedEvalSampler",
    "TensorBatchLoader",
    "augment_batch",
    "augment_params",
    "check_image_folder",
    "cifar_folder",
    "class_ranges",
    "crop_and_flip",
    "derive_seed",
    "imagenet_eval_transform",
    "imagenet_train_transform",
    "load_cifar",
    "make_synthetic",
    "normalize_batch",
    "num_classes",
    "rank_slice",
    "reference_cifar_transforms",
    "sample_negatives",
    "sample_positives",
]
