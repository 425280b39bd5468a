"""Fused top-K teacher path vs the dense fused path (docs/math.md §4.2), CPU or CUDA.

``fused_linear_sparse_kd_loss`` (student head + cached teacher top-K with its tail mass,
forward KL) against ``fused_linear_kd_loss`` with the teacher's full (N, V) logits, both
chunked over rows (``chunk_rows``), forward + backward (the gradients of the hidden
states and the head weight). N = 1024 tokens, H = 256 and 512, V = 32000, fp32,
K = 32 and 64, T = 1.

Per (provider, case), in a fresh subprocess (one provider's temporaries cannot raise the
next one's peak): one untimed warm-up/memory run, then ``--repeats`` timed runs (median,
min). Memory as in benchmarks/harness.py: CPU the process's peak RSS over one run minus
what it held right before (the inputs), CUDA ``max_memory_allocated`` likewise; and the
teacher's input bytes, which is where the two paths differ most. The 1-minute load
average before and after each subprocess is recorded: on a shared machine the times are
only comparable within one row's load.

    python benchmarks/bench_fused_sparse.py [--device cpu] [--repeats 3] [--out FILE]
    python benchmarks/bench_fused_sparse.py --quick    # tiny sizes, no file
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import _meter, git_rev  # noqa: E402

import distillkit  # noqa: E402
from distillkit.data.sparse_cache import teacher_topk  # noqa: E402

CASES = [(1024, h, 32000, k) for h in (256, 512) for k in (32, 64)]
QUICK_CASES = [(64, 32, 1000, 8)]
CHUNK_ROWS = 256
MARK = "BENCH_RESULT "


def make_inputs(n, h, v, k, provider, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(device).requires_grad_()
    teacher_logits = (torch.randn(n, v, generator=g) * 2).to(device)
    if provider == "dense":
        return hidden, weight, (teacher_logits,)
    # The cache's content: what write_teacher_topk stores for these teacher logits.
    lp, idx, tail = teacher_topk(teacher_logits, k, 1.0)
    del teacher_logits
    return hidden, weight, (idx.to(torch.int32), lp.half(), tail)


def step_fn(provider, hidden, weight, teacher):
    def step():
        if provider == "dense":
            loss = distillkit.fused_linear_kd_loss(hidden, weight, teacher[0],
                                                   chunk_rows=CHUNK_ROWS)
        else:
            loss = distillkit.fused_linear_sparse_kd_loss(hidden, weight, *teacher,
                                                          chunk_rows=CHUNK_ROWS,
                                                          check_duplicates=False)
        torch.autograd.grad(loss, (hidden, weight))
    return step


def worker(job, device, repeats):
    n, h, v, k = job["case"]
    provider = job["provider"]
    meter = _meter(device)
    hidden, weight, teacher = make_inputs(n, h, v, k, provider, device)
    step = step_fn(provider, hidden, weight, teacher)
    peak, extra = meter.peak_bytes(step)
    times = sorted(meter.time_ms(step) for _ in range(repeats))
    return {"median_ms": times[len(times) // 2], "min_ms": times[0], "repeats": repeats,
            "peak_MB": peak / 1e6, "extra_MB": extra / 1e6,
            "teacher_MB": sum(t.numel() * t.element_size() for t in teacher) / 1e6}


def run(job, args):
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job),
           "--device", args.device, "--repeats", str(args.repeats), "--threads",
           str(args.threads)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True).stdout
    row = next((json.loads(line[len(MARK):]) for line in out.splitlines()
                if line.startswith(MARK)), {"failed": True})
    return dict(row, load_before=load_before, load_after=os.getloadavg()[0], **job)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results"
                   / "fused_sparse.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.worker:
        print(MARK + json.dumps(worker(json.loads(args.worker), device, args.repeats)),
              flush=True)
        return
    rows = []
    for case in (QUICK_CASES if args.quick else CASES):
        for provider in ("sparse", "dense"):
            row = run({"case": list(case), "provider": provider}, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        "# Fused top-K teacher path vs dense fused path",
        "",
        "Written by `benchmarks/bench_fused_sparse.py`: forward + backward (gradients of the "
        "hidden states and the head weight), fp32, forward KL, T = 1, chunk_rows = "
        f"{CHUNK_ROWS}. `sparse` = `fused_linear_sparse_kd_loss` on the cached top-K (int32 "
        "indices, fp16 log-probabilities, fp32 tail); `dense` = `fused_linear_kd_loss` with "
        "the teacher's full fp32 logits. Peak MB: the process's peak over one step (CPU: "
        "peak RSS, inputs and the interpreter included); extra MB: that peak minus what was "
        "held right before the step; teacher MB: the teacher's input tensors.",
        "",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}, git revision "
        f"{git_rev()}, torch {torch.__version__}, {args.threads} threads, "
        f"{_meter(device).machine()} ({device.type}); {args.repeats} timed runs per row",
        "- the machine is shared: the 1-minute load average before / after each row is given",
        "",
        "| N | H | V | K | provider | median ms | min ms | peak MB | extra MB | teacher MB "
        "| sparse / dense time | load before / after |",
        "|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    dense_ms = {tuple(r["case"]): r.get("median_ms") for r in rows if r["provider"] == "dense"}
    for r in rows:
        n, h, v, k = r["case"]
        if r.get("failed"):
            lines.append(f"| {n} | {h} | {v} | {k} | {r['provider']} | failed | | | | | | |")
            continue
        ratio = (f"{r['median_ms'] / dense_ms[tuple(r['case'])]:.2f}"
                 if r["provider"] == "sparse" and dense_ms.get(tuple(r["case"])) else "")
        lines.append(f"| {n} | {h} | {v} | {k} | {r['provider']} | {r['median_ms']:.0f} "
                     f"| {r['min_ms']:.0f} | {r['peak_MB']:.0f} | {r['extra_MB']:.0f} "
                     f"| {r['teacher_MB']:.1f} "
                     f"| {ratio} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
