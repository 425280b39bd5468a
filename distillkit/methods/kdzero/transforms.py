r"""Knowledge transforms: the building blocks of a searched distiller's transform chain (docs/math.md §9.5).

A transform is applied to the student's and the teacher's outputs alike before the
distance op compares them. Shapes follow one convention: a tensor of rank 2 is
``(N, C)`` (logits, or an MLP's hidden features), a tensor of rank 3 or 4 is
``(N, C, *S)`` with ``S`` the spatial dimensions (``(H, W)`` for image features, or
the pooled scales of :data:`multiscale_pool`). "Over C" is dim 1, "over N" dim 0,
"over HW" the flattened ``S``.

Each :class:`Transform` has a name (its key in :data:`TRANSFORMS`), declares the
input ranks it accepts and the rank it returns, and is a pure function of its
input, except the *random* ones, which also take one uniform draw ``u ~ U[0, 1)`` of
the input's shape: :meth:`Transform.__call__` draws ``u`` once and applies the same
``u`` to student and teacher, so both are masked alike (docs/math.md §9.5: one mask
for teacher and student).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Transform", "TRANSFORMS", "register", "apply_chain", "chain_rank"]

ANY = frozenset({2, 3, 4})
SPATIAL = frozenset({3, 4})
IMAGE = frozenset({4})

# Keeps min-max normalization finite on a constant sample.
_EPS = 1e-8
# BatchNorm's default ε.
_BN_EPS = 1e-5
_MASK_KEEP = 0.5
_POOL_SCALES = (1, 2, 4)


@dataclass(frozen=True)
class Transform:
    """One registered transform.

    Attributes:
        name: registry key, also its name in a distiller's formula.
        fn: ``fn(x) -> y``, or ``fn(x, u) -> y`` for a random transform, where ``u`` is
            a uniform draw of ``x``'s shape.
        ranks: the input ranks it accepts.
        out_rank: the rank it returns (``None``: the input's rank).
        random: whether ``fn`` takes the shared uniform draw.
        idempotent: ``fn(fn(x)) = fn(x)`` (up to rounding): the search never repeats it
            back to back, as that only renames a distiller.
        doc: one line of math for readers of a formula.
    """

    name: str
    fn: Callable[..., Tensor]
    ranks: FrozenSet[int]
    doc: str
    out_rank: Optional[int] = None
    random: bool = False
    idempotent: bool = False

    def accepts(self, rank: int) -> bool:
        return rank in self.ranks

    def output_rank(self, rank: int) -> int:
        return rank if self.out_rank is None else self.out_rank

    def __call__(self, student: Tensor, teacher: Tensor,
                 generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """Transform both outputs; a random transform draws once from ``generator``
        (torch's global RNG when ``None``) and uses that draw for both."""
        for who, x in (("student", student), ("teacher", teacher)):
            if not self.accepts(x.dim()):
                raise ValueError(f"transform {self.name!r} accepts ranks {sorted(self.ranks)} "
                                 f"(got a rank-{x.dim()} {who} output of shape {tuple(x.shape)})")
        if not self.random:
            return self.fn(student), self.fn(teacher)
        if student.shape != teacher.shape:
            raise ValueError(f"random transform {self.name!r} needs equal student and teacher "
                             f"shapes for its shared draw (got {tuple(student.shape)} and "
                             f"{tuple(teacher.shape)})")
        device = student.device if generator is None else generator.device
        u = torch.rand(student.shape, generator=generator, device=device).to(student.device)
        return self.fn(student, u), self.fn(teacher, u)


TRANSFORMS: Dict[str, Transform] = {}


def register(transform: Transform) -> Transform:
    """Add ``transform`` to :data:`TRANSFORMS` (names are unique)."""
    if transform.name in TRANSFORMS:
        raise ValueError(f"a transform named {transform.name!r} is already registered")
    TRANSFORMS[transform.name] = transform
    return transform


def chain_rank(names: Sequence[str], rank: int) -> int:
    """The rank a chain returns for a rank-``rank`` input; ValueError naming the first
    step that cannot take what the step before it returns."""
    for i, name in enumerate(names):
        if name not in TRANSFORMS:
            raise ValueError(f"unknown transform {name!r} (known: {', '.join(TRANSFORMS)})")
        t = TRANSFORMS[name]
        if not t.accepts(rank):
            raise ValueError(f"transform {i} of the chain, {name!r}, accepts ranks "
                             f"{sorted(t.ranks)} but gets rank {rank}")
        rank = t.output_rank(rank)
    return rank


def apply_chain(names: Sequence[str], student: Tensor, teacher: Tensor,
                generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Apply the transforms ``names`` in order (the first is applied first)."""
    for name in names:
        student, teacher = TRANSFORMS[name](student, teacher, generator)
    return student, teacher


# ---- the registry ------------------------------------------------------------

def _spatial_flat(x: Tensor) -> Tensor:
    """(N, C, *S) -> (N, C, |S|)."""
    return x.flatten(2)


def _softmax(temperature: float, dim: int, log: bool) -> Callable[[Tensor], Tensor]:
    fn = torch.log_softmax if log else torch.softmax
    return lambda x: fn(x / temperature, dim=dim)


for _t in (1, 4):
    register(Transform(f"softmax_t{_t}", _softmax(_t, 1, False), ANY,
                       f"softmax(x / {_t}) over C"))
    # At T = 1 the log-probabilities' log-sum-exp is 0, so a second log-softmax is a no-op.
    register(Transform(f"log_softmax_t{_t}", _softmax(_t, 1, True), ANY,
                       f"log softmax(x / {_t}) over C", idempotent=_t == 1))
register(Transform("batch_softmax", _softmax(1, 0, False), ANY, "softmax(x) over N"))

register(Transform("l2norm_c", lambda x: F.normalize(x, dim=1), ANY, "x / ‖x‖ over C",
                   idempotent=True))
register(Transform("l2norm_n", lambda x: F.normalize(x, dim=0), ANY, "x / ‖x‖ over N",
                   idempotent=True))
register(Transform("l2norm_hw", lambda x: F.normalize(_spatial_flat(x), dim=2).view_as(x),
                   SPATIAL, "x / ‖x‖ over HW", idempotent=True))


def _channel_attention(x: Tensor) -> Tensor:
    a = _spatial_flat(x).abs().mean(2)
    return x.shape[1] * torch.softmax(a, dim=1)


def _spatial_attention(x: Tensor) -> Tensor:
    a = x.abs().mean(1).flatten(1)
    return a.shape[1] * torch.softmax(a, dim=1)


register(Transform("channel_attention", _channel_attention, SPATIAL,
                   "C · softmax_C(mean_HW |x|): (N, C)", out_rank=2))
register(Transform("spatial_attention", _spatial_attention, SPATIAL,
                   "HW · softmax_HW(mean_C |x|): (N, HW)", out_rank=2))


def _multiscale_pool(x: Tensor) -> Tensor:
    return torch.cat([_spatial_flat(F.adaptive_max_pool2d(x, r)) for r in _POOL_SCALES], dim=2)


register(Transform("multiscale_pool", _multiscale_pool, IMAGE,
                   "max-pool to r×r, r = 1, 2, 4, concatenated: (N, C, 21)", out_rank=3))


def _minmax(x: Tensor) -> Tensor:
    dims = tuple(range(1, x.dim()))
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    return (x - lo) / (hi - lo + _EPS)


def _batchnorm(x: Tensor) -> Tensor:
    # BatchNorm's training statistics, per channel over N and S, without the affine part.
    dims = (0,) + tuple(range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + _BN_EPS)


register(Transform("minmax", _minmax, ANY, "(x − min) / (max − min + ε) per sample",
                   idempotent=True))
register(Transform("batchnorm", _batchnorm, ANY,
                   "(x − mean) / √(var + ε), per channel over N (and HW)", idempotent=True))


def _gram_batch(x: Tensor) -> Tensor:
    f = x.flatten(1)
    return f @ f.T / f.shape[1]


def _gram_channel(x: Tensor) -> Tensor:
    f = _spatial_flat(x)
    return f @ f.transpose(1, 2) / f.shape[2]


register(Transform("gram_batch", _gram_batch, ANY,
                   "F Fᵀ / D with F = x flattened to (N, D): (N, N)", out_rank=2))
register(Transform("gram_channel", _gram_channel, SPATIAL,
                   "F Fᵀ / HW per sample, F = x as (C, HW): (N, C, C)", out_rank=3))

register(Transform("mask", lambda x, u: torch.where(u < _MASK_KEEP, x, torch.zeros_like(x)), ANY,
                   f"x · 1[u < {_MASK_KEEP}], u ~ U[0, 1) shared by student and teacher",
                   random=True))

_UNARY = {
    "abs": (torch.abs, "|x|"),
    "pow2": (torch.square, "x²"),
    "sigmoid": (torch.sigmoid, "1 / (1 + e^−x)"),
    "tanh": (torch.tanh, "tanh x"),
    "exp": (torch.exp, "e^x"),
    # Undefined (NaN) for x < 0: such chains are what loss rejection is for.
    "log": (torch.log, "ln x"),
}
for _name, (_fn, _doc) in _UNARY.items():
    register(Transform(_name, _fn, ANY, _doc, idempotent=_name == "abs"))
