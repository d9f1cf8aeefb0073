"""Helper of test_main_cifar: compares the DDP gradient of the gathered contrast with one process."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from losses.mcl import sup_mcl_losses
from utils import distributed as du
from utils.contrast import InBatchContrast
from data.batch import Batch

TAU, KD_T = 0.1, 3.0


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    return x, y


def _nets():
    torch.manual_seed(1)
    return [nn.Linear(5, 4).double() for _ in range(2)]


class _Pair(nn.Module):
    """Two linear 'networks' whose normalised outputs are the embeddings."""

    def __init__(self):
        super().__init__()
        self.nets = nn.ModuleList(_nets())

    def forward(self, x):
        return [nn.functional.normalize(net(x), dim=1) for net in self.nets]


def _contrast_sum(t):
    return t.vcl + t.soft_vcl + t.icl + t.soft_icl


def _worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x, y = _data()
    model = _Pair()
    ddp = nn.parallel.DistributedDataParallel(model)
    part = slice(rank * 4, rank * 4 + 4)
    emb = ddp(x[part])
    _contrast_sum(InBatchContrast(TAU, KD_T)(emb, Batch(x[part], y[part]))).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    if rank == 0:
        torch.save(grads, out_file)
    del ddp, emb  # a DDP wrapper alive at destroy_process_group can abort the exit (SIGABRT)
    du.cleanup(wait_for_all=True)


def run_check() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "grads.pt")
        mp.start_processes(_worker, args=(init_file, out_file), nprocs=2, join=True, start_method="fork")
        ddp_grads = torch.load(out_file)
    x, y = _data()
    model = _Pair()
    _contrast_sum(sup_mcl_losses(model(x), y, TAU, KD_T)).backward()
    ref = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.allclose(ddp_grads, ref, atol=1e-10), (ddp_grads - ref).abs().max()
