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
    python benchmarks/bench_kd_loss.py --gpu             # GPU size, with Liger when installed

--gpu: (16384, 131072) bf16 forward KL, the issue's GPU target (docs/gpu.md), with the
provider ``liger`` when liger-kernel is importable: ``LigerKLDIVLoss`` (batchmean, log
target) on fp32 ``log_softmax(z / T)`` and ``log_softmax(u / T)``, times T^2 (Liger's KL
takes log-probabilities, so the log-softmax is part of its path).
"""
from __future__ import annotations

import importlib.util
import re
from typing import Any, Dict, List, Optional

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
GPU_TARGET = Case.of((16384, 131072), "bfloat16", temperature=T, divergence="forward_kl")
GPU_CASES = [GPU_TARGET]
# HBM bandwidth (GB/s) of the GPUs the analysis of docs/gpu.md is written for, by device name.
PEAK_GBPS = ((r"H200", 4800.0), (r"H100.*(PCIe)", 2000.0), (r"H100.*NVL", 3900.0),
             (r"H100", 3350.0), (r"A100.*80GB", 2039.0), (r"A100", 1555.0))


def make_inputs(case: Case, device: torch.device):
    student = torch.randn(case.shape, dtype=case.torch_dtype, device=device).requires_grad_()
    teacher = torch.randn(case.shape, dtype=case.torch_dtype, device=device)
    return student, teacher


def liger_kl(student, teacher, *, temperature, divergence):
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss

    if divergence != "forward_kl":
        raise ValueError(f"the liger provider runs forward_kl only (got {divergence})")
    log_q = torch.log_softmax(student.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    return temperature**2 * kl(log_q, log_p)


GPU_PROVIDERS = {"liger": liger_kl} if importlib.util.find_spec("liger_kernel") else {}


def peak_gbps(machine: str) -> Optional[float]:
    return next((bw for pattern, bw in PEAK_GBPS if re.search(pattern, machine)), None)


def gpu_targets(rows: List[Dict[str, Any]]) -> List[str]:
    """The issue's GPU goals at (16384, 131072) bf16 forward KL fwd+bwd."""
    ours = find_row(rows, "distillkit", "full", GPU_TARGET)
    if ours is None:
        return []
    peak = peak_gbps(ours["machine"])
    share = (f"{ours['gbps']:.0f} GB/s = {ours['gbps'] / peak:.0%} of {peak:.0f} GB/s "
             f"({'met' if ours['gbps'] >= 0.8 * peak else 'NOT met'})" if peak
             else f"{ours['gbps']:.0f} GB/s, no peak bandwidth known for {ours['machine']}")
    return ["", f"GPU targets (issue 13): {ours['machine']}, bf16 (16384, 131072), forward KL, "
            "fwd+bwd (mode full), distillkit:",
            f"- >= 80% of the bytes-moved roofline: {share}",
            ratio_line(1, "liger", ours, find_row(rows, "liger", "full", GPU_TARGET))
            + ("" if GPU_PROVIDERS else " (liger-kernel not installed)"),
            ratio_line(1, "compile", ours, find_row(rows, "compile", "full", GPU_TARGET))]


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
    return lines + gpu_targets(rows)


BENCH = OpBench(
    name="kd_loss",
    fused=distillkit.kd_loss,
    reference=kd_loss_ref,
    make_inputs=make_inputs,
    roofline_bytes=roofline_bytes,
    cases=CASES,
    quick_cases=QUICK_CASES,
    gpu_cases=GPU_CASES,
    gpu_providers=GPU_PROVIDERS,
    modes=("full", "forward"),
    targets=targets,
)

if __name__ == "__main__":
    main(BENCH)
