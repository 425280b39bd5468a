"""Benchmark of ``distillkit.slam_loss`` against ``slam_loss_ref`` eager and compiled.

Sweep: (N, C) = (4096, 32000) and (8192, 1000), fp32 and bf16, k = 5, per-row alpha,
soft labels, mean reduction; modes ``full`` (forward + backward) and ``forward``. The
teacher probabilities, alpha and k are fixed inputs (estimated once), only the student
logits require grad.

Roofline bytes: N*C*(bytes(z) + bytes(t)) forward, plus N*C*bytes(dz) for full.

    python benchmarks/bench_slam_loss.py --quick     # CI
    python benchmarks/bench_slam_loss.py             # full sweep on the CPU
    python benchmarks/bench_slam_loss.py --gpu       # GPU sizes on cuda
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from harness import Case, OpBench, find_row, main, ratio_line

import distillkit
from distillkit.reference import slam_loss_ref

CASES = [Case.of(shape, dtype, k=5) for shape in ((4096, 32000), (8192, 1000))
         for dtype in ("float32", "bfloat16")]
QUICK_CASES = [Case.of((64, 1000), "float32", k=5), Case.of((37, 1003), "bfloat16", k=5)]
TARGET = Case.of((4096, 32000), "float32", k=5)
# --gpu: a batch of 16384 rows in bf16 (block rows: one row per block, radix select).
GPU_CASES = [Case.of((16384, 32000), "bfloat16", k=5)]


def make_inputs(case: Case, device: torch.device):
    n, c = case.shape
    student = torch.randn(n, c, device=device).to(case.torch_dtype).requires_grad_()
    teacher = torch.softmax(torch.randn(n, c, device=device) * 2, dim=1).to(case.torch_dtype)
    # bf16 rounding leaves rows within the op's 1e-2 sum tolerance.
    alpha = torch.rand(n, device=device) * 0.8 + 0.1
    return student, teacher, alpha


def roofline_bytes(case: Case, mode: str) -> int:
    n, c = case.shape
    size = torch.finfo(case.torch_dtype).bits // 8
    return n * c * size * (2 if mode == "forward" else 3)


def targets(rows: List[Dict[str, Any]]) -> List[str]:
    """The issue's goals for fp32 (4096, 32000), k = 5, fwd+bwd on a 2-core CPU."""
    ours = find_row(rows, "distillkit", "full", TARGET)
    return ["Targets (issue): 2-core CPU, fp32 (4096, 32000), k = 5, fwd+bwd, distillkit:",
            ratio_line(5, "eager", ours, find_row(rows, "eager", "full", TARGET)),
            ratio_line(1.5, "compile", ours, find_row(rows, "compile", "full", TARGET))]


BENCH = OpBench(
    name="slam_loss",
    fused=distillkit.slam_loss,
    reference=slam_loss_ref,
    make_inputs=make_inputs,
    roofline_bytes=roofline_bytes,
    cases=CASES,
    quick_cases=QUICK_CASES,
    gpu_cases=GPU_CASES,
    modes=("full", "forward"),
    targets=targets,
)

if __name__ == "__main__":
    main(BENCH)
