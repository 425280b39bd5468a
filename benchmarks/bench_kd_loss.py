"""Benchmark of ``distillkit.kd_loss`` against ``kd_loss_ref`` eager and compiled.

Sweep: (N, C) = (4096, 32000) and (1024, 128256) (Llama-2 and Llama-3 vocabularies),
fp32 and bf16, forward KL, reverse KL and JSD (beta = 0.5), T = 2, mean reduction;
modes ``full`` (forward + backward: the training step) and ``forward``. The student
requires grad and the teacher does not, as with a frozen teacher.

Roofline bytes: forward reads z and u, N*C*(bytes(z) + bytes(u)); backward and full also
write dz, N*C*(bytes(z) + bytes(u) + bytes(dz)), the traffic of one pass that computes
the loss and its gradient together.

    python benchmarks/bench_kd_loss.py --quick           # CI: tiny shapes, in-process
    python benchmarks/bench_kd_loss.py                   # full sweep on the CPU
    python benchmarks/bench_kd_loss.py --device cuda     # full sweep on the GPU
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

from harness import Case, OpBench, find_row, main, ratio_line

import distillkit
from distillkit.reference import kd_loss_ref

T = 2.0
DIVERGENCES = ({"divergence": "forward_kl"}, {"divergence": "reverse_kl"},
               {"divergence": "jsd", "beta": 0.5})
CASES = [Case.of(shape, dtype, temperature=T, **div)
         for shape in ((4096, 32000), (1024, 128256))
         for dtype in ("float32", "bfloat16")
         for div in DIVERGENCES]
# Odd sizes exercise the kernels' vector tails.
QUICK_CASES = [Case.of((64, 1000), "float32", temperature=T, divergence="forward_kl"),
               Case.of((64, 1000), "bfloat16", temperature=T, divergence="reverse_kl"),
               Case.of((37, 1003), "float32", temperature=T, divergence="jsd", beta=0.5)]
TARGET = Case.of((4096, 32000), "float32", temperature=T, divergence="forward_kl")


def make_inputs(case: Case, device: torch.device):
    student = torch.randn(case.shape, dtype=case.torch_dtype, device=device).requires_grad_()
    teacher = torch.randn(case.shape, dtype=case.torch_dtype, device=device)
    return student, teacher


def roofline_bytes(case: Case, mode: str) -> int:
    n, c = case.shape
    size = torch.finfo(case.torch_dtype).bits // 8
    return n * c * size * (2 if mode == "forward" else 3)


def targets(rows: List[Dict[str, Any]]) -> List[str]:
    """The issue's goals for fp32 (4096, 32000) forward KL fwd+bwd on a 2-core CPU."""
    n, c = TARGET.shape
    ours = find_row(rows, "distillkit", "full", TARGET)
    lines = ["Targets (issue): 2-core CPU, fp32 (4096, 32000), forward KL, T = 2, "
             "fwd+bwd (mode full), distillkit:",
             ratio_line(8, "eager", ours, find_row(rows, "eager", "full", TARGET)),
             ratio_line(1.5, "compile", ours, find_row(rows, "compile", "full", TARGET))]
    # Peak <= inputs + gradient + N*C fp32 / 4, i.e. extra over the inputs <= grad + N*C bytes.
    budget_mb = (n * c * 4 + n * c * 4 / 4) / 1e6
    if ours is None:
        lines.append(f"- extra memory over inputs <= gradient + N*C fp32 / 4 = {budget_mb:.0f} MB: "
                     "not measured in this run")
    else:
        extra = ours["extra_mem_MB"]
        lines.append(f"- extra memory over inputs <= gradient + N*C fp32 / 4 = {budget_mb:.0f} MB: "
                     f"{extra:.0f} MB ({'met' if extra <= budget_mb else 'NOT met'})")
    return lines


BENCH = OpBench(
    name="kd_loss",
    fused=distillkit.kd_loss,
    reference=kd_loss_ref,
    make_inputs=make_inputs,
    roofline_bytes=roofline_bytes,
    cases=CASES,
    quick_cases=QUICK_CASES,
    modes=("full", "forward"),
    targets=targets,
)

if __name__ == "__main__":
    main(BENCH)
