"""The floors the GPU targets are measured against (docs/gpu.md), timed on this GPU.

- bytes floor of kd_loss fwd+bwd at (16384, 131072) bf16: ``torch.add(z, u, out=g)`` into a
  resident buffer reads the student and the teacher once and writes a gradient-sized
  tensor, the traffic of a single-pass kd_loss (issue 15's probe, on the GPU);
- the three GEMMs of fused linear KD at N = 8192, H = 4096, C = 128256 bf16 (the case of
  ``bench_fused_linear.py --gpu``): logits ``h Wᵀ`` (N x C), the hidden gradient ``G W``
  (N x H) and the weight gradient ``Gᵀ h`` (C x H), with G an (N, C) bf16 gradient, into
  preallocated outputs; the fused path's target is 1.1x their sum.

Medians of CUDA-event timings after a warm-up; GB/s and TFLOP/s against the bytes and
FLOPs named in each row.

    python benchmarks/gpu_floors.py              # on a GPU: writes results/gpu_floors_<GPU>.md
    python benchmarks/gpu_floors.py --dry-run    # tiny shapes on the CPU, nothing written
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KD_SHAPE = (16384, 131072)
FUSED_SHAPE = (8192, 4096, 128256)  # N, H, C


def time_ms(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    step()  # warm-up (cuBLAS heuristics, allocator)
    times: List[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def floors(device: torch.device, kd_shape, fused_shape, repeats: int) -> List[Tuple[str, float, str]]:
    rows = []
    dt = torch.bfloat16
    z = torch.randn(kd_shape, device=device, dtype=dt)
    u = torch.randn(kd_shape, device=device, dtype=dt)
    g = torch.empty_like(z)
    ms = time_ms(lambda: torch.add(z, u, out=g), device, repeats)
    moved = 3 * z.numel() * z.element_size()
    rows.append((f"kd_loss bytes floor: torch.add(z, u, out=g), {kd_shape[0]}x{kd_shape[1]} bf16",
                 ms, f"{moved / 1e9:.2f} GB, {moved / (ms * 1e6):.0f} GB/s"))
    del z, u, g

    n, h, c = fused_shape
    x = torch.randn(n, h, device=device, dtype=dt)
    w = (torch.randn(c, h, device=device) / h**0.5).to(dt)
    grad = torch.randn(n, c, device=device, dtype=dt)
    logits, gx, gw = (torch.empty(s, device=device, dtype=dt) for s in ((n, c), (n, h), (c, h)))
    flops = 2 * n * h * c
    total = 0.0
    for name, step in (("logits h W^T", lambda: torch.mm(x, w.t(), out=logits)),
                       ("hidden grad G W", lambda: torch.mm(grad, w, out=gx)),
                       ("weight grad G^T h", lambda: torch.mm(grad.t(), x, out=gw))):
        ms = time_ms(step, device, repeats)
        total += ms
        rows.append((f"fused linear GEMM {name}, N={n} H={h} C={c} bf16", ms,
                     f"{flops / (ms * 1e9):.0f} TFLOP/s"))
    rows.append(("fused linear: the three GEMMs, summed", total,
                 f"{3 * flops / (total * 1e9):.0f} TFLOP/s; target for fused fwd+bwd: "
                 f"<= {1.1 * total:.2f} ms (1.1x)"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, no file")
    p.add_argument("--repeats", type=int, default=10)
    opts = p.parse_args(argv)
    if opts.dry_run:
        device, kd, fused = torch.device("cpu"), (64, 1000), (32, 64, 1000)
        name = "CPU (dry run)"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_floors: no CUDA device visible (use --dry-run on the CPU)")
        device, kd, fused = torch.device("cuda"), KD_SHAPE, FUSED_SHAPE
        name = torch.cuda.get_device_name(device)
    rows = floors(device, kd, fused, opts.repeats)
    lines = [f"# Floors on {name}, torch {torch.__version__}", "",
             "`benchmarks/gpu_floors.py`: medians of CUDA-event timings.", "",
             "| what | median ms | rate |", "|---|--:|---|"]
    lines += [f"| {what} | {ms:.3f} | {rate} |" for what, ms, rate in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if not opts.dry_run:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        out = RESULTS_DIR / f"gpu_floors_{slug}.md"
        out.write_text(text)
        print(f"gpu_floors: written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
