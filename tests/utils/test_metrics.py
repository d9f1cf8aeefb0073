"""utils/metrics.py: calibration (NLL, expected calibration error) against slow formulas written here;
the evaluations built on it keep their sums on the device and read them once."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import distributed as du
from utils.lincls import evaluate as lincls_evaluate
from utils.metrics import (AccuracyCounter, CalibrationCounter, calibration_bins, ece_from_bins,
                           expected_calibration_error, negative_log_likelihood, reduce_accuracy)
from utils.precision import Precision
from utils.supervised import evaluate_cohort


def slow_nll(logits, targets):
    total = 0.0
    for row, y in zip(logits.tolist(), targets.tolist()):
        log_norm = math.log(sum(math.exp(v) for v in row))
        total += log_norm - row[y]
    return total / len(targets)


def slow_ece(logits, targets, bins=15):
    """Guo et al.'s definition: bins ((m-1)/M, m/M]; sum over bins of |acc - conf| * n_bin / n."""
    samples = []
    for row, y in zip(logits.tolist(), targets.tolist()):
        exps = [math.exp(v) for v in row]
        probs = [e / sum(exps) for e in exps]
        conf = max(probs)
        samples.append((conf, float(probs.index(conf) == y)))
    ece = 0.0
    for m in range(1, bins + 1):
        lo, hi = (m - 1) / bins, m / bins
        members = [(c, a) for c, a in samples if lo < c <= hi]
        if members:
            acc = sum(a for _, a in members) / len(members)
            conf = sum(c for c, _ in members) / len(members)
            ece += abs(acc - conf) * len(members) / len(samples)
    return ece


@pytest.mark.parametrize("seed,classes,scale", [(0, 10, 1.0), (1, 3, 4.0), (2, 100, 0.3), (3, 2, 8.0)])
def test_nll_and_ece_match_the_slow_formulas(seed, classes, scale):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(257, classes, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(classes, (257,), generator=g)
    assert negative_log_likelihood(logits, targets) == pytest.approx(slow_nll(logits, targets), rel=1e-9)
    assert expected_calibration_error(logits, targets) == pytest.approx(slow_ece(logits, targets), abs=1e-9)
    assert expected_calibration_error(logits, targets, bins=7) == pytest.approx(slow_ece(logits, targets, 7),
                                                                                abs=1e-9)


def test_a_confidence_on_a_bin_edge_falls_in_the_lower_bin():
    # two classes, confidence exactly 0.6 = 9/15: the upper edge of bin 9 (numbered from 1)
    logits = torch.tensor([[math.log(0.6), math.log(0.4)]], dtype=torch.float64)
    stats = calibration_bins(logits, torch.tensor([0]))
    assert int(stats[0].argmax()) == 8 and stats[0].sum() == 1


def test_perfectly_calibrated_and_overconfident_predictions():
    # 10 samples at confidence 0.7 (two classes), 7 right: calibrated
    logits = torch.tensor([[math.log(0.7), math.log(0.3)]] * 10, dtype=torch.float64)
    targets = torch.tensor([0] * 7 + [1] * 3)
    assert expected_calibration_error(logits, targets) == pytest.approx(0.0, abs=1e-12)
    # confident (p ~ 1) and always wrong: ECE ~ 1
    assert expected_calibration_error(torch.tensor([[20.0, 0.0]] * 4), torch.tensor([1] * 4)) == pytest.approx(1.0)


def test_the_counter_over_batches_equals_the_whole_set():
    g = torch.Generator().manual_seed(5)
    heads = [torch.randn(90, 6, generator=g) * 3 for _ in range(2)]
    targets = torch.randint(6, (90,), generator=g)
    counter = CalibrationCounter(2)
    for start in range(0, 90, 32):
        counter.update([h[start:start + 32] for h in heads], targets[start:start + 32])
    nll, ece = counter.reduce(torch.device("cpu"))
    for i, h in enumerate(heads):
        assert nll[i] == pytest.approx(negative_log_likelihood(h, targets), rel=1e-9)
        assert ece[i] == pytest.approx(100 * expected_calibration_error(h, targets), abs=1e-9)
    assert counter.reduce(torch.device("cpu")) == (nll, ece)  # reducing does not change the counts


def test_no_samples_is_zero_not_a_division_error():
    assert ece_from_bins(torch.zeros(3, 15, dtype=torch.float64)) == 0.0
    assert CalibrationCounter(1).reduce(torch.device("cpu")) == ([0.0], [0.0])


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
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():  # batch by batch, as the evaluation ran (float32 sums differ otherwise)
        logits = [torch.cat(z) for z in zip(*(cohort(x)[0] for x, _ in batches))]
    every = list(logits) + [sum(logits) / 2]  # the networks, then the ensemble
    nll = [negative_log_likelihood(z, y) for z in every]
    ece = [100 * expected_calibration_error(z, y) for z in every]
    assert result["nll"] + [result["ens_nll"]] == pytest.approx(nll, rel=1e-9)
    assert result["ece"] + [result["ens_ece"]] == pytest.approx(ece, abs=1e-9)
    assert result["loss"] == pytest.approx((nll[0] + nll[1]) / 2, rel=1e-9)
    assert result["top1"] == [100.0 * _top1(z, y) / 18 for z in logits]
    assert result["ens_top1"] == 100.0 * _top1(sum(logits) / 2, y) / 18 and result["images"] == 18


def test_calibration_counter_reads_the_device_once(host_reads):
    g = torch.Generator().manual_seed(3)
    counter = CalibrationCounter(3)
    for _ in range(4):
        counter.update([torch.randn(8, 5, generator=g) for _ in range(3)], torch.randint(5, (8,), generator=g))
    host_reads.clear()
    counter.reduce(torch.device("cpu"))
    assert host_reads == ["tolist"]


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
