"""TRL (1.x) on the fused losses: drop-ins with TRL's own signatures and conventions.

GKDTrainer (``trl.experimental.gkd``) computes its loss in the overridable static method
``generalized_jsd_loss``; the swap is one line::

    GKDTrainer.generalized_jsd_loss = staticmethod(distillkit.integrations.generalized_jsd_loss)

DistillationTrainer (``trl``, TRL ≥ 1.0) runs its backbones, finds the heads, reads each
model's logit scale and soft cap from its config and hands everything to the module
function ``trl.trainer.distillation_trainer._chunked_divergence_loss``;
:func:`chunked_divergence_loss` has that function's signature and results, so pointing
the name at it runs the trainer on :func:`~distillkit.fused_linear_kd_loss`::

    import trl.trainer.distillation_trainer as trl_distillation
    trl_distillation._chunked_divergence_loss = distillkit.integrations.chunked_divergence_loss

Conventions kept from TRL (they differ from :func:`distillkit.kd_loss`'s defaults): no T²
factor; ``beta`` weights the teacher side, m = β·teacher + (1 − β)·student, β = 0 is
KL(teacher‖student) and β = 1 is KL(student‖teacher); the causal shift is the caller's.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..losses.functional import kd_loss
from ..losses.fused_linear import _fused_linear_kd
from ..ops import kd_loss_backward, kd_loss_forward, reject_functorch
from ..ops.options import KDOptions, LogitHead

__all__ = ["generalized_jsd_loss", "chunked_divergence_loss"]


def _trl_options(beta: float, temperature: float, teacher_vocab: str = "exact") -> KDOptions:
    return KDOptions(temperature=temperature, divergence="jsd", beta=float(beta),
                     ignore_index=-100, reduction="sum", scale_by_t2=False,
                     teacher_vocab=teacher_vocab)


def _row_grid(t: Tensor) -> Optional[Tuple[int, int]]:
    """For a (B, S, C) tensor whose rows cannot be flattened into an (N, C) view but lie
    on one grid of row stride r (unit column stride, ``t.stride(0)`` a multiple ``k·r``
    of ``t.stride(1) = r``, ``k ≥ S``: GKDTrainer's ``logits[:, :-1, :]`` has k = S + 1),
    ``(r, k)``; else None (flattening is a view, or the layout is anything else)."""
    if t.dim() != 3 or t.shape[0] < 2 or t.shape[1] < 1 or t.stride(2) != 1:
        return None
    r, outer = t.stride(1), t.stride(0)
    if r < t.shape[2] or outer % r or outer // r <= t.shape[1]:
        return None
    return r, outer // r


class _GridJSD(torch.autograd.Function):
    """Σ of the kd_loss rows of (B, S, C) logits read in place as the (R, C) matrix of
    their row grid, R = (B − 1)·k + S: the grid's other rows (the positions the caller
    sliced off) get ignore_index labels, which the kernels skip without reading, and
    the gradient is the kernel's (R, C) output viewed with the input's (B, S, C) shape —
    neither direction copies the logits."""

    @staticmethod
    def forward(ctx, z, u, labels, grid_s, grid_t, opts: KDOptions):
        b, s, c = z.shape
        (rs, k), (rt, _) = grid_s, grid_t
        rows = (b - 1) * k + s
        zg = z.as_strided((rows, c), (rs, 1))
        ug = u.as_strided((rows, c), (rt, 1))
        real = (torch.arange(b, device=z.device)[:, None] * k
                + torch.arange(s, device=z.device)[None, :]).reshape(-1)
        y = torch.full((rows,), opts.ignore_index, dtype=torch.int64, device=z.device)
        y[real] = labels.reshape(-1) if labels is not None else 0
        loss, stats = kd_loss_forward(zg, ug, y, opts)
        ctx.save_for_backward(zg, ug, y, stats)
        ctx.opts, ctx.geometry = opts, (b, s, c, k)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad):
        zg, ug, y, stats = ctx.saved_tensors
        b, s, c, k = ctx.geometry
        grad_rows = grad.to(stats.dtype).expand(zg.shape[0]).contiguous()
        dz, _ = kd_loss_backward(grad_rows, zg, ug, y, stats, ctx.opts, False)
        return dz.as_strided((b, s, c), (k * c, c, 1)), None, None, None, None, None


def _jsd_sum(z: Tensor, u: Tensor, labels: Optional[Tensor], opts: KDOptions) -> Tensor:
    """Σ over rows of kd_loss(z, u) with TRL's options; (B, S, C) slices of larger
    logits (GKDTrainer's causal shift) read in place."""
    classes = opts.teacher_classes(z.shape[-1], u.shape[-1],
                                   "teacher_logits must have the shape of student_logits")
    u = u[..., :classes]
    grid_s, grid_t = _row_grid(z), _row_grid(u)
    if (grid_s is None or grid_t is None or grid_s[1] != grid_t[1] or u.requires_grad
            or u.shape != z.shape or (labels is not None and labels.shape != z.shape[:-1])
            or (z.dtype == torch.float64) != (u.dtype == torch.float64)):
        # Flattening is a view here (or the inputs are for kd_loss's checks to reject).
        return kd_loss(z, u, labels=labels, options=opts.replace(teacher_vocab="exact"))
    reject_functorch("generalized_jsd_loss")
    return _GridJSD.apply(z, u.detach(), labels, grid_s, grid_t, opts)


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Optional[Tensor] = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    *,
    teacher_vocab: str = "exact",
) -> Tensor:
    """TRL's ``GKDTrainer.generalized_jsd_loss`` (student/teacher logits (B, S, V), labels
    (B, S) with −100) on the fused op.

    ``reduction="batchmean"`` divides by the number of tokens whose label is not −100 when
    ``labels`` are given, and by ``student_logits.size(0)`` (the batch size, not the token
    count) when they are not; ``"mean"`` is TRL's mean over every element (tokens ×
    vocab); ``num_items_in_batch`` overrides all of these with the sum divided by that
    count. ``teacher_vocab="truncate"`` (keyword only; bind it with ``functools.partial``
    for the trainer) reads a teacher whose vocabulary is the student's plus padding rows
    through its first V columns (see :class:`~distillkit.KDOptions`).

    GKDTrainer passes ``logits[:, :-1, :]``: the rows of such a slice are read where they
    are, not copied (:class:`_GridJSD`); the gradient is one (N, V) buffer, as any
    logits gradient.

    Differences: the loss is fp32 (fp64 for fp64 logits) whatever the logits' dtype, and
    ``reduction="none"`` (TRL's per-vocabulary-entry tensor) is not supported: it is
    exactly what the fused op avoids materializing.
    """
    if reduction not in ("batchmean", "sum", "mean"):
        raise ValueError(f"reduction must be 'batchmean', 'sum' or 'mean' (got {reduction!r}); "
                         "the elementwise 'none' of TRL is not supported")
    total = _jsd_sum(student_logits, teacher_logits, labels,
                     _trl_options(beta, temperature, teacher_vocab))
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


