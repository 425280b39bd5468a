"""Distillation inside other libraries' training stacks, on the fused ops.

- :mod:`distillkit.integrations.transformers`: ``DistillationTrainer``, a
  ``transformers.Trainer`` for causal-LM distillation (README "Hugging Face Trainer");
- :mod:`distillkit.integrations.trl`: drop-ins for TRL's GKDTrainer and
  DistillationTrainer losses (one-line swaps; README "TRL").
"""
from .transformers import CausalLMDistillation, DistillationTrainer
from .trl import chunked_divergence_loss, generalized_jsd_loss

__all__ = ["DistillationTrainer", "CausalLMDistillation", "generalized_jsd_loss",
           "chunked_divergence_loss"]
