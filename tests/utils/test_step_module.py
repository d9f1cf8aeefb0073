"""--compile and --sync-bn (utils/step_module.py): the step's module changes, the checkpoints do not.

torch.compile's inductor backend generates and builds C++ on CPU, tens of seconds per graph
on two cores; these tests set MCL_COMPILE_BACKEND to aot_eager (Dynamo's graph capture and
AOTAutograd's joint forward/backward graph, run by the eager kernels) or eager (graph capture
only), which goes through the same wiring (the compiled DDP wrapper, the compiled losses)
in a few seconds. scripts/gpu_check.sh runs the scripts with inductor on a GPU.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import main_cifar
import main_imagenet
import main_lincls
import main_moco_mcl
from utils import distributed as du
from utils.checkpoint import load_checkpoint
from utils.errors import ConfigError
from utils.step_module import BACKEND_ENV, compiled_function, convert_sync_bn, step_module
from tests.two_nodes import free_port

TINY_CIFAR = ["--dataset", "synthetic", "--synthetic-size", "64", "--synthetic-classes", "4", "--batch-size", "8",
              "--m-per-class", "2", "--epochs", "1", "--max-train-batches", "2", "--max-eval-batches", "1",
              "--eval-batch-size", "16", "--num-workers", "0", "--no-progress", "--device", "cpu",
              "--arch", "wrn_16_2", "--number-net", "2", "--alpha", "0.1", "--gamma", "1.", "--beta", "0.1",
              "--lam", "1.", "--save-every-steps", "0"]


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


@pytest.fixture
def one_rank_group():
    """A gloo process group of this one process (DDP runs its real hooks and all-reduces)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield du.DistContext(device=torch.device("cpu"), distributed=True)
    finally:
        dist.destroy_process_group()


def train_three_steps(model: nn.Module, step: nn.Module) -> None:
    """bf16 autocast, channels_last inputs, SGD with momentum: what --fast runs."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 3, 8, 8, generator=generator).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 4, (8,), generator=generator)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = step(x)
        loss = compiled_function(nn.functional.cross_entropy, isinstance(step, torch._dynamo.OptimizedModule))
        loss(logits.float(), y).backward()
        optimizer.step()


def test_compiled_ddp_step_trains_exactly_like_eager_and_keeps_the_state_keys(one_rank_group, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "aot_eager")
    states = []
    for compile in (False, True):
        model = tiny_net().to(memory_format=torch.channels_last)
        step = step_module(model, one_rank_group, compile=compile)
        assert isinstance(step, torch._dynamo.OptimizedModule) == compile
        train_three_steps(model, step)
        states.append(model.state_dict())
    eager, compiled = states
    assert list(eager) == list(compiled) and "0.weight" in compiled  # no "_orig_mod." or "module." prefix
    for key in eager:
        assert torch.equal(eager[key], compiled[key]), key
    torch._dynamo.reset()


def test_main_cifar_compile_writes_the_checkpoint_an_eager_run_writes(tmp_path, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "eager")
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        argv = TINY_CIFAR + ["--checkpoint-dir", str(tmp_path), "--run-name", name, *extra]
        assert main_cifar.main(argv) == 0
    torch._dynamo.reset()
    eager, compiled = (load_checkpoint(str(tmp_path / n / "checkpoint.pth.tar")) for n in ("eager", "compiled"))
    assert compiled["config"]["compile"] is True
    for part in ("model", "heads"):
        assert list(eager[part]) == list(compiled[part])
        for key in eager[part]:
            torch.testing.assert_close(eager[part][key], compiled[part][key], rtol=1e-5, atol=1e-6, msg=key)


def test_compile_may_change_on_resume(tmp_path, monkeypatch):
    """A run started without --compile continues with it (how it runs, not what it computes)."""
    monkeypatch.setenv(BACKEND_ENV, "eager")
    argv = TINY_CIFAR + ["--checkpoint-dir", str(tmp_path), "--run-name", "r", "--max-train-batches", "1"]
    assert main_cifar.main(argv) == 0
    assert main_cifar.main(argv + ["--epochs", "2", "--resume", "--compile", "--sync-bn"]) == 0
    torch._dynamo.reset()
    assert load_checkpoint(str(tmp_path / "r" / "checkpoint.pth.tar"))["epoch"] == 2


def test_sync_bn_converts_every_batchnorm_in_place_with_the_same_parameters_and_keys():
    model = nn.Sequential(tiny_net(), nn.BatchNorm1d(4))
    keys = list(model.state_dict())
    weight = model[0][1].weight
    assert convert_sync_bn(model, distributed=True, device=torch.device("cuda")) is None  # converting needs no GPU
    assert isinstance(model[0][1], nn.SyncBatchNorm) and isinstance(model[1], nn.SyncBatchNorm)
    assert model[0][1].weight is weight  # an optimizer built before still trains it
    assert list(model.state_dict()) == keys


def test_sync_bn_in_one_process_is_a_note_and_changes_nothing(capsys):
    model = tiny_net()
    ctx = du.DistContext(device=torch.device("cpu"))
    assert step_module(model, ctx, sync_bn=True) is model
    assert type(model[1]) is nn.BatchNorm2d
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "--sync-bn changes nothing in one process" in out


def test_sync_bn_under_a_cpu_process_group_is_refused_in_one_line():
    ctx = du.DistContext(device=torch.device("cpu"), distributed=True, world_size=2)
    with pytest.raises(ConfigError, match="--sync-bn needs CUDA"):
        step_module(tiny_net(), ctx, sync_bn=True)


@pytest.mark.parametrize("script,flags", [(main_cifar, ("--compile", "--sync-bn")),
                                          (main_imagenet, ("--compile", "--sync-bn")),
                                          (main_moco_mcl, ("--compile",)), (main_lincls, ("--compile",))],
                         ids=["cifar", "imagenet", "moco", "lincls"])
def test_flags_are_in_help_and_off_by_default(script, flags):
    parser = script.build_parser()
    help_text = parser.format_help()
    defaults = parser.parse_args([])
    for flag in flags:
        assert flag in help_text
        assert getattr(defaults, flag[2:].replace("-", "_")) is False
    assert ("--sync-bn" in help_text) == ("--sync-bn" in flags)
