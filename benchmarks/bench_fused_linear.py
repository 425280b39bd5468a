"""Benchmark of ``distillkit.fused_linear_kd_loss`` (docs/math.md §2).

Providers: ``distillkit`` (chunked lm-head + fused kd_loss), ``unfused`` (the full (N, C)
logits ``h @ Wᵀ`` then the fused ``kd_loss``), ``eager`` (matmul + ``kd_loss_ref``) and
``compile`` (``torch.compile`` of the eager path). N = 2048 tokens, H = 1024, C = 32000
and 128256, fp32, forward KL, T = 2, teacher given as logits; mode ``full``.

Roofline bytes are those of the unavoidable matmul operands and teacher logits:
N*H + C*H (+ gradients) + N*C teacher logits, in the inputs' dtype.

    python benchmarks/bench_fused_linear.py --quick
    python benchmarks/bench_fused_linear.py
    python benchmarks/bench_fused_linear.py --gpu     # GPU size in bf16 on cuda
    python benchmarks/bench_fused_linear.py --interleaved [--before REV] [--quick]

--gpu: N = 8192 tokens, H = 4096 (a Llama-3-8B student), C = 128256, bf16, chunks of 2048
rows; the time of its three GEMMs alone, the issue's floor (docs/gpu.md), is measured by
``benchmarks/gpu_floors.py``.

--interleaved: the issue-15 comparison on a shared machine, in one process: N = 1024,
H = 1024, C = 128256, fp32 and bf16, chunks of 512 rows (1024 holds an fp32 chunk's z and
dz, 1.05 GB, besides the 525 MB fp32 weight gradient: a third of eager's extra memory;
``--chunk-rows`` adds other sizes), fwd+bwd of ``distillkit``, of the three GEMMs it
must do alone (``z = h Wᵀ``, ``dh = dz W``, ``dW = dzᵀ h``, in torch's matmuls, the
fused loop's layouts, outputs in the inputs' dtype), ``unfused``, ``eager`` and
``compile``, and with ``--before REV`` the fused function as it was at that git revision
(its Python file loaded from git, on this build's kernels). Every round runs each
provider once, so load that drifts during the run hits all alike; the report is the
median over rounds, the ratios of medians, and each provider's peak extra memory (the
harness's measure, one untimed run each). ``--quick``: a tiny shape, for CI.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List

import torch

from harness import (REPO_ROOT, Case, CpuMeter, OpBench, cpu_flags, find_row, git_rev, main,
                     ratio_line)

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

INTERLEAVED_CASES = [Case.of((1024, 1024, 128256), dt, temperature=2.0, chunk_rows=512)
                     for dt in ("float32", "bfloat16")]
INTERLEAVED_QUICK = [Case.of((96, 64, 1000), dt, temperature=2.0, chunk_rows=32)
                     for dt in ("float32", "bfloat16")]


def three_gemms(hidden, weight, teacher, *, temperature, chunk_rows):
    """The GEMMs fused linear KD must do, alone: ``z = h Wᵀ``, ``dh = dz W``, ``dW = dzᵀ h``
    (the teacher logits stand in for the (N, C) ``dz``: same shape and dtype)."""
    with torch.no_grad():
        h, w = hidden.detach(), weight.detach()
        return h @ w.t(), teacher @ w, teacher.t() @ h


class ResidentGemms:
    """:func:`three_gemms` into outputs allocated on the first call of a case and reused:
    the GEMMs' arithmetic alone, without the page faults of fresh multi-MB outputs."""

    def __init__(self):
        self.outs = None

    def __call__(self, hidden, weight, teacher, *, temperature, chunk_rows):
        h, w = hidden.detach(), weight.detach()
        shapes = ((h.shape[0], w.shape[0]), h.shape, w.shape)
        if self.outs is None or self.outs[0].dtype != h.dtype or \
                tuple(o.shape for o in self.outs) != shapes:
            self.outs = tuple(h.new_empty(shape) for shape in shapes)
        z, dh, dw = self.outs
        torch.mm(h, w.t(), out=z)
        torch.mm(teacher, w, out=dh)
        torch.mm(teacher.t(), h, out=dw)
        return self.outs


def load_revision(rev: str) -> Callable[..., torch.Tensor]:
    """``fused_linear_kd_loss`` as distillkit/losses/fused_linear.py was at git ``rev``,
    run on this checkout's ops (an A/B of the Python loop on the same kernels)."""
    source = subprocess.run(["git", "-C", str(REPO_ROOT), "show",
                             f"{rev}:distillkit/losses/fused_linear.py"],
                            capture_output=True, text=True, check=True).stdout
    name = "distillkit.losses._fused_linear_at_" + "".join(c for c in rev if c.isalnum())
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "distillkit.losses"
    exec(compile(source, f"{rev}:distillkit/losses/fused_linear.py", "exec"), module.__dict__)
    return module.fused_linear_kd_loss


