"""Benchmark of ``distillkit.fused_linear_kd_loss`` (docs/math.md §2).

Providers: ``distillkit`` (chunked lm-head + fused kd_loss), ``unfused`` (the full (N, C)
logits ``h @ Wᵀ`` then the fused ``kd_loss``), ``eager`` (matmul + ``kd_loss_ref``) and
``compile`` (``torch.compile`` of the eager path). N = 2048 tokens, H = 1024, C = 32000
and 128256, fp32 (bf16 matmuls on this CPU run at under 1 GFLOP/s, so bf16 is for GPUs:
``--device cuda``), forward KL, T = 2, teacher given as logits; mode ``full``.

Roofline bytes are those of the unavoidable matmul operands and teacher logits:
N*H + C*H (+ gradients) + N*C teacher logits, in the inputs' dtype.

    python benchmarks/bench_fused_linear.py --quick
    python benchmarks/bench_fused_linear.py
    python benchmarks/bench_fused_linear.py --gpu     # GPU size in bf16 on cuda

--gpu: N = 8192 tokens, H = 4096 (a Llama-3-8B student), C = 128256, bf16, chunks of 2048
rows; the time of its three GEMMs alone, the issue's floor (docs/gpu.md), is measured by
``benchmarks/gpu_floors.py``.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from harness import Case, OpBench, find_row, main, ratio_line

import distillkit
from distillkit.reference import kd_loss_ref

CASES = [Case.of((2048, 1024, c), "float32", temperature=2.0, chunk_rows=512)
         for c in (32000, 128256)]
QUICK_CASES = [Case.of((96, 64, 1000), "float32", temperature=2.0, chunk_rows=32)]
TARGET = CASES[1]
GPU_CASES = [Case.of((8192, 4096, 128256), "bfloat16", temperature=2.0, chunk_rows=2048)]


def make_inputs(case: Case, device: torch.device):
    n, h, c = case.shape
    hidden = torch.randn(n, h, device=device).to(case.torch_dtype).requires_grad_()
    weight = (torch.randn(c, h, device=device) / h**0.5).to(case.torch_dtype).requires_grad_()
    teacher = torch.randn(n, c, device=device).to(case.torch_dtype)
    return hidden, weight, teacher


def roofline_bytes(case: Case, mode: str) -> int:
    n, h, c = case.shape
    size = torch.finfo(case.torch_dtype).bits // 8
    operands = n * h + c * h
    return size * (operands * (1 if mode == "forward" else 2) + n * c)


def fused(hidden, weight, teacher, *, temperature, chunk_rows):
    return distillkit.fused_linear_kd_loss(hidden, weight, teacher, temperature=temperature,
                                           chunk_rows=chunk_rows)


def unfused(hidden, weight, teacher, *, temperature, chunk_rows):
    return distillkit.kd_loss(hidden @ weight.t(), teacher, temperature=temperature)


def reference(hidden, weight, teacher, *, temperature, chunk_rows):
    return kd_loss_ref(hidden @ weight.t(), teacher, temperature=temperature)


def targets(rows: List[Dict[str, Any]]) -> List[str]:
    """Issue goals at C = 128256, 2-core CPU fp32: peak extra memory <= 1/4 of the eager
    reference's, time <= 1.2x the unfused fused-kernel path."""
    ours = find_row(rows, "distillkit", "full", TARGET)
    eager = find_row(rows, "eager", "full", TARGET)
    lines = ["Targets (issue): 2-core CPU, fp32, N = 2048, H = 1024, C = 128256, fwd+bwd:"]
    if ours is None or eager is None:
        lines.append("- extra memory <= 1/4 of eager's: not measured in this run")
    else:
        ratio = ours["extra_mem_MB"] / max(eager["extra_mem_MB"], 1e-9)
        lines.append(f"- extra memory <= 1/4 of eager's: {ours['extra_mem_MB']:.0f} MB vs "
                     f"{eager['extra_mem_MB']:.0f} MB = {ratio:.2f} ({'met' if ratio <= 0.25 else 'NOT met'})")
    unf = find_row(rows, "unfused", "full", TARGET)
    if ours is None or unf is None:
        lines.append("- time <= 1.2x the unfused path: not measured in this run")
    else:
        ratio = ours["median_ms"] / unf["median_ms"]
        lines.append(f"- time <= 1.2x the unfused path: {ratio:.2f}x ({'met' if ratio <= 1.2 else 'NOT met'})")
    lines.append(ratio_line(1.0, "compile (for reference)", ours,
                            find_row(rows, "compile", "full", TARGET)))
    return lines


BENCH = OpBench(
    name="fused_linear_kd_loss",
    fused=fused,
    reference=reference,
    make_inputs=make_inputs,
    roofline_bytes=roofline_bytes,
    cases=CASES,
    quick_cases=QUICK_CASES,
    gpu_cases=GPU_CASES,
    modes=("full",),
    targets=targets,
    extra_providers={"unfused": unfused},
)

if __name__ == "__main__":
    main(BENCH)
