"""utils/metrics.py and the evaluations built on it: sums stay on the device and are read once."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import distributed as du
from utils.lincls import evaluate as lincls_evaluate
from utils.metrics import AccuracyCounter, reduce_accuracy
from utils.precision import Precision
from utils.supervised import evaluate_cohort

READS = ("tolist", "item", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """A list that collects the name of every tensor-to-host read (tolist, item, float(), ...)."""
    seen = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _name=name, _original=original, **kwargs):
            seen.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return seen


class LinearPair(nn.Module):
    """A two-network 'cohort' of linear layers: (logits list, features)."""

    number_net = 2

    def __init__(self) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nn.Linear(5, 4) for _ in range(2))

    def forward(self, x):
        return [net(x) for net in self.nets], None


def _batches(count: int = 3, size: int = 6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 5, generator=g), torch.randint(0, 4, (size,), generator=g)) for _ in range(count)]


def _top1(logits: torch.Tensor, targets: torch.Tensor) -> int:
    return int((logits.argmax(1) == targets).sum())


def test_reduce_accuracy_takes_numbers_or_device_sums_alike():
    counter = AccuracyCounter(2)
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    counter.update([logits, -logits], torch.tensor([0, 1]))
    as_numbers = reduce_accuracy(counter, torch.device("cpu"), [1.5, 4.0])
    as_tensors = reduce_accuracy(counter, torch.device("cpu"), [torch.tensor(1.5), torch.tensor(4.0).double()])
    assert as_numbers == as_tensors == ([50.0, 0.0], [100.0, 100.0], 2, [1.5, 4.0])
    assert reduce_accuracy(AccuracyCounter(1), torch.device("cpu")) == ([0.0], [0.0], 0, [])


def test_cohort_evaluation_reads_the_device_once(host_reads):
    torch.manual_seed(0)
    cohort, batches = LinearPair(), _batches()
    result = evaluate_cohort(cohort, batches, torch.device("cpu"), Precision())
    assert host_reads == ["tolist"]  # one read for three batches
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits, _ = cohort(x)
    loss_sum = sum(float(sum(F.cross_entropy(z[i:i + 6], y[i:i + 6], reduction="sum") for z in logits))
                   for i in range(0, 18, 6))  # the per-batch host sums this evaluation used to make
    assert result["loss"] == loss_sum / 18 / 2
    assert result["top1"] == [100.0 * _top1(z, y) / 18 for z in logits]
    assert result["ens_top1"] == 100.0 * _top1(sum(logits) / 2, y) / 18 and result["images"] == 18


def test_linear_evaluation_reads_the_device_once(host_reads):
    torch.manual_seed(0)
    model, batches = nn.Linear(5, 4), _batches()
    result = lincls_evaluate(model, batches, du.DistContext(), precision=Precision())
    assert host_reads == ["tolist"]
    with torch.no_grad():
        means = [float(F.cross_entropy(model(x), y)) for x, y in batches]
        hits = sum(_top1(model(x), y) for x, y in batches)
    assert result["loss"] == sum(m * 6 for m in means) / 18  # the former SumMeter's arithmetic
    assert result["top1"] == [100.0 * hits / 18]


def test_knn_monitor_reads_the_device_once_in_one_process(host_reads):
    from tests.models.test_moco import tiny_model
    from tests.moco_ddp_check import KNN_CLASSES, knn_split
    from utils import knn

    torch.manual_seed(0)
    model = tiny_model(number_net=2)
    # lists of batches: a DataLoader's iterator draws its seed with item(), on the host anyway
    loaders = [list(torch.utils.data.DataLoader(ds, batch_size=4)) for ds in (knn_split(12, 1), knn_split(5, 2))]
    host_reads.clear()
    knn.knn_top1(model, (*loaders, KNN_CLASSES), torch.device("cpu"), 0, k=3, t=0.1)
    assert host_reads == ["tolist"]
