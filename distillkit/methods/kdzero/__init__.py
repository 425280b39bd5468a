"""KD-Zero: searched distillers (docs/math.md §9.5).

A distiller is a genotype — a chain of knowledge transforms applied alike to teacher
and student outputs, a distance op and a loss weight — evolved for a teacher–student
pair by :func:`search`, with the fitness of a candidate measured by a short proxy
training run (:class:`ProxyTask`).

* :mod:`distillkit.methods.kdzero.transforms`: the transform registry.
* :class:`Distiller`: the genotype; ``distiller(student_out, teacher_out)`` is the
  weighted loss, ``distiller.formula()`` a readable formula, ``to_json`` / ``from_json``.
* :func:`search`: the evolutionary search (deterministic for a seed, resumable).
* ``python -m distillkit experiment kdzero``: the search on scikit-learn's digits.
"""
from distillkit.methods.kdzero import transforms
from distillkit.methods.kdzero.distiller import DISTANCES, WEIGHTS, Distance, Distiller
from distillkit.methods.kdzero.proxy import DistillerTrainer, DistillStudent, ProxyTask
from distillkit.methods.kdzero.search import Evaluation, SearchResult, SearchSpace, search
from distillkit.methods.kdzero.transforms import TRANSFORMS, Transform

__all__ = ["transforms", "Transform", "TRANSFORMS", "Distance", "DISTANCES", "WEIGHTS",
           "Distiller", "SearchSpace", "Evaluation", "SearchResult", "search", "ProxyTask",
           "DistillerTrainer", "DistillStudent"]
