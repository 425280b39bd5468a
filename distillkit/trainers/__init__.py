"""Training loops built only on :mod:`distillkit.functional` (pure Python)."""
from distillkit.trainers.kd import KDConfig, KDTrainer

__all__ = ["KDConfig", "KDTrainer"]