def _full_step(fn, inputs, kwargs) -> Callable[[], Any]:
    hidden, weight, teacher = inputs

    def step():
        out = fn(hidden, weight, teacher, **kwargs)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            torch.autograd.grad(out, (hidden, weight))
    return step


def interleaved(argv: List[str]) -> None:
    ap = argparse.ArgumentParser(description="fused_linear_kd_loss, interleaved providers")
    ap.add_argument("--interleaved", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before", default=None, help="git revision of the fused loop to compare")
    ap.add_argument("--rounds", type=int, default=None, help="default 5, quick 2")
    ap.add_argument("--dtypes", nargs="+", default=("float32", "bfloat16"))
    ap.add_argument("--chunk-rows", type=int, nargs="+", default=(),
                    help="also time distillkit at these chunk sizes")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-eager", action="store_true")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    meter = CpuMeter()
    flags = cpu_flags(("avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))
    print(f"## fused_linear_kd_loss, interleaved: {meter.machine()} ({', '.join(flags)}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, rev {git_rev()}, "
          f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}, "
          f"load average {os.getloadavg()[0]:.1f}, {rounds} rounds\n", flush=True)
    providers: Dict[str, Callable[..., Any]] = {"distillkit": fused, "3 GEMMs": three_gemms,
                                                "3 GEMMs, resident outputs": ResidentGemms()}
    for rows in args.chunk_rows:
        providers[f"distillkit chunk_rows={rows}"] = (
            lambda h, w, t, *, temperature, chunk_rows, rows=rows:
            fused(h, w, t, temperature=temperature, chunk_rows=rows))
    if args.before:
        before = load_revision(args.before)
        providers[f"distillkit@{args.before}"] = (
            lambda h, w, t, *, temperature, chunk_rows:
            before(h, w, t, temperature=temperature, chunk_rows=chunk_rows))
    providers["unfused"] = unfused
    if not args.no_eager:
        providers["eager"] = reference
    if not args.no_compile:
        providers["compile"] = torch.compile(reference, dynamic=False)
    print("| shape | dtype | provider | median ms | x 3 GEMMs | x 3 GEMMs resident | compile / it "
          "| extra MB | x eager's memory | check |\n|---|---|---|--:|--:|--:|--:|--:|--:|---|")
    for case in INTERLEAVED_QUICK if args.quick else INTERLEAVED_CASES:
        if case.dtype not in args.dtypes:
            continue
        kwargs = dict(case.kwargs)
        torch.manual_seed(0)
        inputs = make_inputs(case, torch.device("cpu"))
        want = None
        checks, extra, times = {}, {}, {name: [] for name in providers}
        for name, fn in providers.items():
            if name.startswith("3 GEMMs"):
                checks[name] = "-"
            else:
                out = fn(*inputs, **kwargs)
                got = (out, *torch.autograd.grad(out, inputs[:2]))
                if want is None:
                    want = got
                errs = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                        for a, b in zip(got, want)]
                checks[name] = f"{max(errs):.1e}"
                del out, got
            extra[name] = meter.peak_bytes(_full_step(fn, inputs, kwargs))[1] / 1e6
        for _ in range(rounds):
            for name, fn in providers.items():
                times[name].append(meter.time_ms(_full_step(fn, inputs, kwargs)))
        med = {name: statistics.median(t) for name, t in times.items()}
        for name in providers:
            comp = f"{med['compile'] / med[name]:.2f}" if "compile" in med else ""
            mem = f"{extra[name] / extra['eager']:.2f}" if extra.get("eager", 0) > 0 else ""
            resident = med["3 GEMMs, resident outputs"]
            print(f"| {case.shape_str} | {case.dtype} | {name} | {med[name]:.0f} | "
                  f"{med[name] / med['3 GEMMs']:.2f} | {med[name] / resident:.2f} | {comp} "
                  f"| {extra[name]:.0f} | {mem} "
                  f"| {checks[name]} |", flush=True)
        del inputs, want
    print(f"\ncheck: max |provider - distillkit| / max |distillkit| over loss, dh, dW. "
          f"load average after: {os.getloadavg()[0]:.1f}.")


if __name__ == "__main__":
    if "--interleaved" in sys.argv:
        interleaved(sys.argv[1:])
    else:
        main(BENCH)
