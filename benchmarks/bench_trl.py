"""The TRL loss step: distillkit against TRL's own eager ``generalized_jsd_loss``.

The issue's bar (issue 12): the loss step from the student backbone's output to the
gradients (lm head + loss, forward and backward), N = 2048 tokens, H = 256, fp32, JSD
β = 0.5, T = 1, 2 threads, V = 32000 and 128256;
the teacher's logits are an input (N, V) to every provider. Providers, all from the same (h, W, teacher logits, labels):

- ``distillkit``: ``fused_linear_kd_loss`` (chunked lm head + fused JSD, TRL's
  conventions: no T², per-token mean), the logits never materialized;
- ``eager``: ``h @ Wᵀ`` then TRL's ``GKDTrainer.generalized_jsd_loss`` on the full logits
  (the reference every provider is checked against);
- ``compile``: ``torch.compile`` of the eager path;
- ``dropin``: ``h @ Wᵀ`` then the one-line swap, ``distillkit.integrations.generalized_jsd_loss``.

``layout=gkd`` cases measure GKDTrainer's own call: logits for S + 1 positions per
sequence (B × (S + 1) rows, as the model's forward makes them) and the loss on
``logits[:, :-1, :]``, a slice whose rows cannot be flattened without a copy. There
``distillkit`` is the drop-in reading the slice in place, ``dropin`` the same drop-in
given ``.contiguous()`` slices (the copy it made before), ``eager`` TRL's loss.

    python benchmarks/bench_trl.py --quick
    nice -n 5 python benchmarks/bench_trl.py --threads 2
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import torch

from harness import Case, OpBench, cpu_flags, find_row, main

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import distillkit  # noqa: E402
from distillkit.integrations import generalized_jsd_loss  # noqa: E402
from trl.experimental.gkd.gkd_trainer import GKDTrainer  # noqa: E402

TRL_LOSS = GKDTrainer.generalized_jsd_loss
HIDDEN = 256
# TRL's eager loss holds ~16 fp32 copies of the (N, V) logits at its peak (4.2 GB extra at
# N = 2048, V = 32000, measured): at V = 128256 and N = 2048, ~17 GB. The case is the bar's
# own size; it needs that much free memory for the eager provider and for every provider's
# correctness check (the eager reference), one worker process at a time.
CASES = [Case.of((2048, HIDDEN, 32000), "float32", beta=0.5, layout="flat", chunk_rows=256),
         Case.of((2048, HIDDEN, 128256), "float32", beta=0.5, layout="flat", chunk_rows=128),
         Case.of((4, 513, HIDDEN, 32000), "float32", beta=0.5, layout="gkd", chunk_rows=0)]
QUICK_CASES = [Case.of((96, 32, 500), "float32", beta=0.5, layout="flat", chunk_rows=32),
               Case.of((3, 17, 32, 500), "float32", beta=0.5, layout="gkd", chunk_rows=0)]


def make_inputs(case: Case, device: torch.device):
    """(h, W, teacher logits, labels): h (rows, H) with the rows of the layout, labels
    (B, S) all valid (TRL's batchmean is then the per-token mean)."""
    if case.kwargs["layout"] == "flat":
        n, h, v = case.shape
        batch, positions = 1, n
    else:
        batch, positions, h, v = case.shape
    hidden = torch.randn(batch * positions, h, device=device).requires_grad_()
    weight = (torch.randn(v, h, device=device) * 2 / h**0.5).requires_grad_()
    teacher = torch.randn(batch, positions, v, device=device) * 2
    seq = positions if case.kwargs["layout"] == "flat" else positions - 1
    labels = torch.randint(0, v, (batch, seq), device=device)
    return hidden, weight, teacher, labels


def _logits(hidden, weight, teacher, layout):
    """Student and teacher logits (B, S, V) as the loss sees them."""
    z = (hidden @ weight.t()).reshape(teacher.shape)
    if layout == "gkd":
        return z[:, :-1, :], teacher[:, :-1, :]
    return z, teacher


def eager(hidden, weight, teacher, labels, *, beta, layout, chunk_rows):
    return TRL_LOSS(*_logits(hidden, weight, teacher, layout), labels=labels, beta=beta)


def fused(hidden, weight, teacher, labels, *, beta, layout, chunk_rows):
    if layout == "gkd":
        return generalized_jsd_loss(*_logits(hidden, weight, teacher, layout), labels=labels,
                                    beta=beta)
    return distillkit.fused_linear_kd_loss(
        hidden, weight, teacher.reshape(-1, teacher.shape[-1]), labels=labels.reshape(-1),
        divergence="jsd", beta=beta, scale_by_t2=False, chunk_rows=chunk_rows)


def dropin(hidden, weight, teacher, labels, *, beta, layout, chunk_rows):
    z, u = _logits(hidden, weight, teacher, layout)
    if layout == "gkd":
        z, u = z.contiguous(), u.contiguous()
    return generalized_jsd_loss(z, u, labels=labels, beta=beta)


def roofline_bytes(case: Case, mode: str) -> int:
    """fp32 h, W (and their gradients) and the teacher logits, read once."""
    if case.kwargs["layout"] == "flat":
        n, h, v = case.shape
    else:
        b, s, h, v = case.shape
        n = b * s
    return 4 * ((n * h + v * h) * (1 if mode == "forward" else 2) + n * v)


def _cpu_line() -> str:
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "fma")
    load = os.getloadavg()
    return (f"CPU flags: {' '.join(cpu_flags(wanted)) or 'none of ' + ' '.join(wanted)}; "
            f"{os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
            "(1 / 5 / 15 min) when the run ended: the machine was shared with other jobs.")


