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
from .ops import check_errors  # noqa: E402


def empty_cpu_cache() -> int:
    """Free the idle blocks of distillkit's CPU output cache; returns the bytes released.

    The CPU kernels take their large outputs (gradients of 1 MiB and more, LSTM states) from a
    cache that keeps freed blocks resident, so a training loop stops paying a page fault and the
    OS's zeroing per 4 KiB of every new gradient. At most ``DISTILLKIT_CPU_CACHE_MB`` (read at
    first use; default 2048, 0 turns the cache off) stay cached, oldest released first; a block is
    reused only for a request of the same size (rounded up to 2 MiB). Blocks in use by live
    tensors are not affected.
    """
    return _C.empty_cpu_cache()


def cpu_cache_bytes() -> int:
    """Bytes held by idle blocks of distillkit's CPU output cache (see :func:`empty_cpu_cache`)."""
    return _C.cpu_cache_bytes()


# The layers, bottom up: ops (schemas' wrappers, options, references) -> losses -> methods ->
# trainers -> integrations -> experiments; data holds the datasets, models and teacher cache.
from .losses import (KDLoss, distance, forward_corrected_loss, fused_linear_kd_loss,  # noqa: E402
                     fused_linear_sparse_kd_loss, kd_loss, slam_loss, sparse_kd_loss)
from .methods.learned_optimizer import LearnedOptimizer  # noqa: E402
from .ops.options import KDOptions, LogitHead, SLaMOptions, SparseKDOptions  # noqa: E402

__all__ = ["kd_loss", "slam_loss", "forward_corrected_loss", "distance", "fused_linear_kd_loss",
           "sparse_kd_loss", "KDLoss", "KDOptions", "LogitHead", "SLaMOptions", "SparseKDOptions",
           "LearnedOptimizer", "ops", "check_errors", "empty_cpu_cache", "cpu_cache_bytes",
           "fused_linear_sparse_kd_loss"]
__version__ = "0.1.0"
