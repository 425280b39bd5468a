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

**The flip point** (docs/math.md §9.1). For a member i of the top-k set the mixture is
affine in the student's f_i,

.. math::
    q_i = \alpha f_i + (1-\alpha)\, c\, (1 - f_i) = b + a f_i, \qquad
    b = (1-\alpha) c, \quad a = \alpha - (1-\alpha) c,

so q_i grows with f_i only while a > 0, i.e. α > c/(1 + c):

* unnormalized mix (c = 1): flip at α = 1/2;
* normalized mix (c = 1/(k − 1)): flip at α = 1/k.

Below the flip the loss *falls* as the student moves probability off the teacher's
top-k set (non-members have q_i = α f_i, increasing), so the row's optimum puts the
student's mass outside the top-k — the opposite of what the teacher says. Isotonic α
of a weak teacher is below the flip for many rows.

Being above the flip is not enough. Minimising one row's soft loss over the simplex
(Lagrange multiplier λ; interior optimum) gives f_j = t_j/λ off the top-k set and
f_i = t_i/λ − b/a on it, with 1/λ = R = 1 + k b/a: the optimum *inflates the
teacher's mass outside its top-k by R*, which is infinite at the flip and 1 only at
α = 1 (unnormalized α = 0.55, k = 3 gives R = 14.5). Bounding R ≤ R_max is the same as
α ≥ a_min(k) with

* unnormalized: a_min = (k + R_max − 1) / (k + 2(R_max − 1));
* normalized: a_min = (k + R_max − 1) / (k R_max)

(both → the flip as R_max → ∞, and equal at k = 2, where the two mixes coincide).

The estimator reports the share of rows below the flip at every ``fit`` (on V) and
``transform`` (on the pool), warns (:class:`SLaMFlipWarning`) when it exceeds
``warn_below``, and by default applies **our guard** (not part of the SLaM paper):
α ← min(1 − ε, max(α, a_min(k))) with R_max = ``guard`` (default 2). ``guard=None``
restores the paper's exact mixing (α only clipped to [ε, 1 − ε]).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["SLaMEstimator", "SLaMFlipWarning", "alpha_floor", "flip_point", "isotonic_regression",
           "isotonic_predict", "teacher_margin"]


class SLaMFlipWarning(UserWarning):
    """Many rows have α below the flip point of their mix (see :func:`flip_point`)."""


def flip_point(k: Tensor, normalized: bool) -> Tensor:
    r"""The α below which SLaM's mixture decreases in a top-k member's f_i, per row, float64.

    With :math:`q_i = \alpha f_i + (1-\alpha) c (1 - f_i)` for members,
    :math:`\partial q_i / \partial f_i = \alpha - (1-\alpha) c`, which is positive iff
    :math:`\alpha > c / (1 + c)`: 1/2 for the unnormalized mix (c = 1) and 1/k for the
    normalized one (c = 1/(k − 1)). ``k`` (N,) integer; returns (N,) on ``k``'s device.
    """
    if normalized:
        return 1.0 / k.to(torch.float64)
    return torch.full(k.shape, 0.5, dtype=torch.float64, device=k.device)


