"""Networks of timm (pytorch-image-models) as cohort members: ``--arch timm:convnext_atto``.

timm is an optional extra (``pip install timm``, or ``pip install -e ".[timm]"``); without
it a ``timm:`` name is one error line saying so. The model is built with random weights
(never downloaded) and split like a torchvision member (models/cohort.py): the body is the
model with its classifier removed, returning the pooled pre-logits feature, and the branch
is timm's own classifier Linear.
"""
import difflib
from typing import Any, Tuple

import torch.nn as nn

from .registry import CohortError

TIMM_PREFIX = "timm:"


def is_timm_name(name: str) -> bool:
    """True for ``timm:<model name>``."""
    return name.startswith(TIMM_PREFIX)


def timm_module() -> Any:
    """The timm package; CohortError saying how to install it when it is missing."""
    try:
        import timm
    except ImportError:
        raise CohortError("timm: architectures need the timm package: pip install timm (or pip install -e "
                          "\".[timm]\")") from None
    return timm


def check_timm_name(name: str) -> None:
    """CohortError unless ``name`` is ``timm:`` and a model timm knows."""
    timm = timm_module()
    model = name[len(TIMM_PREFIX):]
    if timm.is_model(model):
        return
    close = difflib.get_close_matches(model, timm.list_models(), n=3)
    hint = f" (close: {', '.join(close)})" if close else ""
    raise CohortError(f"timm has no model {model!r}{hint}; python -c \"import timm; print(timm.list_models())\" "
                      "lists them")


def build_timm_parts(name: str, num_classes: int) -> Tuple[nn.Module, nn.Linear, str]:
    """(model without its classifier: (B, 3, H, W) -> feature (B, F), classifier Linear(F, num_classes),
    the classifier's name in timm's own state_dict, e.g. "head.fc")."""
    check_timm_name(name)
    model = timm_module().create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes)
    fc = model.get_classifier()
    if not isinstance(fc, nn.Linear):
        raise CohortError(f"{name}'s classifier is a {type(fc).__name__}, not a Linear; choose another timm model")
    classifier_name = model.pretrained_cfg.get("classifier") or "fc"
    if isinstance(classifier_name, (tuple, list)):
        classifier_name = classifier_name[0]
    model.reset_classifier(0)  # the forward now ends with the pooled pre-logits feature
    return model, fc, classifier_name
