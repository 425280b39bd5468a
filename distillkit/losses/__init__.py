"""Losses built on the ops: the functional entry points, the fused linear + loss path, the
vocabulary-parallel path and the nn.Module forms (math: docs/math.md)."""
from .functional import distance, forward_corrected_loss, kd_loss, slam_loss, sparse_kd_loss
from .fused_linear import fused_linear_kd_loss
from .fused_sparse import fused_linear_sparse_kd_loss
from .modules import KDLoss
from .parallel import vocab_parallel_kd_loss

__all__ = ["kd_loss", "slam_loss", "forward_corrected_loss", "distance", "sparse_kd_loss",
           "fused_linear_kd_loss", "vocab_parallel_kd_loss", "KDLoss",
           "fused_linear_sparse_kd_loss"]
