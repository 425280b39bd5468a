"""Host-synchronisation check of every op's CUDA path, forward and backward.

Runs each case below twice (the second call is where a deferred error report would
surface) under ``torch.cuda.set_sync_debug_mode("error")``, in which any CUDA call that
synchronises the host with the device (``.item()``, a device-to-host copy, ``nonzero``,
a blocking stream sync) raises. Inputs are made before the mode is turned on; nothing
else runs inside it. A case passes when both calls complete without such a call and the
loss is finite; it fails with the first synchronising call's message and the distillkit
frame that made it.

    python benchmarks/gpu_sync_check.py              # on a GPU: writes results/gpu_sync_<GPU>.md
    python benchmarks/gpu_sync_check.py --dry-run    # on the CPU: the same calls, no sync mode

``--dry-run`` checks that the cases are valid calls of today's API (it cannot see syncs).
Exit status 1 when a case fails.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, List, Tuple

import torch
import torch.distributed as dist

import distillkit
from distillkit.parallel import vocab_parallel_kd_loss
from distillkit.sparse_cache import teacher_topk
from distillkit.ops import coordinate_lstm_step
from distillkit.reference import DISTANCE_OPS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
N = 64
WARP_C, BLOCK_C = 1000, 32000  # launch::kWarpRowMaxCols = 1024 splits warp and block rows

Case = Tuple[str, Callable[[torch.device], Callable[[], torch.Tensor]]]


def _logits(n, c, device, dtype=torch.bfloat16, grad=True):
    return torch.randn(n, c, device=device, dtype=dtype).requires_grad_(grad)


def _labels(n, c, device):
    labels = torch.randint(0, c, (n,), device=device)
    labels[::7] = -100  # ignored rows
    return labels


def kd_case(divergence: str, c: int, teacher_grad: bool = False, weighted: bool = False):
    def make(device):
        z = _logits(N, c, device)
        u = _logits(N, c, device, grad=teacher_grad)
        labels = _labels(N, c, device)
        weight = torch.rand(N, device=device) if weighted else None

        def run():
            loss = distillkit.kd_loss(z, u, labels=labels, weight=weight, temperature=2.0,
                                      divergence=divergence, hard_weight=0.2)
            loss.backward()
            return loss
        return run
    return make


def _topk_teacher(c: int, device):
    """A cached top-8 teacher, as the cache writes it: indices, log-probabilities and the
    log tail mass."""
    logprobs, index, tail = teacher_topk(torch.randn(N, c, device=device), 8, 1.0)
    return index, logprobs, tail


def sparse_case(c: int, divergence: str = "forward_kl"):
    def make(device):
        z = _logits(N, c, device)
        index, logprobs, tail = _topk_teacher(c, device)
        labels = _labels(N, c, device)
        tail = tail if divergence != "forward_kl" else None

        def run():
            loss = distillkit.sparse_kd_loss(z, index, logprobs, teacher_tail_logprob=tail,
                                             labels=labels, temperature=2.0,
                                             divergence=divergence)
            loss.backward()
            return loss
        return run
    return make


def slam_case(c: int, per_row_k: bool):
    def make(device):
        z = _logits(N, c, device)
        teacher = torch.softmax(torch.randn(N, c, device=device), -1)
        alpha = torch.rand(N, device=device) * 0.8 + 0.1
        k = torch.randint(1, 6, (N,), device=device) if per_row_k else 5

        def run():
            loss = distillkit.slam_loss(z, teacher, alpha, k)
            loss.backward()
            return loss
        return run
    return make


def distance_case(op: str, shape, dim: int):
    def make(device):
        s = torch.randn(shape, device=device, dtype=torch.bfloat16).requires_grad_()
        t = torch.randn(shape, device=device, dtype=torch.bfloat16)

        def run():
            loss = distillkit.distance(s, t, op, dim=dim, temperature=4.0 if op == "kl" else 1.0)
            loss.backward()
            return loss
        return run
    return make


def fused_linear_case():
    def make(device):
        h = torch.randn(N, 256, device=device, dtype=torch.bfloat16).requires_grad_()
        w = (torch.randn(BLOCK_C, 256, device=device) / 16).to(torch.bfloat16).requires_grad_()
        u = torch.randn(N, BLOCK_C, device=device, dtype=torch.bfloat16)
        labels = _labels(N, BLOCK_C, device)

        def run():
            loss = distillkit.fused_linear_kd_loss(h, w, u, labels=labels, temperature=2.0,
                                                   hard_weight=0.2, chunk_rows=16)
            loss.backward()
            return loss
        return run
    return make


def fused_sparse_case():
    def make(device):
        h = torch.randn(N, 256, device=device, dtype=torch.bfloat16).requires_grad_()
        w = (torch.randn(BLOCK_C, 256, device=device) / 16).to(torch.bfloat16).requires_grad_()
        index, logprobs, tail = _topk_teacher(BLOCK_C, device)

        def run():
            loss = distillkit.fused_linear_sparse_kd_loss(h, w, index, logprobs, tail,
                                                          divergence="jsd", chunk_rows=16)
            loss.backward()
            return loss
        return run
    return make


def _one_rank_group(device):
    """The default group, of this process alone: NCCL for CUDA tensors and gloo for CPU
    ones (the shard shapes), as a tensor-parallel job would set it up; its communicator
    is created here, before the sync mode is on."""
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{tempfile.mktemp()}", rank=0,
                                world_size=1)
    dist.all_reduce(torch.zeros(1, device=device))


def vocab_parallel_case(divergence: str, temperature: float):
    def make(device):
        _one_rank_group(device)
        z = _logits(N, BLOCK_C, device)
        u = _logits(N, BLOCK_C, device, grad=False)
        labels = _labels(N, BLOCK_C, device)

        def run():
            loss = vocab_parallel_kd_loss(z, u, labels=labels, temperature=temperature,
                                          divergence=divergence, hard_weight=0.2)
            loss.backward()
            return loss
        return run
    return make


def coordinate_lstm_case(hidden: Tuple[int, ...], head: bool):
    def make(device):
        P, width = 4096, sum(hidden)
        grad = torch.randn(P, device=device)
        params = torch.randn(P, device=device)
        h = torch.zeros(P, width, device=device)
        c = torch.zeros(P, width, device=device)
        inputs = (2,) + hidden[:-1]
        w_ih = [torch.randn(4 * k, i, device=device).div_(k).requires_grad_()
                for i, k in zip(inputs, hidden)]
        w_hh = [torch.randn(4 * k, k, device=device).div_(k).requires_grad_() for k in hidden]
        bias = [torch.zeros(4 * k, device=device).requires_grad_() for k in hidden]
        hw = torch.randn(1, hidden[-1], device=device).requires_grad_() if head else None
        hb = torch.zeros(1, device=device).requires_grad_() if head else None

        def run():
            out, h1, c1 = coordinate_lstm_step(grad, params, h, c, w_ih, w_hh, bias, hw, hb)
            loss = out.sum() + h1.sum() + c1.sum()
            loss.backward()
            return loss
        return run
    return make


def cases() -> List[Case]:
    out: List[Case] = []
    for c, path in ((WARP_C, "warp rows"), (BLOCK_C, "block rows")):
        for div in ("forward_kl", "reverse_kl", "jsd"):
            out.append((f"kd_loss {div}, {path}", kd_case(div, c)))
        out.append((f"sparse_kd_loss, {path}", sparse_case(c)))
        out.append((f"sparse_kd_loss tail + jsd, {path}", sparse_case(c, "jsd")))
        out.append((f"slam_loss, {path}", slam_case(c, per_row_k=False)))
    out.append(("kd_loss teacher grad + row weights", kd_case("forward_kl", BLOCK_C, True, True)))
    out.append(("slam_loss per-row k", slam_case(WARP_C, per_row_k=True)))
    for op in DISTANCE_OPS:
        out.append((f"distance {op}, rows", distance_case(op, (N, BLOCK_C), -1)))
        out.append((f"distance {op}, strided (dim=1)", distance_case(op, (8, 64, 16, 16), 1)))
    out.append(("fused_linear_kd_loss", fused_linear_case()))
    out.append(("fused_linear_sparse_kd_loss tail + jsd", fused_sparse_case()))
    out.append(("vocab_parallel_kd_loss forward_kl, 1 rank", vocab_parallel_case("forward_kl", 2.0)))
    # T = 1e4: every row takes the backward's cancellation-free pass (global offset).
    out.append(("vocab_parallel_kd_loss jsd T=1e4, 1 rank", vocab_parallel_case("jsd", 1e4)))
    out.append(("coordinate_lstm_step 2x20+head", coordinate_lstm_case((20, 20), True)))
    out.append(("coordinate_lstm_step 3x64,1", coordinate_lstm_case((64, 64, 64, 1), False)))
    return out


def distillkit_frame(exc: BaseException) -> str:
    """The innermost frame of the traceback inside the distillkit package, if any."""
    root = Path(distillkit.__file__).resolve().parent
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if Path(f.filename).resolve().is_relative_to(root)]
    return f"{Path(frames[-1].filename).relative_to(root.parent)}:{frames[-1].lineno}" \
        if frames else "-"


def run_case(make, device: torch.device, dry_run: bool) -> str:
    torch.manual_seed(0)
    step = make(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not dry_run:
        torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(), step()]
    except RuntimeError as e:
        message = str(e).strip().splitlines()[0]
        return f"FAIL: {message} (at {distillkit_frame(e)})"
    finally:
        if not dry_run:
            torch.cuda.set_sync_debug_mode(0)
    values = [float(loss.detach().float().cpu()) for loss in losses]
    if not all(math.isfinite(v) for v in values):
        return f"FAIL: non-finite loss {values}"
    return "ok"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="run the cases on the CPU without the sync debug mode")
    p.add_argument("--out", type=Path, default=None, help="markdown file (default: by GPU name)")
    opts = p.parse_args(argv)
    if not opts.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_sync_check: no CUDA device visible (use --dry-run on the CPU)")
    device = torch.device("cpu" if opts.dry_run else "cuda")
    name = "CPU (dry run)" if opts.dry_run else torch.cuda.get_device_name(device)

    rows = []
    for label, make in cases():
        status = run_case(make, device, opts.dry_run)
        print(f"{label}: {status}", flush=True)
        rows.append((label, status))

    if dist.is_initialized():
        dist.destroy_process_group()
    failed = [r for r in rows if r[1] != "ok"]
    lines = [f"# Host-sync check: {name}, torch {torch.__version__}", "",
             "`benchmarks/gpu_sync_check.py`: every case runs forward + backward twice under "
             "`torch.cuda.set_sync_debug_mode(\"error\")`" +
             (" (dry run: no sync mode, CPU)" if opts.dry_run else ""), "",
             f"{len(rows) - len(failed)}/{len(rows)} cases without a host sync.", "",
             "| case | result |", "|---|---|"]
    lines += [f"| {label} | {status} |" for label, status in rows]
    text = "\n".join(lines) + "\n"
    if not opts.dry_run:
        slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        out = opts.out or RESULTS_DIR / f"gpu_sync_{slug}.md"
        out.write_text(text)
        print(f"gpu_sync_check: written to {out}")
    print(f"gpu_sync_check: {len(rows) - len(failed)}/{len(rows)} ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