def targets(rows: List[Dict[str, Any]]) -> List[str]:
    """The bar at each V: >= 2x faster than TRL eager and <= 1/4 of its extra memory;
    for the GKD slice, what the copy of logits[:, :-1, :] costs."""
    lines = ["Bar (issue 12): loss step, N = 2048, H = 256, fp32, JSD beta = 0.5, 2 threads, "
             "V = 32000 and 128256:"]
    for case in CASES:
        ours, theirs = (find_row(rows, p, "full", case) for p in ("distillkit", "eager"))
        if case.kwargs["layout"] == "gkd":
            copy = find_row(rows, "dropin", "full", case)
            if ours and copy:
                lines.append(f"- GKD slice logits[:, :-1, :] at V = {case.shape[-1]}: read in place "
                             f"{ours['extra_mem_MB']:.0f} MB extra, {ours['median_ms']:.0f} ms; "
                             f"copied first {copy['extra_mem_MB']:.0f} MB, {copy['median_ms']:.0f} ms")
            continue
        v = case.shape[-1]
        if ours is None or theirs is None:
            lines.append(f"- N = {case.shape[0]}, V = {v}: not measured in this run")
            continue
        speed = theirs["median_ms"] / ours["median_ms"]
        mem = ours["extra_mem_MB"] / max(theirs["extra_mem_MB"], 1e-9)
        lines.append(f"- N = {case.shape[0]}, V = {v}: {speed:.2f}x faster than TRL eager "
                     f"({'met' if speed >= 2 else 'NOT met'}: >= 2x), extra memory "
                     f"{ours['extra_mem_MB']:.0f} MB vs {theirs['extra_mem_MB']:.0f} MB = {mem:.3f} "
                     f"({'met' if mem <= 0.25 else 'NOT met'}: <= 1/4)")
        compiled = find_row(rows, "compile", "full", case)
        if compiled:
            lines.append(f"  torch.compile of TRL's loss: {compiled['median_ms']:.0f} ms, "
                         f"{compiled['extra_mem_MB']:.0f} MB extra "
                         f"(distillkit {compiled['median_ms'] / ours['median_ms']:.2f}x faster)")
    lines.append(_cpu_line())
    return lines


BENCH = OpBench(
    name="trl",
    fused=fused,
    reference=eager,
    make_inputs=make_inputs,
    roofline_bytes=roofline_bytes,
    cases=CASES,
    quick_cases=QUICK_CASES,
    modes=("full",),
    targets=targets,
    extra_providers={"dropin": dropin},
    compile_filter=lambda case: case.kwargs["layout"] == "flat",
    compile_note="torch.compile runs on the flat cases only (minutes of compilation per case "
                 "on this CPU); the GKD slice compares the in-place read with the copy.",
)

if __name__ == "__main__":
    main(BENCH)
