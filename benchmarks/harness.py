"""The benchmark harness every ``benchmarks/bench_<op>.py`` script is built on.

A bench script describes its op with an :class:`OpBench` (fused op, eager reference,
input factory, roofline bytes, size sweep, targets) and calls :func:`main`. For each
case (shape x dtype x op keyword arguments) and provider (``distillkit`` = the fused
op, ``eager`` = the reference, ``compile`` = ``torch.compile`` of the reference):

1. **correctness first**: one forward + backward of the provider is compared with the
   eager reference (output and the gradient of every input that requires grad); a
   provider that does not match is reported and not timed;
2. **memory**, per mode: the peak over one run, absolute and as the extra over what was
   held right before it (the inputs; for ``backward`` also the retained graph). CPU:
   the process's peak RSS (``VmHWM``, the counter ``getrusage().ru_maxrss`` reports),
   reset through ``/proc/self/clear_refs`` just before the run, so neither torch.compile's
   compilation nor the reference run of step 1 counts. distillkit's CPU output cache is
   emptied first, so the fused op's outputs count as fresh allocations (timed repeats
   then reuse its blocks, as a training loop does). CUDA: ``max_memory_allocated``;
3. **time**, per mode: median, IQR and min over repeats, the memory run serving as
   warm-up (``perf_counter`` on CPU, CUDA events on CUDA), and GB/s against the
   op's roofline bytes.

Modes: ``forward`` (inputs require grad, as in training), ``backward`` (``autograd.grad``
of a forward run, untimed, just before) and ``full`` (forward + backward).

A full run gives every (case, provider) a fresh worker subprocess (the same script with
``--worker``): a provider's N x C temporaries are back with the OS before the next one
starts, and one provider's allocations cannot raise another's peak. Rows are appended to
``results/<device type>.csv`` and the summary is written to ``results/<op>_<device
type>.md``. ``--quick`` runs the tiny CI sweep in-process and writes no files: tiny shapes
check the harness and the op, they are not results. ``--gpu`` runs the op's GPU-size
cases (``gpu_cases``, with the GPU-only providers such as Liger-Kernel when importable)
on ``cuda``; CUDA results are named after the device, ``results/<op>_cuda_<device
name>.md`` and ``results/cuda_<device name>.csv``.

Units: ms, MB = 1e6 bytes, GB/s = 1e9 bytes/s.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import distillkit

PROVIDERS = ("distillkit", "eager", "compile")
MODES = ("forward", "backward", "full")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Max |provider - reference| over max |reference|, per output dtype. Normalized, not
# element-wise: at N = 4096 rows a mean-reduced loss has gradients of ~1e-8, below any
# useful atol. bf16/fp16 gradients are rounded to 8/11 mantissa bits, so two correct
# implementations differ by up to an ulp of the largest element.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}

CSV_COLUMNS = (
    "date", "git_rev", "torch", "threads", "machine", "device", "op", "provider", "mode",
    "shape", "dtype", "params", "check", "max_err", "median_ms", "iqr_ms", "min_ms",
    "repeats", "gbps", "inputs_MB", "peak_mem_MB", "extra_mem_MB",
)
WORKER_MARK = "HARNESS_RESULT "
M_MMAP_THRESHOLD = -3  # mallopt parameter, glibc <malloc.h>


@dataclass(frozen=True)
class Case:
    """One point of a sweep: a shape, a dtype name and the op's keyword arguments."""

    shape: Tuple[int, ...]
    dtype: str
    params: Tuple[Tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, shape: Sequence[int], dtype: str, **params: Any) -> "Case":
        return cls(tuple(shape), dtype, tuple(sorted(params.items())))

    @property
    def kwargs(self) -> Dict[str, Any]:
        return dict(self.params)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def shape_str(self) -> str:
        return "x".join(map(str, self.shape))

    @property
    def params_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.params)

    def to_json(self) -> Dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype, "params": dict(self.params)}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Case":
        return cls.of(d["shape"], d["dtype"], **d["params"])


