"""Training loops built only on :mod:`distillkit.losses.functional` (pure Python).

What the loops share (distributed context, RNG and checkpoint state, optimizer
factory, the checkpoint protocol) is :mod:`distillkit.trainers.runtime`.
"""
from distillkit.trainers.kd import KDConfig, KDTrainer
from distillkit.trainers.l2t import L2TDLNTrainer
from distillkit.trainers.lm import LMDistillationTrainer
from distillkit.trainers.slam import SLaMTrainer
from distillkit.trainers.weighted import WeightedDistillationTrainer

__all__ = ["KDConfig", "KDTrainer", "L2TDLNTrainer", "LMDistillationTrainer", "SLaMTrainer",
           "WeightedDistillationTrainer"]
