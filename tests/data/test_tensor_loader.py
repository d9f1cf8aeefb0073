"""data/tensor_loader.py with data already on a device (issue 16, defect 12) and its host copies.

No GPU here: a tensor on the ``meta`` device stands for one on a GPU (anything not on the
CPU), and pin_memory / to are recorded instead of run where a CUDA target is needed.
"""
import numpy as np
import pytest
import torch

from data import tensor_loader
from data.samplers import MPerClassBatchSampler
from data.tensor_loader import TensorBatchLoader, needs_pinning, to_device

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CUDA = torch.device("cuda")  # only named, never used: calls that would reach it are recorded


@pytest.fixture
def recorded(monkeypatch):
    """pin_memory and to record their tensors' devices and return the tensor itself."""
    calls = []

    def pin_memory(self, *args, **kwargs):
        calls.append(("pin", self.device.type))
        return self

    def to(self, *args, **kwargs):
        calls.append(("to", self.device.type, kwargs.get("non_blocking", False)))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    return calls


def test_only_cpu_tensors_bound_for_a_gpu_are_pinned():
    cpu, elsewhere = torch.zeros(2), torch.zeros(2, device="meta")
    assert needs_pinning(cpu, CUDA)
    assert not needs_pinning(cpu, torch.device("cpu"))
    assert not needs_pinning(elsewhere, CUDA)  # pin_memory of a GPU tensor raises


def test_to_device_pins_cpu_tensors_and_copies_without_blocking(recorded):
    to_device(torch.zeros(3), CUDA)
    assert recorded == [("pin", "cpu"), ("to", "cpu", True)]
    recorded.clear()
    to_device(torch.zeros(3, device="meta"), CUDA)
    assert recorded == [("to", "meta", True)]


def test_images_and_labels_on_a_device_never_pass_through_pin_memory_or_numpy(recorded):
    images = torch.zeros(6, 8, 8, 3, dtype=torch.uint8, device="meta")
    labels = torch.zeros(6, dtype=torch.long, device="meta")
    assert tensor_loader._images_on_device(images, CUDA) is images
    assert tensor_loader._labels_on_device(labels, CUDA) is labels
    assert all(call[0] == "to" for call in recorded)


def test_cpu_numpy_data_is_pinned_for_a_gpu(recorded):
    images = np.zeros((6, 8, 8, 3), dtype=np.uint8)
    tensor_loader._images_on_device(images, CUDA)
    tensor_loader._labels_on_device(np.arange(6), CUDA)
    assert recorded == [("pin", "cpu"), ("to", "cpu", True)] * 2


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_loader_over_tensors_on_another_device(train):
    """Every step of both paths runs with the data on a non-CPU device (shapes only on meta)."""
    labels = torch.arange(24) % 4
    images = torch.zeros(24, 8, 8, 3, dtype=torch.uint8, device="meta")
    if train:
        sampler = MPerClassBatchSampler(labels, 2, 8, seed=0)
        loader = TensorBatchLoader(images, labels.to("meta"), sampler, "meta", MEAN, STD, train=True, padding=2)
    else:
        loader = TensorBatchLoader.for_eval(images, labels.to("meta"), 10, "meta", MEAN, STD)
    batches = list(loader)
    assert len(batches) == len(loader) > 0
    for inputs, targets in batches:
        assert inputs.device.type == targets.device.type == "meta"
        assert inputs.shape[1:] == (3, 8, 8) and inputs.dtype == torch.float32 and targets.dtype == torch.int64


def test_normalising_with_device_statistics_gives_the_same_bits():
    from data.augment import normalize_batch

    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    as_tuple = normalize_batch(images, MEAN, STD)
    as_tensor = normalize_batch(images, torch.tensor(MEAN), torch.tensor(STD))
    assert torch.equal(as_tuple, as_tensor)
