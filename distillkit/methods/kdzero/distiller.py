r"""A searched distiller: a genotype that renders to a formula and evaluates to a loss (docs/math.md §9.5).

A :class:`Distiller` is a transform chain φ = φ_k ∘ … ∘ φ_1 (names in
:data:`~distillkit.methods.kdzero.transforms.TRANSFORMS`), a distance D (a name in
:data:`DISTANCES`) and a weight w; on student and teacher outputs s, t its loss is

.. math::
    L(s, t) = w \cdot D(\varphi(s), \varphi(t)),

with random transforms drawing once for both sides. ``output`` names which output
of the networks it distils (``"logits"``, or e.g. ``"feature"`` for a hidden layer);
the caller picks the tensors, the distiller only records the choice.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from distillkit.methods.kdzero.transforms import TRANSFORMS, apply_chain, chain_rank

from distillkit.losses import functional

__all__ = ["Distance", "DISTANCES", "WEIGHTS", "Distiller"]


@dataclass(frozen=True)
class Distance:
    """A distance gene: :func:`distillkit.distance` with fixed ``op``, ``dim`` and ``temperature``.

    ``dim`` 1 compares per sample across C ("inter"), ``dim`` 0 per class across the
    batch ("intra", DIST-style); the elementwise ops ignore it. ``mean`` reduction:
    over elements for l1 / l2 / smooth_l1, over rows for kl / cosine / pearson.
    """

    op: str
    dim: int = 1
    temperature: float = 1.0

    def __call__(self, student: Tensor, teacher: Tensor) -> Tensor:
        return functional.distance(student, teacher, self.op, dim=self.dim,
                                   temperature=self.temperature)


DISTANCES: Dict[str, Distance] = {
    "l1": Distance("l1"),
    "l2": Distance("l2"),
    "smooth_l1": Distance("smooth_l1"),
    # Forward KL(teacher‖student) of softmax(·/T) over C, T²-scaled: kd_loss.
    "kl_t1": Distance("kl", temperature=1.0),
    "kl_t4": Distance("kl", temperature=4.0),
    "cosine": Distance("cosine"),
    "pearson_inter": Distance("pearson", dim=1),
    "pearson_intra": Distance("pearson", dim=0),
}

# docs/math.md §9.5: a small discrete set from 0.1 to 100, roughly log-spaced.
WEIGHTS: Tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)

_SYMBOLS = {"logits": "z", "feature": "f"}


@dataclass(frozen=True)
class Distiller:
    """Genotype of a distiller: ``weight · distance(φ(s), φ(t))``, φ the transform chain.

    Args:
        transforms: transform names, applied first to last.
        distance: a key of :data:`DISTANCES`.
        weight: w > 0 (the search draws it from :data:`WEIGHTS`).
        output: which network output it distils (recorded, not interpreted here).

    Calling it on ``(student_out, teacher_out)`` returns the weighted scalar loss (fp32,
    fp64 for fp64 inputs); pass the teacher's output detached for a frozen teacher.
    A ``torch.Generator`` feeds the random transforms (torch's global RNG by default).
    """

    transforms: Tuple[str, ...] = ()
    distance: str = "kl_t4"
    weight: float = 1.0
    output: str = "logits"

    def __post_init__(self):
        object.__setattr__(self, "transforms", tuple(self.transforms))
        object.__setattr__(self, "weight", float(self.weight))
        unknown = [t for t in self.transforms if t not in TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown transforms {unknown} (known: {', '.join(TRANSFORMS)})")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {', '.join(DISTANCES)} "
                             f"(got {self.distance!r})")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight must be a finite number > 0 (got {self.weight})")

    def check_rank(self, rank: int) -> int:
        """The rank the chain returns for a rank-``rank`` output; ValueError if it cannot
        take it (the distances take any rank >= 2)."""
        out = chain_rank(self.transforms, rank)
        if out < 2:
            raise ValueError(f"the distances need rank >= 2 (the chain returns rank {out})")
        return out

    def __call__(self, student: Tensor, teacher: Tensor, *,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        self.check_rank(student.dim())
        s, t = apply_chain(self.transforms, student, teacher, generator)
        return self.weight * DISTANCES[self.distance](s, t)

    def formula(self) -> str:
        """The loss as a readable formula, e.g.
        ``10 · pearson_intra(φ(z_s), φ(z_t)), φ = tanh ∘ softmax_t4`` (z: logits, f: features)."""
        x = _SYMBOLS.get(self.output, self.output)
        if not self.transforms:
            return f"{self.weight:g} · {self.distance}({x}_s, {x}_t)"
        phi = " ∘ ".join(reversed(self.transforms))
        return f"{self.weight:g} · {self.distance}(φ({x}_s), φ({x}_t)), φ = {phi}"

    def to_dict(self) -> Dict[str, Any]:
        return {"transforms": list(self.transforms), "distance": self.distance,
                "weight": self.weight, "output": self.output}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Distiller":
        return cls(transforms=tuple(d["transforms"]), distance=d["distance"],
                   weight=d["weight"], output=d.get("output", "logits"))

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): equal genotypes give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "Distiller":
        return cls.from_dict(json.loads(s))
