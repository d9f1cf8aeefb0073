import os
import sys

import pytest

from tests import ROOT

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The suite's models are tiny: one intra-op thread is faster than two on a shared
# 2-core machine (two busy-waiting OpenMP threads per process thrash when several
# processes run), and it keeps results independent of the machine's core count.
# Subprocesses the tests start inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS, which torch reads at import)

from tests.fake_runs import write_runs  # noqa: E402

torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (minutes each; left out of the default run)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: the CUDA variant of a test (skipped without a GPU); "
                                       "scripts/gpu_check.sh runs `pytest -m cuda` on a GPU")
    config.addinivalue_line("markers", "slow: minutes on 2 cores; skipped unless pytest runs with --slow")


# The longest modules (a minute or more of one worker's time) start first, so that under pytest-xdist
# (scripts/test.sh) no worker is left running one of them alone at the end.
LONG_MODULES = ("tests/scripts/test_gpu_check.py", "tests/test_main_cifar_lmcl.py", "tests/test_main_moco_lincls.py",
                "tests/utils/test_loop.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in LONG_MODULES)  # stable: the rest keep order
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow (minutes): run with --slow, e.g. bash scripts/test.sh --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# A test that takes ``device`` runs on the CPU and, marked ``cuda``, on the GPU when there is one.
CUDA_PARAM = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                               reason="no CUDA device")])


@pytest.fixture(params=["cpu", CUDA_PARAM])
def device(request):
    return torch.device(request.param)


@pytest.fixture
def runs_root(tmp_path):
    """Run directories of known curves (tests/fake_runs.py): three seeds of a baseline and of MCL(×2)."""
    return write_runs(str(tmp_path / "runs"))


@pytest.fixture(scope="session")
def moco_two_ranks(tmp_path_factory):
    """What 2 gloo ranks saved after MoCo's distributed checks (tests/moco_ddp_check.py), run once."""
    from tests.moco_ddp_check import run_two_ranks

    return run_two_ranks(str(tmp_path_factory.mktemp("moco_two_ranks")))