@dataclass
class OpBench:
    """What a bench script tells the harness about its op.

    ``make_inputs(case, device)`` returns the positional inputs; those with
    ``requires_grad`` are the ones differentiated. ``fused`` and ``reference`` are called
    as ``fn(*inputs, **case.kwargs)``. ``roofline_bytes(case, mode)`` is the least
    memory traffic of a mode. ``compile_filter`` picks the cases the compile provider
    runs (compilation is slow on small CPUs), ``compile_note`` says so in the output.
    ``targets(rows)`` returns lines that set the results against the op's goals.
    """

    name: str
    fused: Callable[..., Tensor]
    reference: Callable[..., Tensor]
    make_inputs: Callable[[Case, torch.device], Sequence[Tensor]]
    roofline_bytes: Callable[[Case, str], int]
    cases: Sequence[Case]
    quick_cases: Sequence[Case]
    modes: Sequence[str] = MODES
    compile_filter: Callable[[Case], bool] = lambda case: True
    compile_note: str = ""
    targets: Callable[[List[Dict[str, Any]]], List[str]] = lambda rows: []
    # More providers by name, called like ``fused`` (e.g. an unfused path of distillkit).
    extra_providers: Dict[str, Callable[..., Tensor]] = field(default_factory=dict)
    # The sweep of --gpu (GPU sizes), and providers that exist only there (e.g. Liger-Kernel,
    # when it is installed).
    gpu_cases: Sequence[Case] = ()
    gpu_providers: Dict[str, Callable[..., Tensor]] = field(default_factory=dict)


# --- device-specific measurement: the one place that knows CPU from CUDA -----------------

def cpu_flags(wanted: Sequence[str]) -> List[str]:
    """Those of ``wanted`` that /proc/cpuinfo lists for this CPU, in ``wanted``'s order."""
    with open("/proc/cpuinfo") as f:
        have = next((set(line.split(":", 1)[1].split()) for line in f
                     if line.startswith("flags")), set())
    return [flag for flag in wanted if flag in have]


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class CpuMeter:
    def __init__(self):
        # glibc serves blocks below its mmap threshold, which rises up to 32 MiB as big
        # blocks are freed, from a heap that keeps freed pages resident: a run would reuse
        # the warm-up's pages without raising RSS and its temporaries would vanish from the
        # peak. A fixed threshold hands every block of 1 MiB or more back to the OS on free.
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 1 << 20)

    def time_ms(self, step: Callable[[], Any]) -> float:
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3

    def peak_bytes(self, step: Callable[[], Any]) -> Tuple[int, int]:
        gc.collect()
        distillkit.empty_cpu_cache()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS to the current RSS (Linux >= 4.0)
        base = _proc_status_bytes("VmRSS")
        step()
        peak = _proc_status_bytes("VmHWM")
        return peak, peak - base

    def machine(self) -> str:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return "unknown CPU"


