"""distillkit: fused C++/CUDA kernels for knowledge distillation in PyTorch."""
import torch

_REBUILD = "rebuild it with: pip install --no-build-isolation -e .  (or: make build)"

try:
    from . import _C
except ImportError as e:  # missing, or built against an ABI-incompatible torch
    raise ImportError(
        f"distillkit's compiled extension distillkit._C could not be loaded ({e}); "
        f"installed torch is {torch.__version__}; {_REBUILD}"
    ) from e

if _C.__torch_version__ != torch.__version__:
    raise ImportError(
        f"distillkit._C was built against torch {_C.__torch_version__} but torch "
        f"{torch.__version__} is installed; {_REBUILD}"
    )

from . import ops  # noqa: E402  (registers fake kernels and autograd)
from .functional import (distance, forward_corrected_loss, kd_loss, slam_loss,  # noqa: E402
                         sparse_kd_loss)
from .fused_linear import fused_linear_kd_loss  # noqa: E402
from .learned_optimizer import LearnedOptimizer  # noqa: E402
from .losses import KDLoss  # noqa: E402

__all__ = ["kd_loss", "slam_loss", "forward_corrected_loss", "distance", "fused_linear_kd_loss",
           "sparse_kd_loss", "KDLoss", "LearnedOptimizer", "ops"]
__version__ = "0.1.0"
