"""nn.Module forms of the functional losses."""
from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from ..ops.options import KDOptions
from .functional import kd_loss

__all__ = ["KDLoss"]


class KDLoss(nn.Module):
    """Module form of :func:`distillkit.kd_loss`: the constructor takes a
    :class:`~distillkit.KDOptions` and/or its fields as keywords (checked there, once),
    ``forward(student_logits, teacher_logits, labels=None, weight=None, normalizer=None)``
    the per-batch tensors."""

    def __init__(self, options: Optional[KDOptions] = None, **fields):
        super().__init__()
        self.options = KDOptions.resolve(options, **fields)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                labels: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                normalizer: Optional[Union[float, Tensor]] = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, labels=labels, weight=weight,
                       normalizer=normalizer, options=self.options)

    def extra_repr(self) -> str:
        return repr(self.options)