class _CudaMeter:
    def __init__(self, device: torch.device):
        self.device = device

    def time_ms(self, step: Callable[[], Any]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def peak_bytes(self, step: Callable[[], Any]) -> Tuple[int, int]:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        step()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return peak, peak - base

    def machine(self) -> str:
        return torch.cuda.get_device_name(self.device)


def _meter(device: torch.device):
    return _CudaMeter(device) if device.type == "cuda" else CpuMeter()


# --- one (case, provider): check, memory, time -------------------------------------------

def _provider_fn(bench: OpBench, provider: str) -> Callable[..., Tensor]:
    if provider == "distillkit":
        return bench.fused
    if provider == "eager":
        return bench.reference
    if provider in bench.extra_providers:
        return bench.extra_providers[provider]
    if provider in bench.gpu_providers:
        return bench.gpu_providers[provider]
    # Static shapes: each worker sees one shape, and a dynamic kernel would be slower.
    return torch.compile(bench.reference, dynamic=False)


def _forward_backward(fn, inputs, kwargs) -> Tuple[Tensor, Tuple[Tensor, ...]]:
    out = fn(*inputs, **kwargs)
    wrt = [t for t in inputs if t.requires_grad]
    return out, torch.autograd.grad(out, wrt, torch.ones_like(out))


def _prepare_step(mode: str, fn, inputs, kwargs) -> Callable[[], Any]:
    """The callable a mode times; called afresh before each timed run.

    ``backward`` runs its forward here, untimed, and the timed call frees that graph: a
    compiled backward donates its buffers, which rules out ``retain_graph``.
    """
    if mode == "forward":
        return lambda: fn(*inputs, **kwargs)
    if mode == "full":
        return lambda: _forward_backward(fn, inputs, kwargs)
    out = fn(*inputs, **kwargs)
    wrt = [t for t in inputs if t.requires_grad]
    grad_out = torch.ones_like(out)
    return lambda: torch.autograd.grad(out, wrt, grad_out)


def _max_error(got: Sequence[Tensor], want: Sequence[Tensor]) -> Tuple[float, Optional[str]]:
    """Largest normalized error over the outputs, and a message if one exceeds its tolerance."""
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        acc = torch.promote_types(b.dtype, torch.float32)
        scale = b.detach().abs().max().to(acc).clamp_min(torch.finfo(acc).tiny)
        err = ((a.detach().to(acc) - b.detach().to(acc)).abs().max() / scale).item()
        tol = TOLERANCE[b.dtype]
        what = "output" if i == 0 else f"grad {i - 1}"
        if not err <= tol:  # also catches NaN
            return err, f"FAIL {what}: {err:.2e} > {tol:.0e}"
        worst = max(worst, err)
    return worst, None


def _median_iqr_min(times: List[float]) -> Tuple[float, float, float]:
    if len(times) < 2:
        return times[0], 0.0, times[0]
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), q3 - q1, min(times)


def run_case(bench: OpBench, case: Case, provider: str, modes: Sequence[str],
             device: torch.device, repeats: int, budget_s: float) -> List[Dict[str, Any]]:
    """Check, measure and time one provider on one case; one row per mode.

    Repeats stop early, after at least 3, once a mode has run for ``budget_s`` seconds:
    the eager reference takes seconds per step at LLM vocabulary sizes on a small CPU.
    """
    meter = _meter(device)
    torch.manual_seed(0)
    inputs = bench.make_inputs(case, device)
    kwargs = case.kwargs
    fn = _provider_fn(bench, provider)
    base = {"provider": provider, "shape": case.shape_str, "dtype": case.dtype,
            "params": case.params_str,
            "inputs_MB": sum(t.numel() * t.element_size() for t in inputs) / 1e6}

    out, grads = _forward_backward(fn, inputs, kwargs)  # also the compile, for `compile`
    if provider == "eager":
        max_err, failure = 0.0, None
        check = "reference"
    else:
        want = _forward_backward(bench.reference, inputs, kwargs)
        max_err, failure = _max_error((out, *grads), (want[0], *want[1]))
        check = failure or "ok"
        del want
    del out, grads
    if failure:
        return [dict(base, mode=mode, check=check, max_err=max_err) for mode in modes]

    rows = []
    for mode in modes:
        peak, extra = meter.peak_bytes(_prepare_step(mode, fn, inputs, kwargs))
        times: List[float] = []
        start = time.perf_counter()
        while len(times) < repeats:
            times.append(meter.time_ms(_prepare_step(mode, fn, inputs, kwargs)))
            if len(times) >= 3 and time.perf_counter() - start > budget_s:
                break
        median, iqr, fastest = _median_iqr_min(times)
        rows.append(dict(
            base, mode=mode, check=check, max_err=max_err, median_ms=median, iqr_ms=iqr,
            min_ms=fastest, repeats=len(times),
            gbps=bench.roofline_bytes(case, mode) / (median * 1e6),
            peak_mem_MB=peak / 1e6, extra_mem_MB=extra / 1e6,
        ))
    return rows


