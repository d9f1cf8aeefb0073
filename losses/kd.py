"""Temperature-scaled KL distillation (Hinton et al.), used by every soft MCL term and
by logit distillation (docs/method.md §2 and §5)."""
import torch
import torch.nn.functional as F


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * (1/B) * sum_i KL(softmax(teacher_i / T) || softmax(student_i / T)).

    student_logits, teacher_logits: (B, C) -> scalar. Rows are full distributions (no
    masking). The teacher is NOT detached here: gradient reaches both sides unless the
    caller passes ``teacher_logits.detach()``. The MCL soft terms and CIFAR logit KD detach
    (the callers do so); ImageNet logit KD of the original does not.
    """
    log_student = F.log_softmax(student_logits / T, dim=1)
    # log_target keeps the teacher in log space: stable even when its softmax underflows.
    log_teacher = F.log_softmax(teacher_logits / T, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * (T * T)
