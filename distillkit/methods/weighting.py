r"""Per-example importance weights for weighted distillation (ESTIMATEWEIGHTS, docs/math.md §9.2).

A teacher-labelled pool row x is down-weighted where the teacher tends to be
wrong. "Where" is judged in a 2-D feature space that looks at both models,

.. math::
    X(x) = (\max_i t_i(x),\; \max_i f_i(x)),

teacher and student confidence (largest probability). On a labelled validation set
V, each point carries :math:`p_v = 1[\arg\max t(v) \ne y_v]`; a pool row's estimated
teacher error rate :math:`\hat p(x)` is the mean :math:`p_v` of its
:math:`k_{nn} = \lceil \tfrac12 \sqrt{|V|}\, \rceil` nearest validation points
(Euclidean distance in X, ties by validation index), and its weight is
:math:`w(x) = \max(0, 1 - 2\hat p(x))` (``rule="distortion"``: the factor by which
label noise at rate p̂ shrinks a binary label's signal, zero at p̂ ≥ ½) or
:math:`w(x) = 1 - \hat p(x)` (``rule="accuracy"``). The weights go to
``kd_loss(..., weight=w)`` (see
:class:`distillkit.trainers.WeightedDistillationTrainer`).

**The distortion term.** Algorithm 2 of the paper (ESTIMATEWEIGHTS) attaches a pair
(p, distortion) to every validation point; the text we have (../shared/seeds/papers.txt)
defines only the correct branch, (p, distortion) = (0, 1) when the teacher's argmax is
the label, and breaks off at the ``else``: the wrong branch's distortion and how
distortion enters the weight are not in it. What we chose (``distortion="scale"``,
ours): a wrong point's distortion is :math:`d_v = t_{y_v}(v) / \max_i t_i(v) \in [0, 1)`,
the teacher's probability of the true class relative to its top class (1 exactly on
the correct branch, as the text says, and smaller the farther the soft label is from
right); a pool row's :math:`\hat d(x)` is the mean :math:`d_v` over the same k_nn
neighbours, and it scales the weight, :math:`w(x) = \mathrm{rule}(\hat p(x))\, \hat d(x)`.
The default ``distortion="ignore"`` keeps w = rule(p̂) — the part of the algorithm the
text defines.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from distillkit.ops.options import check_choice

__all__ = ["estimate_weights", "RULES", "DISTORTIONS"]

RULES = ("distortion", "accuracy")
DISTORTIONS = ("ignore", "scale")

# Pool rows per distance chunk: about this many (row, validation point) distances,
# 8 MiB of float64, exist at once, however large the pool.
_CHUNK_DISTANCES = 1 << 20


def _check_probs(name: str, probs: Tensor, rows: Optional[int] = None) -> None:
    if not isinstance(probs, Tensor) or probs.dim() != 2 or not probs.is_floating_point():
        raise ValueError(f"{name} must be a 2-D floating-point tensor (rows, C)")
    if rows is not None and len(probs) != rows:
        raise ValueError(f"{name} must have {rows} rows (got {len(probs)})")


def estimate_weights(
    teacher_probs: Tensor,
    student_probs: Tensor,
    val_teacher_probs: Tensor,
    val_student_probs: Tensor,
    val_labels: Tensor,
    *,
    rule: str = "distortion",
    distortion: str = "ignore",
    k_nn: Optional[int] = None,
    chunk_rows: Optional[int] = None,
) -> Tensor:
    r"""ESTIMATEWEIGHTS: the weight of every pool row (see the module docstring for the math).

    Args:
        teacher_probs: (N, C) teacher probabilities on the pool.
        student_probs: (N, C') current student probabilities on the pool.
        val_teacher_probs: (V, C) teacher probabilities on the validation set.
        val_student_probs: (V, C') student probabilities on the validation set.
        val_labels: (V,) integer labels of the validation set. V = 0 gives w ≡ 1.
        rule: ``"distortion"`` (max(0, 1 − 2p̂), default) or ``"accuracy"`` (1 − p̂).
        distortion: ``"ignore"`` (default: the validation points' distortion is not
            used) or ``"scale"`` (w = rule(p̂)·d̂, our completion of the term the
            paper's text leaves undefined; module docstring).
        k_nn: neighbours per pool row; default ⌈½√V⌉. Capped at V.
        chunk_rows: pool rows whose distances to V are formed at once (default: about
            2²⁰ distances per chunk), so memory is O(chunk_rows · V), not O(N · V).

    Returns:
        (N,) weights in [0, 1] on ``teacher_probs``' device, float32 (float64 for
        float64 input). Deterministic: distances are float64, and the k_nn nearest
        are taken by a stable sort, so equal distances go to the lower validation index.
    """
    check_choice("rule", rule, RULES)
    check_choice("distortion", distortion, DISTORTIONS)
    _check_probs("teacher_probs", teacher_probs)
    n = len(teacher_probs)
    _check_probs("student_probs", student_probs, n)
    _check_probs("val_teacher_probs", val_teacher_probs)
    v = len(val_teacher_probs)
    _check_probs("val_student_probs", val_student_probs, v)
    if val_teacher_probs.shape[1] != teacher_probs.shape[1]:
        raise ValueError(
            "val_teacher_probs must have as many classes as teacher_probs "
            f"(got {val_teacher_probs.shape[1]} and {teacher_probs.shape[1]})"
        )
    if not isinstance(val_labels, Tensor) or val_labels.shape != (v,) \
            or val_labels.is_floating_point():
        raise ValueError(f"val_labels must be a ({v},) integer tensor")
    if k_nn is not None and k_nn < 1:
        raise ValueError(f"k_nn must be >= 1 (got {k_nn})")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 (got {chunk_rows})")
    device = teacher_probs.device
    out_dtype = torch.float64 if teacher_probs.dtype == torch.float64 else torch.float32
    if v == 0:
        return torch.ones(n, dtype=out_dtype, device=device)

    k = min(k_nn if k_nn is not None else math.ceil(0.5 * math.sqrt(v)), v)
    chunk_rows = chunk_rows or max(1, _CHUNK_DISTANCES // v)

    def confidences(probs: Tensor) -> Tensor:
        return probs.detach().to(device, torch.float64).amax(1)

    query_t, query_s = confidences(teacher_probs), confidences(student_probs)
    key_t, key_s = confidences(val_teacher_probs), confidences(val_student_probs)
    val_t = val_teacher_probs.detach().to(device, torch.float64)
    labels = val_labels.to(device)
    teacher_wrong = (val_t.argmax(1) != labels).double()
    # d_v: 1 on the correct branch (the text), t_y / max t on the wrong one (our choice).
    point_distortion = torch.where(teacher_wrong.bool(),
                                   val_t.gather(1, labels[:, None])[:, 0] / key_t,
                                   torch.ones_like(key_t))
    p_hat = torch.empty(n, dtype=torch.float64, device=device)
    d_hat = torch.empty(n, dtype=torch.float64, device=device)
    for start in range(0, n, chunk_rows):
        rows = slice(start, start + chunk_rows)
        dist = ((query_t[rows, None] - key_t) ** 2 + (query_s[rows, None] - key_s) ** 2)
        nearest = torch.sort(dist, dim=1, stable=True).indices[:, :k]
        p_hat[rows] = teacher_wrong[nearest].mean(1)
        d_hat[rows] = point_distortion[nearest].mean(1)
    w = (1 - 2 * p_hat).clamp(min=0) if rule == "distortion" else 1 - p_hat
    if distortion == "scale":
        w = w * d_hat
    return w.to(out_dtype)
