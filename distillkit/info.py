"""Print how this distillkit was built and how it runs here (paste it into bug reports).

``python -m distillkit info``: the versions, whether the CUDA kernels were built, the CPU
levels compiled and the one the CPU kernels run at with the reason (the CPU's features,
``DISTILLKIT_CPU_CAPABILITY``, the build), the CPU model, the threads and the CPU output
cache's setting.
"""
from __future__ import annotations

import argparse
import os
import platform
from typing import Dict

import torch

import distillkit
from distillkit import _C


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect() -> Dict[str, str]:
    """The report, as {field: value}, in print order."""
    cache = os.environ.get("DISTILLKIT_CPU_CACHE_MB")
    return {
        "distillkit": f"{distillkit.__version__} ({os.path.dirname(distillkit.__file__)})",
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "with_cuda": f"{_C.with_cuda} (CUDA kernels {'built' if _C.with_cuda else 'not built'})",
        "CPU levels compiled": " ".join(_C.cpu_capabilities),
        "CPU level": _C.cpu_capability,
        "CPU level reason": _C.cpu_capability_reason,
        "CPU": f"{cpu_model()} (best level supported: {_C.cpu_capability_supported})",
        "threads": f"{torch.get_num_threads()} (torch.get_num_threads(); "
                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
        "CPU output cache": (f"DISTILLKIT_CPU_CACHE_MB={cache}" if cache is not None
                             else "DISTILLKIT_CPU_CACHE_MB unset (the default bound)")
                            + f", {distillkit.cpu_cache_bytes()} idle bytes held",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """info takes no options."""


def run(args: argparse.Namespace) -> int:
    """Print :func:`collect`, one field a line."""
    report = collect()
    width = max(map(len, report))
    for field, value in report.items():
        print(f"{field + ':':<{width + 1}} {value}")
    return 0
