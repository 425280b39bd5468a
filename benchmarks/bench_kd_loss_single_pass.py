"""kd_loss fwd+bwd in one pass (issue 15) against its memory floor, side by side.

    python benchmarks/bench_kd_loss_single_pass.py [--rows 4096] [--cols 32000] [--rounds 7]
                                                   [--out benchmarks/results/kd_single_pass.md]

Providers, fp32 (N, C) logits, forward KL, T = 2, mean reduction, student requiring grad:

- ``floor``: ``torch.add(s, t, out=g)`` into a resident buffer: read two N x C tensors,
  write one, the least any fwd+bwd moves (read z and u, write dz);
- ``single_pass``: ``distillkit.kd_loss`` forward + ``autograd.grad`` (kd_loss_forward_grad,
  then the backward's scaling);
- ``two_pass``: the ops the previous kd_loss autograd ran, ``kd_loss_forward`` then
  ``kd_loss_backward`` (re-reads z and u), called directly;
- ``scaled_op``: ``kd_loss_forward_grad`` with ``grad_scale`` = 1/N, the final gradient in
  one pass, as a caller that knows the scale at forward time (fused linear KD) gets it;
- ``eager`` and ``compile``: ``kd_loss_ref`` and ``torch.compile(kd_loss_ref)``.

The machine is shared, so the providers run in interleaved rounds (each round runs every
provider once, the order rotating by round) and the medians are over rounds: load that
drifts hits every provider alike. Each gradient is checked against the eager one first.
Peak memory is the step's rise of the resident set above what was resident before it
(``VmHWM`` after ``clear_refs``; the inputs and the floor's buffers are not counted).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

import torch

from harness import CpuMeter, cpu_flags, git_rev

import distillkit
from distillkit import KDOptions
from distillkit.reference import kd_loss_ref

KW = dict(temperature=2.0, divergence="forward_kl")
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")


def providers(z, u):
    n = z.shape[0]
    opts = KDOptions(**KW)
    s, t = z.detach(), u
    g = torch.empty_like(s)
    compiled = torch.compile(kd_loss_ref, dynamic=False)
    rows_grad = torch.full((n,), 1.0 / n)

    def floor():
        torch.add(s, t, out=g)
        return None

    def single_pass():
        return torch.autograd.grad(distillkit.kd_loss(z, u, **KW), z)[0]

    def two_pass():
        with torch.no_grad():
            _, stats = torch.ops.distillkit.kd_loss_forward(s, t, None, *opts.schema_args())
            return torch.ops.distillkit.kd_loss_backward(rows_grad, s, t, None, stats,
                                                         *opts.schema_args(), False)[0]

    def scaled_op():
        with torch.no_grad():
            return torch.ops.distillkit.kd_loss_forward_grad(s, t, None, rows_grad,
                                                             *opts.schema_args(), False)[2]

    def eager():
        return torch.autograd.grad(kd_loss_ref(z, u, **KW), z)[0]

    def compile_():
        return torch.autograd.grad(compiled(z, u, **KW), z)[0]

    return {"floor": floor, "single_pass": single_pass, "two_pass": two_pass,
            "scaled_op": scaled_op, "eager": eager, "compile": compile_}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds, no file (CI)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.cols, args.rounds, args.out = 64, 500, 2, None
    meter = CpuMeter()
    torch.manual_seed(0)
    z = torch.randn(args.rows, args.cols).requires_grad_()
    u = torch.randn(args.rows, args.cols)
    fns = providers(z, u)

    want = fns["eager"]()
    for name in ("single_pass", "two_pass", "scaled_op", "compile"):  # also the warm-up (compilation)
        got = fns[name]()
        err = ((got - want).abs().max() / want.abs().max()).item()
        if err > 1e-4:
            raise SystemExit(f"{name}: gradient differs from the eager reference by {err:.2e}")
    del want, got
    for fn in fns.values():  # warm: output cache, first-touch pages
        fn()

    load_before = os.getloadavg()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(meter.time_ms(fns[name]))
    load_after = os.getloadavg()
    peaks = {name: meter.peak_bytes(fns[name])[1] for name in names}

    med = {name: statistics.median(ts) for name, ts in times.items()}
    floor = med["floor"]
    lines = [
        f"# kd_loss fwd+bwd in one pass vs its floor, fp32 {args.rows}x{args.cols}",
        "",
        f"Written by `benchmarks/bench_kd_loss_single_pass.py --rows {args.rows} --cols "
        f"{args.cols} --rounds {args.rounds}`: forward KL, T = 2, mean reduction, the student "
        "requiring grad. Rounds interleaved (every provider once per round, order rotating); "
        "median and min over rounds. Peak: the step's rise of resident memory.",
        "",
        f"- CPU: {meter.machine()} ({platform.machine()}), flags {' '.join(cpu_flags(FLAGS))}; "
        f"{torch.get_num_threads()} threads; distillkit CPU level "
        f"{distillkit._C.cpu_capability}",
        f"- torch {torch.__version__}; git {git_rev()}",
        f"- load average (1/5/15 min) before the rounds {load_before[0]:.1f}/"
        f"{load_before[1]:.1f}/{load_before[2]:.1f}, after {load_after[0]:.1f}/"
        f"{load_after[1]:.1f}/{load_after[2]:.1f} (the machine is shared)",
        "",
        "| provider | median (ms) | min (ms) | / floor | peak (MB) |",
        "|---|--:|--:|--:|--:|",
    ]
    for name in names:
        lines.append(f"| {name} | {med[name]:.1f} | {min(times[name]):.1f} | "
                     f"{med[name] / floor:.2f} | {peaks[name] / 2**20:.0f} |")
    sp = med["single_pass"]
    lines += [
        "",
        f"- single_pass / floor: {sp / floor:.2f} (target <= 2)",
        f"- compile / single_pass: {med['compile'] / sp:.1f}x (target >= 5)",
        f"- two_pass / single_pass: {med['two_pass'] / sp:.2f}x; eager / single_pass: "
        f"{med['eager'] / sp:.1f}x",
        f"- scaled_op (final gradient in one pass) / floor: {med['scaled_op'] / floor:.2f}; "
        f"compile / scaled_op: {med['compile'] / med['scaled_op']:.1f}x",
        "",
        "Per-round times (ms): " + "; ".join(
            f"{name} " + " ".join(f"{t:.0f}" for t in times[name]) for name in names),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
