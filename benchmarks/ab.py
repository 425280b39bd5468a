"""A/B timing of two distillkit checkouts under the same machine load.

    python benchmarks/ab.py --old /path/to/old/checkout [--new .] [--rounds 7]

Each round runs every case once in the old checkout and once in the new one (separate
processes, order alternating per round), so load that drifts during the run hits both
sides alike; the report is the median over rounds of each side and their ratio. Used to
check that a refactor costs nothing, on a machine that is not quiet enough for absolute
numbers. Cases use only keyword arguments both API generations accept.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import torch

CASES = {
    "kd_loss fwd+bwd fp32 4096x32000 fkl T=2": """
z = torch.randn(4096, 32000, requires_grad=True); u = torch.randn(4096, 32000)
def step():
    distillkit.kd_loss(z, u, temperature=2.0).backward()
""",
    "slam_loss fwd+bwd fp32 4096x32000 k=5": """
z = torch.randn(4096, 32000, requires_grad=True); p = torch.softmax(torch.randn(4096, 32000), 1)
a = torch.rand(4096); k = torch.full((4096,), 5, dtype=torch.int64)
def step():
    distillkit.slam_loss(z, p, a, k).backward()
""",
    "sparse_kd_loss fwd+bwd fp32 2048x128256 K=32": """
z = torch.randn(2048, 128256, requires_grad=True)
lp, idx = torch.log_softmax(torch.randn(2048, 128256), 1).topk(32, dim=1)
def step():
    distillkit.sparse_kd_loss(z, idx, lp).backward()
""",
    "distance l2 fwd+bwd fp32 4096x4096": """
s = torch.randn(4096, 4096, requires_grad=True); t = torch.randn(4096, 4096)
def step():
    distillkit.distance(s, t, "l2").backward()
""",
    "fused_linear_kd_loss fwd+bwd fp32 N=1024 H=512 C=32000": """
h = torch.randn(1024, 512, requires_grad=True); w = (torch.randn(32000, 512) / 23).requires_grad_()
u = torch.randn(1024, 32000)
def step():
    distillkit.fused_linear_kd_loss(h, w, u, temperature=2.0).backward()
""",
}

RUNNER = r"""
import json, sys, time, torch
torch.manual_seed(0); torch.set_num_threads({threads})
import distillkit
{setup}
step(); step()  # warm-up: output cache, first-touch pages
t0 = time.perf_counter(); step(); dt = time.perf_counter() - t0
print(json.dumps(dt))
"""


def run_case(checkout: str, setup: str, threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    out = subprocess.run([sys.executable, "-c", RUNNER.format(setup=setup, threads=threads)],
                         env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.abspath(checkout))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default=".")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), platform.processor())
    print(f"# A/B: old={args.old} new={args.new}, {args.rounds} rounds, {args.threads} threads, "
          f"{cpu}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}\n")
    print("| case | old median (s) | new median (s) | new / old |\n|---|--:|--:|--:|")
    for name, setup in CASES.items():
        old, new = [], []
        for r in range(args.rounds):
            order = [(args.old, old), (args.new, new)]
            for checkout, acc in (order if r % 2 == 0 else order[::-1]):
                acc.append(run_case(checkout, setup, args.threads))
        mo, mn = statistics.median(old), statistics.median(new)
        print(f"| {name} | {mo:.4f} | {mn:.4f} | {mn / mo:.3f} |", flush=True)


if __name__ == "__main__":
    main()
