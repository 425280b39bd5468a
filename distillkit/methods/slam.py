r"""Estimating SLaM's mixing coefficient α(x) and top-k size k(x) on a validation set (docs/math.md §9.1).

SLaM (Student-Label Mixing) treats the teacher's soft label ``t`` of an unlabeled
example as right with probability α(x) and otherwise as some other class among the
teacher's top k(x); :func:`distillkit.slam_loss` mixes the student's prediction
accordingly. Both quantities depend only on the teacher, so they are estimated
once, from a small labelled validation set V, and looked up for every pool row:

* α(x) = g(margin(x)) clipped to [ε, 1 − ε], where margin(x) = t_(1) − t_(2) is the
  gap between the teacher's two largest probabilities and g is the isotonic
  (non-decreasing) least-squares fit of the correctness indicator
  1[argmax t(v) = y_v] on margin(v) over v ∈ V. Bigger margins never get a
  smaller α; the clip keeps the loss finite (α = 0 makes log q = −∞) and keeps
  a little trust in the teacher even where V saw only mistakes.
* k(x): the smallest k ≥ 2 whose teacher top-k accuracy on V reaches τ, either once
  for all of V (global) or per margin bin, clamped to [2, C].

Ties follow the op's convention everywhere: among equal probabilities the lower
class index ranks first (so argmax is the first maximum).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["SLaMEstimator", "isotonic_regression", "isotonic_predict", "teacher_margin"]


def _as_float64_numpy(name: str, x) -> np.ndarray:
    a = torch.as_tensor(x).detach().cpu().double().numpy()
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (got shape {a.shape})")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite")
    return a


def isotonic_regression(x, y, weight=None) -> Tuple[Tensor, Tensor]:
    r"""Non-decreasing least-squares fit of ``y`` on ``x`` by pool-adjacent-violators (PAV).

    Solves :math:`\min_g \sum_i w_i (y_i - g(x_i))^2` over non-decreasing functions g of
    x. Examples with equal x are one point of the fit: they are first pooled into
    their weighted mean with weight :math:`\sum w_i` (scikit-learn's convention). PAV then
    scans the M distinct x in increasing order, keeping a stack of blocks (weighted
    mean, total weight, length); a point below the top block's mean merges into it,
    and merging repeats while the top two blocks are out of order. Each point is
    merged at most once, so the scan is O(M) after the O(n log n) sort.

    Args:
        x: (n,) abscissae, n ≥ 1, finite.
        y: (n,) responses, finite.
        weight: optional (n,) positive finite weights (default all 1).

    Returns:
        ``(thresholds, values)``: the M distinct x in increasing order and the fitted
        g at each, both (M,) float64 on the CPU; ``values`` is non-decreasing.
        :func:`isotonic_predict` evaluates the fit anywhere.
    """
    xs = _as_float64_numpy("x", x)
    ys = _as_float64_numpy("y", y)
    if len(xs) == 0:
        raise ValueError("x must have at least one element")
    if ys.shape != xs.shape:
        raise ValueError(f"y must have the shape of x (got {ys.shape} and {xs.shape})")
    if weight is None:
        ws = np.ones_like(xs)
    else:
        ws = _as_float64_numpy("weight", weight)
        if ws.shape != xs.shape:
            raise ValueError(f"weight must have the shape of x (got {ws.shape} and {xs.shape})")
        if not (ws > 0).all():
            raise ValueError("weight must be positive")
    thresholds, point = np.unique(xs, return_inverse=True)
    point_weight = np.bincount(point, weights=ws)
    point_mean = np.bincount(point, weights=ws * ys) / point_weight

    means, weights, lengths = [], [], []
    for mean, w in zip(point_mean.tolist(), point_weight.tolist()):
        length = 1
        while means and means[-1] > mean:
            top_w = weights.pop()
            mean = (means.pop() * top_w + mean * w) / (top_w + w)
            w += top_w
            length += lengths.pop()
        means.append(mean)
        weights.append(w)
        lengths.append(length)
    values = np.repeat(np.asarray(means), lengths)
    return torch.from_numpy(thresholds), torch.from_numpy(values)


def isotonic_predict(x: Tensor, thresholds: Tensor, values: Tensor) -> Tensor:
    """Evaluate an :func:`isotonic_regression` fit at ``x`` (any shape), float64 on ``x``'s device.

    Linear interpolation between consecutive thresholds; outside
    ``[thresholds[0], thresholds[-1]]`` the end values (``np.interp``, i.e.
    scikit-learn's ``IsotonicRegression(out_of_bounds="clip")``). A fit with one
    threshold is constant.
    """
    thresholds = thresholds.to(x.device, torch.float64)
    values = values.to(x.device, torch.float64)
    x = x.to(torch.float64).clamp(thresholds[0], thresholds[-1])
    if len(thresholds) == 1:
        return values[0].expand(x.shape).clone()
    # Index of each x's right knot; x at the last threshold uses the last segment.
    right = torch.searchsorted(thresholds, x, right=True).clamp(1, len(thresholds) - 1)
    x0, x1 = thresholds[right - 1], thresholds[right]
    v0, v1 = values[right - 1], values[right]
    return v0 + (x - x0) / (x1 - x0) * (v1 - v0)


def teacher_margin(teacher_probs: Tensor) -> Tensor:
    """t_(1) − t_(2), the gap between each row's two largest probabilities: (N, C) → (N,) float64."""
    top2 = teacher_probs.topk(2, dim=-1).values.double()
    return top2[:, 0] - top2[:, 1]


def _label_rank(teacher_probs: Tensor, labels: Tensor) -> Tensor:
    """0-based rank of each row's label in the teacher's order (ties: lower index first), (N,)."""
    t_label = teacher_probs.gather(1, labels[:, None])
    classes = torch.arange(teacher_probs.shape[1], device=teacher_probs.device)
    ahead = (teacher_probs > t_label) | ((teacher_probs == t_label) & (classes < labels[:, None]))
    return ahead.sum(1)


def _smallest_k(rank: Tensor, num_classes: int, tau: float) -> int:
    """Smallest k in [2, C] with top-k accuracy mean(rank < k) ≥ τ; C if none is smaller."""
    hits = torch.bincount(rank, minlength=num_classes).cumsum(0)  # hits[k-1] = #(rank < k)
    # Exact when the accuracy is a ratio equal to τ's decimal value (correctly rounded division).
    reached = (hits[1:].double() / len(rank) >= tau).nonzero()
    return int(reached[0]) + 2 if len(reached) else num_classes


class SLaMEstimator:
    r"""Fits α(margin) and k(margin) for :func:`distillkit.slam_loss` on a labelled validation set.

    ``fit(teacher_probs_val, labels_val)`` on V (the teacher's probabilities at the
    temperature used for the pool), then ``transform(teacher_probs)`` for the pool.

    * α: isotonic regression (:func:`isotonic_regression`, our PAV) of
      :math:`1[\arg\max t(v) = y_v]` on :math:`m(v) = t_{(1)}(v) - t_{(2)}(v)` over V,
      evaluated at a pool row's margin by :func:`isotonic_predict` (linear between
      V's margins, end values outside their range) and clipped to [ε, 1 − ε].
      All-correct V gives α ≡ 1 − ε; all-wrong V gives α ≡ ε.
    * k (``per_bin_k=False``): the smallest k ≥ 2 with
      :math:`|\{v : \mathrm{rank}_v(y_v) < k\}| / |V| \ge \tau`, the same for every row.
    * k (``per_bin_k=True``): V sorted by margin (ties by index) is split into
      B = ⌈½√|V|⌉ bins of equal count (sizes differ by at most one, larger bins
      first) and the rule is applied within each bin. A pool row takes the bin
      whose margin range is nearest: bin edges are the midpoints between
      neighbouring bins' extreme margins, and a margin equal to an edge goes to
      the lower bin.

    k is clamped to [2, C] (top-C accuracy is 1, so the rule always stops by C).

    Args:
        eps: ε in [0, 0.5), the clip of α away from 0 and 1 (default 1e-3, docs/math.md §9.1).
        tau: τ in (0, 1], the top-k accuracy target (default 0.9).
        per_bin_k: estimate k per margin bin instead of globally.

    Attributes (after ``fit``):
        num_classes_: C.
        margin_thresholds_, alpha_values_: the isotonic fit, (M,) float64: V's
            distinct margins and the fitted α at each, before clipping.
        k_edges_: (B − 1,) float64 margin edges between k bins (empty when global).
        k_values_: (B,) int64 k per bin (one entry when global).
    """

    def __init__(self, *, eps: float = 1e-3, tau: float = 0.9, per_bin_k: bool = False):
        if not 0 <= eps < 0.5:
            raise ValueError(f"eps must be in [0, 0.5) (got {eps})")
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1] (got {tau})")
        self.eps = eps
        self.tau = tau
        self.per_bin_k = per_bin_k
        self.num_classes_: Optional[int] = None

    def fit(self, teacher_probs_val: Tensor, labels_val: Tensor) -> "SLaMEstimator":
        """Fit on V: ``teacher_probs_val`` (n, C) with n ≥ 1 and C ≥ 2, ``labels_val`` (n,) int.

        Returns ``self``. Only the ranking and the top-two gap of each row are used,
        so rows need not sum exactly to 1.
        """
        if not isinstance(teacher_probs_val, Tensor) or teacher_probs_val.dim() != 2:
            raise ValueError("teacher_probs_val must be a 2-D (n, C) tensor")
        n, c = teacher_probs_val.shape
        if n < 1 or c < 2:
            raise ValueError(
                f"teacher_probs_val needs at least 1 row and 2 classes (got shape {(n, c)})"
            )
        if not teacher_probs_val.is_floating_point() or not torch.isfinite(teacher_probs_val).all():
            raise ValueError("teacher_probs_val must be a finite floating-point tensor")
        if not isinstance(labels_val, Tensor) or labels_val.shape != (n,):
            raise ValueError(f"labels_val must be a ({n},) tensor of class indices")
        if labels_val.is_floating_point() or labels_val.is_complex() or labels_val.dtype == torch.bool:
            raise ValueError(f"labels_val must have an integer dtype (got {labels_val.dtype})")
        if bool(((labels_val < 0) | (labels_val >= c)).any()):
            raise ValueError(f"labels_val must be in [0, {c})")
        probs = teacher_probs_val.detach()
        labels = labels_val.to(probs.device, torch.int64)

        margin = teacher_margin(probs).cpu()
        rank = _label_rank(probs, labels).cpu()
        self.margin_thresholds_, self.alpha_values_ = isotonic_regression(margin, rank == 0)

        if self.per_bin_k:
            order = torch.sort(margin, stable=True).indices
            bins = order.tensor_split(math.ceil(0.5 * math.sqrt(n)))
            self.k_values_ = torch.tensor([_smallest_k(rank[b], c, self.tau) for b in bins])
            self.k_edges_ = torch.stack([(margin[lo].max() + margin[hi].min()) / 2
                                         for lo, hi in zip(bins[:-1], bins[1:])]
                                        ) if len(bins) > 1 else torch.zeros(0, dtype=torch.float64)
        else:
            self.k_values_ = torch.tensor([_smallest_k(rank, c, self.tau)])
            self.k_edges_ = torch.zeros(0, dtype=torch.float64)
        self.num_classes_ = c
        return self

    def transform(self, teacher_probs: Tensor) -> Tuple[Tensor, Tensor]:
        """α and k for each row of ``teacher_probs`` (N, C), ready for :func:`distillkit.slam_loss`.

        Returns ``(alpha, k)`` on ``teacher_probs``' device: alpha (N,) in [ε, 1 − ε],
        float32 (float64 for float64 input); k (N,) int64 in [2, C].
        """
        if self.num_classes_ is None:
            raise RuntimeError("SLaMEstimator.transform needs fit() first")
        c = self.num_classes_
        if not isinstance(teacher_probs, Tensor) or teacher_probs.dim() != 2 \
                or teacher_probs.shape[1] != c:
            raise ValueError(f"teacher_probs must be a 2-D (N, {c}) tensor, like the data fit on")
        if not teacher_probs.is_floating_point():
            raise ValueError(f"teacher_probs must be floating point (got {teacher_probs.dtype})")
        margin = teacher_margin(teacher_probs.detach())
        alpha = isotonic_predict(margin, self.margin_thresholds_, self.alpha_values_)
        alpha = alpha.clamp(self.eps, 1 - self.eps)
        alpha = alpha.to(torch.float64 if teacher_probs.dtype == torch.float64 else torch.float32)
        bin_index = torch.searchsorted(self.k_edges_.to(margin.device), margin)
        k = self.k_values_.to(margin.device)[bin_index]
        return alpha, k
