"""Benchmark of ``distillkit.distance`` against ``distance_ref`` eager and compiled.

Sweep: every distance op on logits (4096, 32000) (rows along the classes) and on features
(64, 256, 32, 32) (rows along the channels, dim = 1: per-pixel vectors, as in feature
distillation), fp32 and bf16, mean reduction, T = 4 for kl; modes ``full`` (forward +
backward, student and teacher both requiring grad is not assumed: only the student does)
and ``forward``.

Roofline bytes: N*(bytes(s) + bytes(t)) forward, plus N*bytes(ds) for full.

    python benchmarks/bench_distance.py --quick     # CI
    python benchmarks/bench_distance.py             # full sweep on the CPU
    python benchmarks/bench_distance.py --gpu       # GPU sizes on cuda
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

from harness import Case, OpBench, find_row, main, ratio_line

import distillkit
from distillkit.reference import DISTANCE_OPS, distance_ref

SHAPES = (((4096, 32000), -1), ((64, 256, 32, 32), 1))
CASES = [Case.of(shape, dtype, op=op, dim=dim, **({"temperature": 4.0} if op == "kl" else {}))
         for shape, dim in SHAPES for dtype in ("float32", "bfloat16") for op in DISTANCE_OPS]
QUICK_CASES = [Case.of((64, 1003), "float32", op=op, dim=-1) for op in DISTANCE_OPS] + [
    Case.of((4, 16, 5, 5), "bfloat16", op="pearson", dim=1)]
# --gpu: bf16 logits of 16384 rows (block rows) for a pointwise and a row-statistics op, and
# the strided feature path.
GPU_CASES = [Case.of((16384, 32000), "bfloat16", op="kl", dim=-1, temperature=4.0),
             Case.of((16384, 32000), "bfloat16", op="pearson", dim=-1),
             Case.of((64, 256, 32, 32), "bfloat16", op="pearson", dim=1)]


def make_inputs(case: Case, device: torch.device):
    student = torch.randn(case.shape, device=device).to(case.torch_dtype).requires_grad_()
    teacher = torch.randn(case.shape, device=device).to(case.torch_dtype)
    return student, teacher


def roofline_bytes(case: Case, mode: str) -> int:
    size = torch.finfo(case.torch_dtype).bits // 8
    return math.prod(case.shape) * size * (2 if mode == "forward" else 3)


def targets(rows: List[Dict[str, Any]]) -> List[str]:
    """The issue's goals: each fused distance fwd+bwd >= 3x eager and >= 1.3x compile (2-core CPU)."""
    lines = ["Targets (issue): 2-core CPU, each distance, fwd+bwd, distillkit vs eager (>= 3x) "
             "and compile (>= 1.3x):"]
    for case in CASES:
        ours = find_row(rows, "distillkit", "full", case)
        if ours is None:
            continue
        label = f"{case.shape_str} {case.dtype} {case.params_str}"
        lines.append(f"{label}:")
        lines.append("  " + ratio_line(3, "eager", ours, find_row(rows, "eager", "full", case)))
        lines.append("  " + ratio_line(1.3, "compile", ours, find_row(rows, "compile", "full", case)))
    return lines


def fused(student, teacher, op, **kw):
    return distillkit.distance(student, teacher, op, **kw)


def reference(student, teacher, op, **kw):
    return distance_ref(student, teacher, op, **kw)


BENCH = OpBench(
    name="distance",
    fused=fused,
    reference=reference,
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
