"""Benchmark of ``distillkit.sparse_kd_loss`` (top-K teacher) against the dense teacher.

Each case runs one teacher form (param ``teacher``) through the harness's providers:
``sparse`` times ``distillkit.sparse_kd_loss`` (K kept classes per row, int64 indices
and fp32 log-probabilities) against ``sparse_kd_loss_ref``; ``dense`` times
``distillkit.kd_loss`` (forward KL against full (N, C) teacher logits) against
``kd_loss_ref``. The two rows of a shape, side by side, are what storing the top-K
instead of the logits buys: time, inputs (MB) and peak memory. Sweep: (N, C) =
(2048, 128256) (a Llama-3 vocabulary), fp32, K = 32, T = 2, mean reduction; modes
``full`` (forward + backward) and ``forward``. The student requires grad.

Roofline bytes: sparse forward reads z and the teacher, N*C*bytes(z) + N*K*(8 + 4);
backward and full also write dz (+ N*C*bytes(z)). Dense: N*C*(bytes(z) + bytes(u)) and
+ N*C*bytes(dz).

    python benchmarks/bench_sparse_kd.py --quick           # CI: tiny shapes, in-process
    python benchmarks/bench_sparse_kd.py                   # full sweep on the CPU
    python benchmarks/bench_sparse_kd.py --device cuda     # full sweep on the GPU
    python benchmarks/bench_sparse_kd.py --gpu             # GPU sizes (bf16) on cuda
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from harness import Case, OpBench, find_row, main

import distillkit
from distillkit.reference import kd_loss_ref, sparse_kd_loss_ref

T = 2.0
K = 32
CASES = [Case.of((2048, 128256), "float32", temperature=T, teacher=teacher, k=K)
         for teacher in ("sparse", "dense")]
QUICK_CASES = [Case.of((64, 1000), "float32", temperature=T, teacher=teacher, k=8)
               for teacher in ("sparse", "dense")]
QUICK_CASES += [Case.of((37, 1003), "bfloat16", temperature=T, teacher="sparse", k=5)]
SPARSE, DENSE = CASES
# --gpu: 16384 rows of a Llama-3 vocabulary in bf16, the sparse and the dense teacher.
GPU_CASES = [Case.of((16384, 128256), "bfloat16", temperature=T, teacher=teacher, k=K)
             for teacher in ("sparse", "dense")]


def make_inputs(case: Case, device: torch.device):
    n, c = case.shape
    student = torch.randn(case.shape, dtype=case.torch_dtype, device=device).requires_grad_()
    teacher_logits = torch.randn(case.shape, dtype=case.torch_dtype, device=device)
    if case.kwargs["teacher"] == "dense":
        return student, teacher_logits
    logprobs, indices = torch.log_softmax(teacher_logits.float() / T, -1).topk(case.kwargs["k"])
    return student, indices, logprobs


def roofline_bytes(case: Case, mode: str) -> int:
    n, c = case.shape
    size = torch.finfo(case.torch_dtype).bits // 8
    teacher = n * case.kwargs["k"] * (8 + 4) if case.kwargs["teacher"] == "sparse" else n * c * size
    return n * c * size + teacher + (0 if mode == "forward" else n * c * size)


def targets(rows: List[Dict[str, Any]]) -> List[str]:
    """Sparse against dense distillkit at the full case, fwd+bwd."""
    sparse = find_row(rows, "distillkit", "full", SPARSE)
    dense = find_row(rows, "distillkit", "full", DENSE)
    head = (f"Sparse (K = {K}) vs dense teacher, distillkit, fp32 {SPARSE.shape_str}, "
            "fwd+bwd (mode full):")
    if sparse is None or dense is None:
        return [head, "- not measured in this run"]
    return [head,
            f"- time: {sparse['median_ms']:.1f} ms vs {dense['median_ms']:.1f} ms "
            f"({dense['median_ms'] / sparse['median_ms']:.2f}x)",
            f"- inputs: {sparse['inputs_MB']:.0f} MB vs {dense['inputs_MB']:.0f} MB; "
            f"peak: {sparse['peak_mem_MB']:.0f} MB vs {dense['peak_mem_MB']:.0f} MB"]


def _dispatch(sparse_fn, dense_fn):
    def run(*inputs, teacher: str, k: int, **kw):
        return (sparse_fn if teacher == "sparse" else dense_fn)(*inputs, **kw)
    return run


BENCH = OpBench(
    name="sparse_kd",
    fused=_dispatch(distillkit.sparse_kd_loss, distillkit.kd_loss),
    reference=_dispatch(sparse_kd_loss_ref, kd_loss_ref),
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
