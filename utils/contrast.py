"""Contrast objects plugged into the engine: how MCL terms are computed for a batch."""
from typing import List

import torch
import torch.nn as nn

from losses.mcl import MCLLosses, sup_mcl_losses
from losses.memory import init_memory, memory_mcl_losses, update_memories
from utils.distributed import all_gather_grad, all_gather_nograd


class InBatchContrast:
    """CIFAR's supervised MCL over the global batch (docs/method.md §2).

    Under DDP the embeddings of every rank are gathered with gradient and the labels
    without, so every rank computes the loss of the whole global batch, exactly as
    one process would (see utils.distributed.all_gather_grad for the gradient).
    """

    def __init__(self, tau: float, kd_T: float) -> None:
        self.tau = tau
        self.kd_T = kd_T
        self.losses = sup_mcl_losses  # --compile replaces it with its compiled version

    def __call__(self, embeddings: List[torch.Tensor], batch) -> MCLLosses:
        labels = all_gather_nograd(batch.targets)
        gathered = [all_gather_grad(e) for e in embeddings]
        return self.losses(gathered, labels, self.tau, self.kd_T)


class MemoryContrast(nn.Module):
    """ImageNet's supervised MCL against one memory bank per network (docs/method.md §3).

    The banks are buffers ``memory_0 ... memory_{N-1}``, each (n_data, feat_dim), so
    ``state_dict``/``load_state_dict`` save and restore them with the checkpoint. They
    start from a generator seeded with ``seed`` (equal on every process). The loss uses
    the local batch only (its pos_idx/neg_idx index the banks); after the optimizer step
    :meth:`after_step` applies the momentum update from the batch gathered over all
    processes, so every process keeps identical banks.
    """

    def __init__(self, number_net: int, n_data: int, feat_dim: int, tau: float, kd_T: float, momentum: float,
                 seed: int = 0) -> None:
        super().__init__()
        self.number_net = number_net
        self.tau = tau
        self.kd_T = kd_T
        self.momentum = momentum
        self.losses = memory_mcl_losses  # --compile replaces it with its compiled version
        generator = torch.Generator().manual_seed(seed)
        for n in range(number_net):
            self.register_buffer(f"memory_{n}", init_memory(n_data, feat_dim, generator=generator))

    @property
    def memories(self) -> List[torch.Tensor]:
        """The N banks, each (n_data, feat_dim)."""
        return [getattr(self, f"memory_{n}") for n in range(self.number_net)]

    def forward(self, embeddings: List[torch.Tensor], batch) -> MCLLosses:
        """embeddings: N (B, feat_dim) L2-normalised; batch.pos_idx (B, 1+pos_k), batch.neg_idx (B, neg_k)."""
        return self.losses(embeddings, self.memories, batch.pos_idx, batch.neg_idx, self.tau, self.kd_T)

    @torch.no_grad()
    def after_step(self, embeddings: List[torch.Tensor], batch) -> None:
        """Momentum update of every bank from the global batch (batch.index (B,) on each process)."""
        stacked = all_gather_nograd(torch.stack([e.detach().float() for e in embeddings], dim=1))  # (W*B, N, D)
        indices = all_gather_nograd(batch.index)
        update_memories(self.memories, list(stacked.unbind(dim=1)), indices, self.momentum)
