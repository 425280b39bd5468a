"""The settings of each loss family, validated once where they are made.

Every entry point of a family (the function, its ``nn.Module``, the fused-linear and
vocabulary-parallel forms, the trainers' configs and the reference) takes the same
options object, or its fields as keywords, and the op wrappers turn it into the
schema's arguments. A new option is a new field here, a check in ``__post_init__`` and
the schema argument it maps to.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["KDOptions", "SparseKDOptions", "SLaMOptions", "LogitHead", "check_choice",
           "DIVERGENCES", "REDUCTIONS", "TEACHER_VOCABS"]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
TEACHER_VOCABS = ("exact", "truncate")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))} (got {value!r})")


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number (got {value!r})")
    return float(value)


def _temperature(value) -> float:
    t = _real("temperature", value)
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be finite and > 0 (got {value!r})")
    return t


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int (got {value!r})")
    return int(value)


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (got {value!r})")
    return value


class _Options:
    """What the option dataclasses share: building from an object and/or fields."""

    @classmethod
    def resolve(cls, options=None, **fields):
        """``options`` with ``fields`` replaced, or ``cls(**fields)`` without one: how each
        entry point accepts either form."""
        if options is None:
            return cls(**fields)
        if not isinstance(options, cls):
            raise ValueError(f"options must be a {cls.__name__} (got {type(options).__name__})")
        return options.replace(**fields) if fields else options

    def replace(self, **fields):
        """A copy with ``fields`` changed (validated again)."""
        return dataclasses.replace(self, **fields)

    def _set(self, name: str, value) -> None:
        # Normalized types: the schema takes float / int, and equal options compare equal.
        object.__setattr__(self, name, value)


def _unit_interval(name: str, value) -> float:
    x = _real(name, value)
    if not 0.0 <= x <= 1.0:  # False for NaN too
        raise ValueError(f"{name} must be in [0, 1] (got {value!r})")
    return x


@dataclass(frozen=True)
class KDOptions(_Options):
    r"""Settings of :func:`distillkit.kd_loss` and of every loss built on it.

    Per row, with teacher :math:`p = \mathrm{softmax}(u/T)` and student
    :math:`q = \mathrm{softmax}(z/T)` (docs/math.md §1):

    Attributes:
        temperature: T, finite and > 0.
        divergence: ``"forward_kl"`` KL(p‖q) (Hinton), ``"reverse_kl"`` KL(q‖p), or
            ``"jsd"``: β KL(p‖m) + (1 − β) KL(q‖m), m = βp + (1 − β)q.
        beta: the JSD mixture weight β in [0, 1]; β = 0 and β = 1 are *defined* as
            forward and reverse KL (TRL GKD / Liger convention).
        hard_weight: weight of the hard cross entropy at T = 1, in [0, 1]; the row loss is
            (1 − hard_weight)·s·soft + hard_weight·CE(z, label), s = T² or 1.
        ignore_index: the label value of rows that count for nothing.
        reduction: ``"mean"`` (weighted sum / number of non-ignored rows), ``"sum"`` or
            ``"none"``.
        scale_by_t2: s = T² (True) or 1.

    Invalid values raise ``ValueError`` naming the field when the object is made, so a
    config fails before any model runs. Immutable; :meth:`replace` makes a changed copy.
    """

    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    hard_weight: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"
    scale_by_t2: bool = True
    teacher_vocab: str = "exact"

    def __post_init__(self):
        self._set("temperature", _temperature(self.temperature))
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_choice("teacher_vocab", self.teacher_vocab, TEACHER_VOCABS)
        self._set("beta", _unit_interval("beta", self.beta))
        self._set("hard_weight", _unit_interval("hard_weight", self.hard_weight))
        self._set("ignore_index", _int("ignore_index", self.ignore_index))
        check_choice("reduction", self.reduction, REDUCTIONS)
        _bool("scale_by_t2", self.scale_by_t2)

    def teacher_classes(self, student_classes: int, teacher_classes: int, mismatch: str) -> int:
        """The number of leading teacher columns the loss reads (``student_classes``), or
        a ``ValueError`` starting with ``mismatch`` and naming both sizes when
        ``teacher_vocab`` does not allow them."""
        if teacher_classes == student_classes or (
                self.teacher_vocab == "truncate" and teacher_classes > student_classes):
            return student_classes
        hint = ("; pass teacher_vocab='truncate' if the teacher's extra classes are padding rows"
                if self.teacher_vocab == "exact" and teacher_classes > student_classes else "")
        raise ValueError(f"{mismatch} (the teacher has {teacher_classes} classes, the student "
                         f"{student_classes}; teacher_vocab={self.teacher_vocab!r}){hint}")

    def schema_args(self) -> Tuple[float, str, float, float, int, bool]:
        """The scalars of ``distillkit::kd_loss_forward`` / ``kd_loss_backward``, in
        schema order (reduction is applied in Python, after the op)."""
        return (self.temperature, self.divergence, self.beta, self.hard_weight,
                self.ignore_index, self.scale_by_t2)


@dataclass(frozen=True)
class SparseKDOptions(_Options):
    r"""Settings of :func:`distillkit.sparse_kd_loss` (a top-K teacher, docs/math.md §4).

    Attributes:
        temperature: T, finite and > 0, applied to the student (the cached teacher
            log-probabilities were taken at the same T).
        renormalize: softmax over the kept entries (True) or their raw probabilities;
            with a tail bucket, over the K kept entries and the tail.
        divergence: ``"forward_kl"`` KL(p‖q), ``"reverse_kl"`` KL(q‖p) or ``"jsd"``
            (β-mixture, as in :class:`KDOptions`). The latter two compare complete
            distributions, so they need the teacher's tail bucket
            (``teacher_tail_logprob``); β = 0 / 1 are forward / reverse KL.
        beta: the JSD mixture weight β in [0, 1].
        ignore_index: the label value of rows that count for nothing.
        reduction: ``"mean"`` (Σ w·row over live rows / number of live rows), ``"sum"``
            or ``"none"``.
        scale_by_t2: multiply each row by T².
        check_duplicates: reject rows that repeat a class (one host sort of the indices).
    """

    temperature: float = 1.0
    renormalize: bool = True
    ignore_index: int = -100
    reduction: str = "mean"
    scale_by_t2: bool = True
    check_duplicates: bool = True
    divergence: str = "forward_kl"
    beta: float = 0.5

    def __post_init__(self):
        self._set("temperature", _temperature(self.temperature))
        _bool("renormalize", self.renormalize)
        check_choice("divergence", self.divergence, DIVERGENCES)
        self._set("beta", _unit_interval("beta", self.beta))
        self._set("ignore_index", _int("ignore_index", self.ignore_index))
        check_choice("reduction", self.reduction, REDUCTIONS)
        _bool("scale_by_t2", self.scale_by_t2)
        _bool("check_duplicates", self.check_duplicates)

    def schema_args(self) -> Tuple[float, bool, int, bool, bool]:
        """The scalars of ``distillkit::sparse_kd_loss_forward`` before its tail, in
        schema order (:meth:`tail_args` follows the tail tensor)."""
        return (self.temperature, self.renormalize, self.ignore_index, self.scale_by_t2,
                self.check_duplicates)

    def tail_args(self) -> Tuple[str, float]:
        """The scalars after ``teacher_tail_logprob`` in both sparse_kd_loss schemas."""
        return (self.divergence, self.beta)

    @property
    def needs_tail(self) -> bool:
        """Reverse KL and JSD weigh the student's own mass, which lives mostly outside
        the kept classes: they are defined on the complete (K + 1 bucket) distributions."""
        return not (self.divergence == "forward_kl" or
                    (self.divergence == "jsd" and self.beta == 0.0))

    # From this temperature on, a row whose buckets cover every class (the tail bucket,
    # raw log-probabilities, or K = C) has student and teacher agreeing to O(1/T): its
    # divergence is O(1/T²) of the terms it is summed from, below the rounding of the
    # cached log-probabilities themselves, so no result is relatively accurate
    # (docs/math.md §4.1; tests/test_sparse_extreme_scalars.py, CANCELLATION_RANGE).
    CANCELLATION_TEMPERATURE = 100.0

    def check_tail(self, has_tail: bool) -> None:
        if self.needs_tail and not has_tail:
            raise ValueError(f"divergence={self.divergence!r} (beta={self.beta}) needs "
                             "teacher_tail_logprob: it compares complete distributions, the "
                             "K kept classes plus the tail bucket")

    def check_inputs(self, has_tail: bool, kept: int, classes: int) -> None:
        """The checks that need the call's inputs: the tail a divergence needs, and the
        temperature range where the op cannot be accurate (the reference, an fp64 oracle,
        checks only the former)."""
        self.check_tail(has_tail)
        complete = has_tail or not self.renormalize or kept == classes
        if complete and self.temperature >= self.CANCELLATION_TEMPERATURE:
            what = ("a teacher tail" if has_tail else "renormalize=False" if not self.renormalize
                    else f"K = C = {classes}")
            raise ValueError(
                f"temperature must be < {self.CANCELLATION_TEMPERATURE:g} for sparse KD with "
                f"{what} (got {self.temperature:g}): student and teacher then agree to O(1/T) "
                "and the divergence, O(1/T^2) of its terms, is below the rounding of the "
                "cached log-probabilities (docs/math.md §4.1)")


@dataclass(frozen=True)
class SLaMOptions(_Options):
    r"""Settings of :func:`distillkit.slam_loss` (student-label mixing, docs/math.md §5).

    Attributes:
        normalized: the mixing constant c = 1/(k − 1) (True) or 1 (the paper's form).
        hard: train on the teacher's argmax instead of its soft labels.
        reduction: ``"mean"`` (Σ w·row / N), ``"sum"`` or ``"none"``.
    """

    normalized: bool = False
    hard: bool = False
    reduction: str = "mean"

    def __post_init__(self):
        _bool("normalized", self.normalized)
        _bool("hard", self.hard)
        check_choice("reduction", self.reduction, REDUCTIONS)

    def schema_args(self) -> Tuple[bool, bool]:
        """The flags of ``distillkit::slam_loss_forward`` / ``slam_loss_backward``."""
        return (self.normalized, self.hard)


def _finite(name: str, value) -> float:
    x = _real(name, value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite (got {value!r})")
    return x


@dataclass(frozen=True)
class LogitHead(_Options):
    r"""How a model turns its lm-head output into its final logits, for the fused path.

    ``logits = softcap · tanh(scale · (h Wᵀ + b) / softcap)`` — the scale first (Cohere's
    ``logit_scale``), then the soft cap (Gemma 2/3's ``final_logit_softcapping``), as
    those models' own forward does, in the logits' dtype; the loss's temperature divides
    the result. :func:`~distillkit.fused_linear_kd_loss` applies it chunk by chunk and
    differentiates through it (d/dx of the whole map is ``scale · (1 − tanh²)``).

    Attributes:
        scale: finite multiplier (1: none).
        softcap: ``None`` (no cap) or a finite cap > 0.
    """

    scale: float = 1.0
    softcap: Optional[float] = None

    def __post_init__(self):
        self._set("scale", _finite("scale", self.scale))
        if self.softcap is not None:
            cap = _finite("softcap", self.softcap)
            if cap <= 0.0:
                raise ValueError(f"softcap must be None or > 0 (got {self.softcap!r})")
            self._set("softcap", cap)

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    @classmethod
    def from_config(cls, config) -> "LogitHead":
        """The head of a ``transformers`` config (its text config for multimodal ones):
        ``logit_scale`` (Cohere), ``logits_scaling`` (Granite divides by it: scale
        1/logits_scaling, one rounding away from its division) and
        ``final_logit_softcapping`` (Gemma 2/3); unset or ``None`` means no transform."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = getattr(text, "logit_scale", None)
        if scale is None and getattr(text, "logits_scaling", None) is not None:
            scale = 1.0 / text.logits_scaling
        return cls(scale=1.0 if scale is None else scale,
                   softcap=getattr(text, "final_logit_softcapping", None))

    def apply(self, logits):
        """The transform on materialized logits (the reference the fused path matches)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * (logits / self.softcap).tanh()
        return logits