# --- the driver --------------------------------------------------------------------------

def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _run_worker(args, case: Case, provider: str, modes: Sequence[str]) -> List[Dict[str, Any]]:
    """Runs one (case, provider) in a fresh interpreter; its stderr passes through."""
    job = {"case": case.to_json(), "provider": provider, "modes": list(modes)}
    cmd = [sys.executable, os.path.abspath(sys.argv[0]), "--worker", json.dumps(job),
           "--device", args.device, "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--budget", str(args.budget)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(WORKER_MARK):
            return json.loads(line[len(WORKER_MARK):])
    # Killed (out of memory: rc -9) or crashed: say so in the rows rather than stop the sweep.
    return [{"provider": provider, "shape": case.shape_str, "dtype": case.dtype,
             "params": case.params_str, "mode": mode, "check": f"FAIL worker rc={proc.returncode}"}
            for mode in modes]


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None or value == "" else format(value, spec)


def summary_table(rows: List[Dict[str, Any]]) -> List[str]:
    """Markdown rows; ``distillkit x`` is how many times faster distillkit is than the row."""
    lines = ["| shape | dtype | params | mode | provider | median ms | IQR ms | min ms | GB/s "
             "| peak MB | extra MB | distillkit x | check |",
             "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    fused = {(r["shape"], r["dtype"], r["params"], r["mode"]): r.get("median_ms")
             for r in rows if r["provider"] == "distillkit"}
    for r in rows:
        ours = fused.get((r["shape"], r["dtype"], r["params"], r["mode"]))
        theirs = r.get("median_ms")
        speedup = theirs / ours if ours and theirs else None
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['params']} | {r['mode']} | {r['provider']} "
            f"| {_fmt(theirs, '.2f')} | {_fmt(r.get('iqr_ms'), '.2f')} "
            f"| {_fmt(r.get('min_ms'), '.2f')} | {_fmt(r.get('gbps'), '.1f')} "
            f"| {_fmt(r.get('peak_mem_MB'), '.0f')} | {_fmt(r.get('extra_mem_MB'), '.0f')} "
            f"| {_fmt(speedup, '.2f')} | {r['check']} |")
    return lines


def find_row(rows: List[Dict[str, Any]], provider: str, mode: str,
             case: Case) -> Optional[Dict[str, Any]]:
    """The timed row of (provider, mode, case), or None if it was not run or failed."""
    for r in rows:
        if (r["provider"], r["mode"], r["shape"], r["dtype"], r["params"]) == (
                provider, mode, case.shape_str, case.dtype, case.params_str) and "median_ms" in r:
            return r
    return None


def ratio_line(goal: float, name: str, ours: Optional[Dict[str, Any]],
                other: Optional[Dict[str, Any]]) -> str:
    """A target line: is `ours` at least `goal` times faster than `other`?"""
    if ours is None or other is None:
        return f"- >= {goal:g}x faster than {name}: not measured in this run"
    ratio = other["median_ms"] / ours["median_ms"]
    return (f"- >= {goal:g}x faster than {name}: {ratio:.2f}x "
            f"({'met' if ratio >= goal else 'NOT met'})")


