"""scripts/benchmark_original.py against a stand-in for the authors' repository (no timing asserts).

The stand-in has what the harness relies on in the real one: a main_cifar.py that parses the
README's flags, reads CIFAR-100 through torchvision with ``download=True``, calls ``.cuda()`` on
its model and tensors, uses ``numpy.int`` and trains with SGD for ever; and a ``models`` package
whose architecture names differ in case from this project's (``WRN_16_2``).
"""
import json
import textwrap

from tests.script_helpers import load_script, run_in_process

TINY = ["--batch-size", "8", "--synthetic-size", "320", "--steps", "1", "--warmup", "1", "--repeats", "2",
        "--threads", "1"]

FAKE_MAIN = '''
import argparse
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms
import models

p = argparse.ArgumentParser()
p.add_argument("--data", default="./data/")
p.add_argument("--arch", default="resnet32")
p.add_argument("--number-net", type=int, default=2)
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--manual_seed", type=int, default=0)
for name in ("--alpha", "--gamma", "--beta", "--lam"):
    p.add_argument(name, type=float, default=0.0)
args = p.parse_args()
trainset = torchvision.datasets.CIFAR100(root=args.data, train=True, download=True,
                                         transform=transforms.ToTensor())
assert np.array([1], dtype=np.int).dtype.kind == "i"
loader = torch.utils.data.DataLoader(trainset, batch_size=args.batch_size, shuffle=True)
net = getattr(models, args.arch)(num_classes=100, number_net=args.number_net).cuda()
optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
for epoch in range(1000):
    for inputs, targets in loader:
        inputs, targets = inputs.float().cuda(), targets.cuda()
        optimizer.zero_grad()
        loss = F.cross_entropy(net(inputs), targets) + 0 * torch.eye(2).cuda().sum()
        loss.backward()
        optimizer.step()
        print("batch", loss.item())
'''

FAKE_MODELS = '''
import torch.nn as nn


def WRN_16_2(num_classes, number_net):
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, num_classes))
'''


def fake_original(tmp_path):
    root = tmp_path / "MCL"
    (root / "models").mkdir(parents=True)
    (root / "main_cifar.py").write_text(textwrap.dedent(FAKE_MAIN))
    (root / "models" / "__init__.py").write_text(textwrap.dedent(FAKE_MODELS))
    return str(root)


def run_script(*args):
    """scripts/benchmark_original.py ``args``, in this process (it starts the original's process itself)."""
    return run_in_process(load_script("benchmark_original").main, list(args))


def test_times_the_original_and_the_projects_modes(tmp_path):
    # --modes reference: the fast mode is benchmark.py's own step (tests/scripts/test_benchmark.py), and bf16
    # is emulated, and slow, on CPUs without AVX512-BF16.
    out = run_script("--original", fake_original(tmp_path), "--arch", "wrn_16_2", "--modes", "reference", *TINY)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert [line.get("mode") for line in lines] == ["original", "reference", None]
    for line in lines[:2]:
        assert line["images_per_s"] > 0 and len(line["images_per_s_rounds"]) == 2
        assert line["threads"] == 1 and line["batch_size"] == 8 and line["arch"] == "wrn_16_2"
    summary = lines[2]
    ratio = lines[1]["images_per_s"] / lines[0]["images_per_s"]
    assert abs(summary["ratio_reference_over_original"] - ratio) < 1e-9
    assert summary["original_commit"] is None  # not a git checkout
    assert summary["command"].startswith("python scripts/benchmark_original.py --original")


def test_an_architecture_the_original_lacks_is_one_line(tmp_path):
    out = run_script("--original", fake_original(tmp_path), "--arch", "resnet32", "--modes", "none", *TINY)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "the original code has no architecture 'resnet32'" in out.stderr


def test_bad_inputs_are_one_line(tmp_path):
    for args, words in (((["--original", str(tmp_path)]), "has no main_cifar.py"),
                        (["--original", fake_original(tmp_path), "--synthetic-size", "40"], "batches of")):
        out = run_script(*args, *TINY[:2])
        assert out.returncode == 2 and words in out.stderr and out.stderr.count("\n") == 1, out.stderr
