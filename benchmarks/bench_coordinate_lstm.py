"""Benchmark of ``distillkit.ops.coordinate_lstm_step`` (docs/math.md §8) against the
``nn.LSTMCell`` + ``nn.Linear`` formulation, eager and under ``torch.compile``.

A case is an unroll of ``steps`` learned-optimizer steps on P coordinates: at each step the
optimizee's gradient is g = θ − target (detached, as in L2L: no graph over the optimizee),
θ ← θ + 0.1 · LSTM(g), and the meta-loss is Σ_t ⟨u, θ_t⟩ for a fixed random u, so the
backward runs through every step (truncated BPTT, states carried). Only the LSTM weights
require grad. Configurations: L2L's 2 x 20 cells + linear head and L2T-DLN's
2 -> 64 -> 64 -> 64 -> 1 cells without a head; (a) one step at P = 10^6, (b) 20 steps at
P = 10^5, fp32.

The reference runs ``torch.lstm_cell`` per layer (what ``nn.LSTMCell.forward`` calls) on
(P, in) batches and ``F.linear`` for the head, with the layer states as separate tensors;
the fused op takes them packed (P, ΣH) and the summed bias b_ih + b_hh.

Roofline bytes per step: forward reads g, θ, h, c and writes θ', h', c'
(P (4 ΣH + 3) elements); the backward reads g, h, c and the three adjoints and writes
grad_h, grad_c (P (6 ΣH + 2)).

    python benchmarks/bench_coordinate_lstm.py --quick     # CI
    python benchmarks/bench_coordinate_lstm.py             # full sweep on the CPU
    python benchmarks/bench_coordinate_lstm.py --gpu       # GPU sizes on cuda
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from harness import Case, OpBench, find_row, main, ratio_line

from distillkit.ops import coordinate_lstm_step

# name -> (hidden sizes, linear head)
CONFIGS = {"2x20+head": ((20, 20), True), "3x64,1": ((64, 64, 64, 1), False)}
PREPROCESS_P, OUTPUT_SCALE = 10.0, 0.1

CASES = [Case.of((P,), "float32", config=name, steps=steps)
         for P, steps in ((1_000_000, 1), (100_000, 20)) for name in CONFIGS]
QUICK_CASES = [Case.of((256,), "float32", config="2x20+head", steps=2),
               Case.of((256,), "float32", config="3x64,1", steps=1)]
# --gpu: one step on 10^7 coordinates (a 10M-parameter optimizee) and a 20-step unroll on 10^6.
GPU_CASES = [Case.of((10_000_000,), "float32", config="3x64,1", steps=1),
             Case.of((1_000_000,), "float32", config="2x20+head", steps=20)]


def make_inputs(case: Case, device: torch.device) -> List[Tensor]:
    """θ_0, target, u, h_0 = c_0 = 0 (P, ΣH), then per layer w_ih, w_hh, b_ih, b_hh
    (nn.LSTMCell's init) and the head's weight and bias; the weights require grad."""
    hidden, head = CONFIGS[case.kwargs["config"]]
    P, dtype = case.shape[0], case.torch_dtype
    width = sum(hidden)
    data = [torch.randn(P, dtype=dtype), torch.randn(P, dtype=dtype),
            torch.randn(P, dtype=dtype) / math.sqrt(P),
            torch.zeros(P, width, dtype=dtype), torch.zeros(P, width, dtype=dtype)]
    weights = []
    for shapes in (lambda i, h: (4 * h, i), lambda i, h: (4 * h, h),
                   lambda i, h: (4 * h,), lambda i, h: (4 * h,)):
        for i, h in zip((2,) + hidden[:-1], hidden):
            weights.append(torch.empty(shapes(i, h), dtype=dtype).uniform_(-1, 1) / math.sqrt(h))
    if head:
        weights += [torch.empty(1, hidden[-1], dtype=dtype).uniform_(-1, 1) / math.sqrt(hidden[-1]),
                    torch.zeros(1, dtype=dtype)]
    return [t.to(device) for t in data] + [w.to(device).requires_grad_() for w in weights]


def _unpack(inputs: Sequence[Tensor], config: str) -> Tuple[Any, ...]:
    hidden, head = CONFIGS[config]
    L = len(hidden)
    params, target, u, h, c, *w = inputs
    w_ih, w_hh, b_ih, b_hh = (w[k * L:(k + 1) * L] for k in range(4))
    head_w, head_b = (w[4 * L], w[4 * L + 1]) if head else (None, None)
    return hidden, params, target, u, h, c, w_ih, w_hh, b_ih, b_hh, head_w, head_b


def fused(*inputs: Tensor, config: str, steps: int) -> Tensor:
    _, params, target, u, h, c, w_ih, w_hh, b_ih, b_hh, head_w, head_b = _unpack(inputs, config)
    bias = [a + b for a, b in zip(b_ih, b_hh)]
    loss = params.new_zeros(())
    for _ in range(steps):
        grad = (params - target).detach()
        params, h, c = coordinate_lstm_step(grad, params, h, c, w_ih, w_hh, bias, head_w, head_b,
                                            preprocess_p=PREPROCESS_P, output_scale=OUTPUT_SCALE)
        loss = loss + torch.dot(u, params)
    return loss


def reference(*inputs: Tensor, config: str, steps: int) -> Tensor:
    hidden, params, target, u, h, c, w_ih, w_hh, b_ih, b_hh, head_w, head_b = _unpack(inputs,
                                                                                      config)
    hs, cs = list(h.split(hidden, 1)), list(c.split(hidden, 1))
    loss = params.new_zeros(())
    for _ in range(steps):
        grad = (params - target).detach()
        a = torch.clamp(torch.log(grad.abs() + 1e-8) / PREPROCESS_P, min=-1.0)
        b = torch.clamp(grad * math.exp(PREPROCESS_P), -1.0, 1.0)
        x = torch.stack([a, b], dim=1)
        for l in range(len(hidden)):
            hs[l], cs[l] = torch.lstm_cell(x, (hs[l], cs[l]), w_ih[l], w_hh[l], b_ih[l], b_hh[l])
            x = hs[l]
        out = F.linear(x, head_w, head_b) if head_w is not None else x
        params = params + OUTPUT_SCALE * out.squeeze(1)
        loss = loss + torch.dot(u, params)
    return loss


def roofline_bytes(case: Case, mode: str) -> int:
    width = sum(CONFIGS[case.kwargs["config"]][0])
    per_step = 4 * width + 3 + (6 * width + 2 if mode != "forward" else 0)
    size = torch.finfo(case.torch_dtype).bits // 8
    return case.kwargs["steps"] * case.shape[0] * per_step * size


def saved_state_mb(case: Case) -> float:
    """What BPTT must keep per step: the step's inputs (g, h, c), P (2 ΣH + 1) elements."""
    width = sum(CONFIGS[case.kwargs["config"]][0])
    size = torch.finfo(case.torch_dtype).bits // 8
    return case.kwargs["steps"] * case.shape[0] * (2 * width + 1) * size / 1e6


def targets(rows: List[Dict[str, Any]]) -> List[str]:
    """The issue's goals on a 2-core CPU, for the 20-step unroll fwd+bwd: >= 2x eager,
    >= 1.3x compile, and peak extra memory within the saved (g, h, c) of every step."""
    lines = ["Targets (issue #4): 2-core CPU, fwd+bwd, distillkit vs eager (>= 2x) and "
             "compile (>= 1.3x), set for the unroll; BPTT memory (unroll) <= the saved "
             "(g, h, c) per step:"]
    for case in CASES + QUICK_CASES:
        ours = find_row(rows, "distillkit", "full", case)
        if ours is None:
            continue
        lines.append(f"{case.shape_str} {case.params_str}:")
        lines.append("  " + ratio_line(2, "eager", ours, find_row(rows, "eager", "full", case)))
        lines.append("  " + ratio_line(1.3, "compile", ours,
                                       find_row(rows, "compile", "full", case)))
        if case.kwargs["steps"] > 1:  # one step holds its outputs, not a BPTT history
            budget = saved_state_mb(case)
            extra = ours["extra_mem_MB"]
            lines.append(f"  - extra memory {extra:.0f} MB vs saved (g, h, c) {budget:.0f} MB "
                         f"({'met' if extra <= budget else 'NOT met'})")
    return lines


BENCH = OpBench(
    name="coordinate_lstm",
    fused=fused,
    reference=reference,
    make_inputs=make_inputs,
    roofline_bytes=roofline_bytes,
    cases=CASES,
    quick_cases=QUICK_CASES,
    gpu_cases=GPU_CASES,
    modes=("full", "forward"),
    targets=targets,
    compile_note="compile is torch.compile(reference, dynamic=False) of the whole unroll; "
                 "its compilation is not timed.",
)

if __name__ == "__main__":
    main(BENCH)
