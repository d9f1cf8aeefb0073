"""utils/metrics.py: calibration (NLL, expected calibration error) against slow formulas written here."""
import math

import pytest
import torch

from utils.metrics import (CalibrationCounter, calibration_bins, ece_from_bins, expected_calibration_error,
                           negative_log_likelihood)


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
