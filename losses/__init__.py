"""Loss functions of MCL: in-batch supervised MCL (CIFAR), memory-bank MCL (ImageNet),
KL distillation, and the projection heads that produce the contrasted embeddings."""
from losses.kd import kl_distill
from losses.mcl import (
    MCLLosses,
    ProjectionHead,
    assemble_mcl_losses,
    build_projection_heads,
    contrastive_log_prob,
    sup_mcl_losses,
    supervised_contrastive_loss,
)
from losses.memory import init_memory, memory_mcl_losses, update_memories

__all__ = [
    "MCLLosses",
    "ProjectionHead",
    "assemble_mcl_losses",
    "build_projection_heads",
    "contrastive_log_prob",
    "init_memory",
    "kl_distill",
    "memory_mcl_losses",
    "sup_mcl_losses",
    "supervised_contrastive_loss",
    "update_memories",
]
