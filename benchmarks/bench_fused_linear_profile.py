"""Where the time of ``fused_linear_kd_loss`` goes, per chunk (benchmarks/results/
fused_linear_profile.md).

Times each step of one chunk of the fused loop as the implementation runs it, in rounds
(every step once per round, so that the load of a shared machine falls on all of them
alike), and reports medians over rounds: the logits GEMM ``z = h Wᵀ``, the kd_loss
forward and backward kernel passes, the hidden-gradient GEMM ``dh = dz W`` (with its
copy into ``grad_h``), the weight-gradient GEMM ``dzᵀ h`` and its accumulation into the
fp32 buffer (conversion, add), the buffer's zero fill, and the same GEMMs into resident
(reused) outputs, to separate allocation (page faults of fresh multi-MB tensors) from
arithmetic. Also the whole fused call and its three full-size GEMMs.

    python benchmarks/bench_fused_linear_profile.py --dtype bfloat16 --chunk-rows 256 512 1024
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import torch

from harness import CpuMeter

import distillkit
from distillkit.ops import kd_loss_backward, kd_loss_forward, matmul_into
from distillkit.ops.options import KDOptions


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def steps(h, w, u, rows: int, opts: KDOptions) -> Dict[str, Callable[[], object]]:
    """The steps of one chunk of ``rows`` rows, each runnable on its own."""
    h_c, u_c = h[:rows], u[:rows]
    acc = torch.float32
    z = h_c @ w.t()
    scale = torch.full((rows,), 1.0 / h.shape[0], dtype=acc)
    _, stats = kd_loss_forward(z, u_c, None, opts)
    dz, _ = kd_loss_backward(scale, z, u_c, None, stats, opts, False)
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros(w.shape, dtype=acc)
    part = dz.t() @ h_c
    z_out, dh_out, dw_out = torch.empty_like(z), torch.empty_like(h_c), torch.empty_like(part)
    out = {
        "z = h Wᵀ (fresh)": lambda: h_c @ w.t(),
        "z = h Wᵀ (resident out)": lambda: torch.mm(h_c, w.t(), out=z_out),
        "kd_loss forward": lambda: kd_loss_forward(z, u_c, None, opts),
        "kd_loss backward": lambda: kd_loss_backward(scale, z, u_c, None, stats, opts, False),
        "dh = dz W + copy to grad_h": lambda: grad_h.__setitem__(slice(0, rows), dz @ w),
        "dh = dz W (resident out)": lambda: torch.mm(dz, w, out=dh_out),
        "dW part = dzᵀ h (fresh)": lambda: dz.t() @ h_c,
        "dW part = dzᵀ h (resident out)": lambda: torch.mm(dz.t(), h_c, out=dw_out),
        "dW part.to(fp32)": lambda: part.to(acc),
        "grad_w += part (as the loop: .to + add)": lambda: grad_w.add_(part.to(acc)),
        "grad_w zero fill (once per call)": lambda: grad_w.zero_(),
    }
    if w.dtype == acc:
        out["grad_w.addmm_(dzᵀ, h) (beta=1)"] = lambda: grad_w.addmm_(dz.t(), h_c)
        del out["dW part.to(fp32)"]
    else:
        out["z.float() (a logits chunk to fp32)"] = lambda: z.float()
        out["grad_w += dzᵀ h by matmul_into (bf16 in, fp32 out, beta=1)"] = (
            lambda: matmul_into(grad_w, dz.t(), h_c, True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--shape", type=int, nargs=3, default=(1024, 1024, 128256),
                    metavar=("N", "H", "C"))
    ap.add_argument("--chunk-rows", type=int, nargs="+", default=(256, 512, 1024))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--whole", action="store_true", help="also time the whole call and its GEMMs")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round (CI)")
    args = ap.parse_args()
    if args.quick:
        args.shape, args.chunk_rows, args.rounds, args.whole = (64, 32, 500), (16, 32), 1, True
    dt = getattr(torch, args.dtype)
    n, hid, c = args.shape
    torch.manual_seed(0)
    h = torch.randn(n, hid).to(dt)
    w = (torch.randn(c, hid) / hid**0.5).to(dt)
    u = torch.randn(n, c).to(dt)
    opts = KDOptions.resolve(None, temperature=2.0)
    print(f"# {CpuMeter().machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype}, N={n} H={hid} C={c}, "
          f"load before {os.getloadavg()}", flush=True)
    for rows in args.chunk_rows:
        fns = steps(h, w, u, rows, opts)
        times: Dict[str, List[float]] = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                times[k].append(timed(fn))
        gemm_flop = 2 * rows * hid * c
        print(f"\n## chunk_rows={rows} (load after {os.getloadavg()[0]:.1f})")
        print("| step | median ms | GFLOP/s (GEMMs) |\n|---|--:|--:|")
        for k, ts in times.items():
            med = statistics.median(ts)
            rate = f"{gemm_flop / med / 1e9:.0f}" if "=" in k and "W" in k and "+=" not in k else ""
            print(f"| {k} | {med * 1e3:.0f} | {rate} |", flush=True)
        del fns
    if args.whole:
        hg = h.clone().requires_grad_()
        wg = w.clone().requires_grad_()
        dz = torch.randn(n, c).to(dt)

        def fused(rows):
            hg.grad = wg.grad = None
            distillkit.fused_linear_kd_loss(hg, wg, u, temperature=2.0, chunk_rows=rows).backward()

        fns = {"3 GEMMs (full N)": lambda: (h @ w.t(), dz @ w, dz.t() @ h)}
        fns.update({f"fused chunk_rows={r}": (lambda r=r: fused(r)) for r in args.chunk_rows})
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                times[k].append(timed(fn))
        base = statistics.median(times["3 GEMMs (full N)"])
        print(f"\n## whole call (load after {os.getloadavg()[0]:.1f})\n| | median ms | x 3 GEMMs |\n|---|--:|--:|")
        for k, ts in times.items():
            print(f"| {k} | {statistics.median(ts) * 1e3:.0f} | {statistics.median(ts) / base:.2f} |")


if __name__ == "__main__":
    main()
