"""Drop-in replacements for other libraries' distillation losses, backed by the fused op.

``generalized_jsd_loss`` has the signature and semantics of TRL's
``GKDTrainer.generalized_jsd_loss`` (trl.experimental.gkd, TRL 1.x), so a TRL user swaps one
line::

    GKDTrainer.generalized_jsd_loss = staticmethod(distillkit.integrations.generalized_jsd_loss)

Conventions kept from TRL (they differ from :func:`distillkit.kd_loss`'s defaults):

* no T² factor on the loss;
* ``beta`` weights the teacher side, m = β·teacher + (1 − β)·student; β = 0 is
  KL(teacher‖student), β = 1 is KL(student‖teacher);
* ``reduction="batchmean"`` divides by the number of tokens whose label is not −100 when
  ``labels`` are given, and by ``student_logits.size(0)`` (the batch size, not the token
  count) when they are not; ``"mean"`` is TRL's mean over every element (tokens × vocab);
  ``num_items_in_batch`` overrides all of these with the sum divided by that count;
* the causal shift of logits and labels is the caller's job, as in TRL.

Differences: the loss is fp32 (fp64 for fp64 logits) whatever the logits' dtype, and
``reduction="none"`` (TRL's per-vocabulary-entry tensor) is not supported — it is exactly
what the fused op avoids materializing.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..losses.functional import kd_loss

__all__ = ["generalized_jsd_loss"]


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
) -> Tensor:
    """TRL's generalized JSD (student/teacher logits (B, S, V), labels (B, S) with −100)."""
    if reduction not in ("batchmean", "sum", "mean"):
        raise ValueError(f"reduction must be 'batchmean', 'sum' or 'mean' (got {reduction!r}); "
                         "the elementwise 'none' of TRL is not supported")
    total = kd_loss(student_logits, teacher_logits, temperature=temperature, divergence="jsd",
                    beta=float(beta), labels=labels, ignore_index=-100, reduction="sum",
                    scale_by_t2=False)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    if labels is not None:
        tokens = (labels != -100).sum()
    else:
        tokens = torch.tensor(student_logits.shape[:-1].numel(), device=total.device)
    if reduction == "batchmean":
        return total / (tokens.clamp(min=1) if labels is not None else max(student_logits.size(0), 1))
    return total / (tokens * student_logits.shape[-1])
from .transformers import CausalLMDistillation, DistillationTrainer  # noqa: E402,F401