def _parse_args(bench: OpBench) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"Benchmark {bench.name}: "
                                + ", ".join(PROVIDERS) + " x " + ", ".join(MODES))
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cpu; cuda with --gpu)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, 2 repeats, in-process, no result files (for CI)")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU-size sweep, with the GPU-only providers that are installed")
    providers = list(PROVIDERS) + list(bench.extra_providers)
    gpu_only = list(bench.gpu_providers)
    p.add_argument("--providers", nargs="+", choices=providers + gpu_only, default=None,
                   help=f"default: {' '.join(providers)} (with --gpu also: "
                        f"{' '.join(gpu_only) or 'none installed'})")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help=f"default: {' '.join(bench.modes)}")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch intra-op threads (default: torch's, %(default)s here)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per mode (default: 5, quick: 2)")
    p.add_argument("--budget", type=float, default=20.0,
                   help="seconds per mode after which repeats stop, once 3 are done")
    p.add_argument("--only", default=None,
                   help="run only the cases whose 'shape dtype params' matches this regex")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # JSON job of one (case, provider)
    args = p.parse_args()
    if args.gpu and args.quick:
        p.error("--gpu and --quick are exclusive")
    if args.gpu and not bench.gpu_cases:
        p.error(f"{bench.name} has no GPU sweep")
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    args.providers = args.providers or providers + (gpu_only if args.gpu else [])
    args.modes = args.modes or list(bench.modes)
    args.repeats = args.repeats or (2 if args.quick else 5)
    return args


def main(bench: OpBench) -> None:
    """Entry point of a bench script: parses the CLI, runs the sweep, reports."""
    args = _parse_args(bench)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.worker:
        job = json.loads(args.worker)
        rows = run_case(bench, Case.from_json(job["case"]), job["provider"], job["modes"],
                        device, args.repeats, args.budget)
        print(WORKER_MARK + json.dumps(rows), flush=True)
        return

    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "git_rev": git_rev(), "torch": torch.__version__, "threads": args.threads,
           "machine": _meter(device).machine(), "device": device.type, "op": bench.name}
    print(f"# {bench.name} on {env['machine']} ({device.type}, {args.threads} threads), "
          f"torch {env['torch']}, rev {env['git_rev']}, {env['date']}", flush=True)
    cases = bench.quick_cases if args.quick else bench.gpu_cases if args.gpu else bench.cases
    if args.only:
        cases = [c for c in cases
                 if re.search(args.only, f"{c.shape_str} {c.dtype} {c.params_str}")]
    jobs = [(case, provider) for case in cases for provider in args.providers
            if provider != "compile" or bench.compile_filter(case)]
    rows: List[Dict[str, Any]] = []
    for i, (case, provider) in enumerate(jobs, 1):
        start = time.perf_counter()
        if args.quick:
            torch.compiler.reset()  # else recompiles per case hit dynamo's cache limit
            new = run_case(bench, case, provider, args.modes, device, args.repeats, args.budget)
        else:
            new = _run_worker(args, case, provider, args.modes)
        rows += [dict(env, **r) for r in new]
        print(f"[{i}/{len(jobs)}] {provider} {case.shape_str} {case.dtype} {case.params_str}: "
              f"{new[0]['check']} ({time.perf_counter() - start:.0f} s)", flush=True)

    report = [f"## {bench.name}: {device.type}, {env['machine']}, {args.threads} threads, "
              f"torch {env['torch']}, rev {env['git_rev']}, {env['date']}", ""]
    report += summary_table(rows)
    report += ["", "distillkit x: the row's median over distillkit's for the same case and mode. "
               "peak MB: the process's peak RSS (CPU) or peak allocated memory (CUDA); extra MB: "
               "that peak less what was held just before the run (the inputs)."]
    if "compile" in args.providers and bench.compile_note:
        report += ["", f"Note: {bench.compile_note}"]
    report += [""] + bench.targets(rows)
    text = "\n".join(report) + "\n"
    print("\n" + text)

    if not args.quick:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        # One GPU's results do not overwrite another's.
        tag = device.type if device.type == "cpu" else (
            device.type + "_" + re.sub(r"[^A-Za-z0-9]+", "_", env["machine"]).strip("_"))
        csv_path = RESULTS_DIR / f"{tag}.csv"
        new_file = not csv_path.exists()
        with open(csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="")
            if new_file:
                writer.writeheader()
            writer.writerows(rows)
        (RESULTS_DIR / f"{bench.name}_{tag}.md").write_text(text)
        print(f"appended {len(rows)} rows to {csv_path}; summary in "
              f"{RESULTS_DIR / f'{bench.name}_{tag}.md'}")
    if any(r["check"].startswith("FAIL") for r in rows):
        sys.exit(1)
