"""Contrast objects plugged into the engine: how MCL terms are computed for a batch."""
from typing import List

import torch

from losses.mcl import MCLLosses, sup_mcl_losses
from utils.distributed import all_gather_grad, all_gather_nograd


class InBatchContrast:
    """CIFAR's supervised MCL over the global batch (SPEC section 2).

    Under DDP the embeddings of every rank are gathered with gradient and the labels
    without, so every rank computes the loss of the whole global batch, exactly as
    one process would (see utils.distributed.all_gather_grad for the gradient).
    """

    def __init__(self, tau: float, kd_T: float) -> None:
        self.tau = tau
        self.kd_T = kd_T

    def __call__(self, embeddings: List[torch.Tensor], batch) -> MCLLosses:
        labels = all_gather_nograd(batch.targets)
        gathered = [all_gather_grad(e) for e in embeddings]
        return sup_mcl_losses(gathered, labels, self.tau, self.kd_T)