def alpha_floor(k: Tensor, normalized: bool, max_inflation: float) -> Tensor:
    r"""Our guard's floor a_min(k): the smallest α whose row optimum inflates the mass
    outside the teacher's top-k by at most R = ``max_inflation`` (> 1), per row, float64.

    The inflation is :math:`1 + k b / a` (module docstring), so a_min solves
    :math:`1 + k b/a = R`: :math:`(k + R - 1)/(k + 2(R - 1))` unnormalized,
    :math:`(k + R - 1)/(k R)` normalized. Always above :func:`flip_point`.
    """
    k = k.to(torch.float64)
    r = float(max_inflation)
    return (k + r - 1) / (k * r) if normalized else (k + r - 1) / (k + 2 * (r - 1))


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

    The flip guard (ours, not the paper's; see the module docstring): rows whose α is
    below the flip point of the chosen mix (:func:`flip_point`: 1/2 unnormalized, 1/k
    normalized) would train the student *away* from the teacher's top-k set, and rows
    just above it still inflate the mass outside it without bound, so ``transform``
    raises α to at least :func:`alpha_floor` (then clips to 1 − ε): the optimum of a row
    then puts at most ``guard`` times the teacher's outside mass outside the top-k.
    ``guard=None`` is the paper's exact mixing.

    Args:
        eps: ε in [0, 0.5), the clip of α away from 0 and 1 (default 1e-3, docs/math.md §9.1).
        tau: τ in (0, 1], the top-k accuracy target (default 0.9).
        per_bin_k: estimate k per margin bin instead of globally.
        normalized: the mix the α is for (must match ``slam_loss``'s ``normalized``):
            it decides the flip point and the floor.
        guard: None (the paper's mixing) or R_max > 1, the largest allowed inflation of
            the outside-top-k mass at a row's optimum (default 2: unnormalized α ≥ 0.8 at
            k = 3, α ≥ 0.75 at k = 2; normalized α ≥ 2/3 at k = 3, 0.55 at k = 10).
        warn_below: warn (:class:`SLaMFlipWarning`) when more than this share of the
            rows ``transform`` sees is below the flip (default 0.25); 1 never warns.

    Attributes (after ``fit``):
        num_classes_: C.
        margin_thresholds_, alpha_values_: the isotonic fit, (M,) float64: V's
            distinct margins and the fitted α at each, before clipping.
        k_edges_: (B − 1,) float64 margin edges between k bins (empty when global).
        k_values_: (B,) int64 k per bin (one entry when global).
        val_below_flip_: share of V's rows whose (unguarded) α is below their flip point.
        below_flip_ (after ``transform``): the same share for the rows last transformed.
    """

    def __init__(self, *, eps: float = 1e-3, tau: float = 0.9, per_bin_k: bool = False,
                 normalized: bool = False, guard: Optional[float] = 2.0,
                 warn_below: float = 0.25):
        if not 0 <= eps < 0.5:
            raise ValueError(f"eps must be in [0, 0.5) (got {eps})")
        if not 0 < tau <= 1:
            raise ValueError(f"tau must be in (0, 1] (got {tau})")
        if not isinstance(normalized, bool):
            raise ValueError(f"normalized must be a bool (got {normalized!r})")
        if guard is not None and not (isinstance(guard, (int, float))
                                      and not isinstance(guard, bool) and 1 < guard < math.inf):
            raise ValueError(f"guard must be None or a finite number > 1 (got {guard!r})")
        if not 0 <= warn_below <= 1:
            raise ValueError(f"warn_below must be in [0, 1] (got {warn_below})")
        self.eps = eps
        self.tau = tau
        self.per_bin_k = per_bin_k
        self.normalized = normalized
        self.guard = guard
        self.warn_below = warn_below
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
        alpha, k = self._alpha_k(margin)
        self.val_below_flip_ = float((alpha < flip_point(k, self.normalized)).double().mean())
        return self

    def _alpha_k(self, margin: Tensor) -> Tuple[Tensor, Tensor]:
        """Unguarded α (clipped to [ε, 1 − ε]) and k at ``margin`` (N,) float64."""
        alpha = isotonic_predict(margin, self.margin_thresholds_, self.alpha_values_)
        alpha = alpha.clamp(self.eps, 1 - self.eps)
        bin_index = torch.searchsorted(self.k_edges_.to(margin.device), margin)
        return alpha, self.k_values_.to(margin.device)[bin_index]

    def transform(self, teacher_probs: Tensor) -> Tuple[Tensor, Tensor]:
        """α and k for each row of ``teacher_probs`` (N, C), ready for :func:`distillkit.slam_loss`.

        Returns ``(alpha, k)`` on ``teacher_probs``' device: alpha (N,) in [ε, 1 − ε],
        float32 (float64 for float64 input), floored by the guard unless ``guard`` is
        None; k (N,) int64 in [2, C]. Sets :attr:`below_flip_` (the share of rows whose
        unguarded α is below the flip) and warns when it exceeds ``warn_below``.
        """
        if self.num_classes_ is None:
            raise RuntimeError("SLaMEstimator.transform needs fit() first")
        c = self.num_classes_
        if not isinstance(teacher_probs, Tensor) or teacher_probs.dim() != 2 \
                or teacher_probs.shape[1] != c:
            raise ValueError(f"teacher_probs must be a 2-D (N, {c}) tensor, like the data fit on")
        if not teacher_probs.is_floating_point():
            raise ValueError(f"teacher_probs must be floating point (got {teacher_probs.dtype})")
        alpha, k = self._alpha_k(teacher_margin(teacher_probs.detach()))
        flip = flip_point(k, self.normalized)
        self.below_flip_ = float((alpha < flip).double().mean()) if len(alpha) else 0.0
        mix = "normalized (flip at 1/k)" if self.normalized else "unnormalized (flip at 1/2)"
        if self.below_flip_ > self.warn_below:
            action = ("the guard raises them" if self.guard is not None else
                      "guard=None: their loss falls as the student moves mass off the "
                      "teacher's top-k set")
            warnings.warn(f"{self.below_flip_:.0%} of rows have alpha below the flip point of "
                          f"the {mix} SLaM mix; {action}", SLaMFlipWarning, stacklevel=2)
        if self.guard is not None:
            alpha = torch.maximum(alpha, alpha_floor(k, self.normalized, self.guard))
            alpha = alpha.clamp(max=1 - self.eps)
        alpha = alpha.to(torch.float64 if teacher_probs.dtype == torch.float64 else torch.float32)
        return alpha, k
