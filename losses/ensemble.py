"""Logit distillation from the cohort's ensemble (docs/method.md §5)."""
from typing import List

import torch

from losses.kd import kl_distill


def ensemble_logits(logits: List[torch.Tensor]) -> torch.Tensor:
    """Mean of the networks' logits: N x (B, C) -> (B, C)."""
    return torch.stack(logits, dim=0).mean(dim=0)


def ensemble_distill_loss(logits: List[torch.Tensor], T: float, all_students_when_two: bool, detach: bool) -> torch.Tensor:
    """KL_T(student, ensemble) summed over the students.

    Students: both networks when N == 2 and ``all_students_when_two`` (the original's
    CIFAR rule), otherwise only the last network. ``detach`` stops the gradient
    through the ensemble (the original's CIFAR script detaches, its ImageNet script
    does not).
    """
    teacher = ensemble_logits(logits)
    if detach:
        teacher = teacher.detach()
    students = logits if (len(logits) == 2 and all_students_when_two) else logits[-1:]
    return sum(kl_distill(s, teacher, T) for s in students)
