"""The batch every supervised loader yields, as the training step reads it."""
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class Batch:
    """Images (B, 3, H, W) and labels (B,); for ImageNet's memory-bank contrast also each image's
    dataset index (B,), its positives (B, 1 + pos_k) and negatives (B, neg_k) as bank rows."""

    inputs: torch.Tensor
    targets: torch.Tensor
    index: Optional[torch.Tensor] = None
    pos_idx: Optional[torch.Tensor] = None
    neg_idx: Optional[torch.Tensor] = None

    @classmethod
    def from_loader(cls, items: Sequence[torch.Tensor]) -> "Batch":
        """(images, labels) or (images, labels, index, pos_idx, neg_idx), as the loaders yield them."""
        if len(items) not in (2, 5):
            raise ValueError(f"a loader batch has 2 or 5 tensors, got {len(items)}")
        return cls(*items)

    def to(self, device: torch.device) -> "Batch":
        """This batch on ``device`` (indices as int64), copied without blocking where possible."""
        def move(t: Optional[torch.Tensor], long: bool = False) -> Optional[torch.Tensor]:
            if t is None:
                return None
            t = t.to(device, non_blocking=True)
            return t.long() if long else t

        return Batch(move(self.inputs), move(self.targets), move(self.index, True), move(self.pos_idx, True),
                     move(self.neg_idx, True))
