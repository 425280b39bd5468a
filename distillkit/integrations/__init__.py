"""Drop-in replacements for other libraries' distillation losses, backed by the fused ops.

TRL's GKDTrainer and DistillationTrainer: :mod:`distillkit.integrations.trl` (one-line
swaps; see there and README "TRL").
"""
from .trl import chunked_divergence_loss, generalized_jsd_loss

__all__ = ["generalized_jsd_loss", "chunked_divergence_loss"]
from .transformers import CausalLMDistillation, DistillationTrainer  # noqa: E402,F401