def chunked_divergence_loss(
    student_hidden_states: Tensor,
    teacher_hidden_states: Tensor,
    student_lm_head_weight: Tensor,
    teacher_lm_head_weight: Tensor,
    completion_mask: Tensor,
    beta: float,
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    student_lm_head_bias: Optional[Tensor] = None,
    teacher_lm_head_bias: Optional[Tensor] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: Optional[float] = None,
    teacher_final_logit_softcapping: Optional[float] = None,
    temperature: float = 1.0,
    *,
    chunk_rows: int = 1024,
) -> Tuple[Tensor, Tensor, Tensor]:
    """TRL DistillationTrainer's ``_chunked_divergence_loss`` on the fused linear KD loss.

    Args: as TRL's — hidden states (B, K, H_s) and (B, K, H_t) aligned to the completion
    tokens, the heads' (V, H) weights (FSDP2 DTensors allowed) and optional biases, the
    (B, K) completion mask (1: in the loss), β, the logit scales and soft caps of each
    model (applied after the head, scale first, before the temperature), T.
    ``chunk_rows``: rows per chunk of logits (ours; keyword only).

    Returns ``(loss, entropy_sum, n_valid)`` as TRL's function: the JSD summed over the
    masked-in positions divided by ``num_items_in_batch`` (or by their number when it
    is None, at least 1), the summed entropy of the student's distribution at T over
    those positions (no gradient), and their number. Only those rows are projected.
    """
    valid = completion_mask.reshape(-1) != 0
    h_s = student_hidden_states.reshape(-1, student_hidden_states.shape[-1])[valid]
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.shape[-1])[valid]
    heads = (LogitHead(scale=student_logit_scale, softcap=student_final_logit_softcapping),
             LogitHead(scale=teacher_logit_scale, softcap=teacher_final_logit_softcapping))
    total, entropy_sum = _fused_linear_kd(
        h_s, student_lm_head_weight, None, student_lm_head_bias, h_t, teacher_lm_head_weight,
        teacher_lm_head_bias, heads[0], heads[1], chunk_rows, None, None, None,
        _trl_options(beta, temperature), entropy=True)
    n_valid = valid.sum()
    if num_items_in_batch is None:
        return total / n_valid.clamp(min=1), entropy_sum, n_valid
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch, entropy_sum, n_valid
