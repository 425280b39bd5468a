"""Per-kernel resources of the CUDA kernels, from ``ptxas -v``, and their occupancy.

Compiles every ``csrc/cuda/*.cu`` (one after another: nvcc is memory-hungry and the
build machine is shared) for one architecture, with the compile command the extension
build uses, and prints, for every kernel instantiation, its registers, spill stores and
loads, stack frame, static shared memory, whether it takes dynamic shared memory, its
block size and the theoretical occupancy on that architecture::

    python benchmarks/ptxas_report.py [--arch 90] [--out FILE] [--check]

The compile command comes from ``setup.py`` itself: the script runs it with
``setuptools.setup`` captured, so the nvcc flags, defines and include directories are
the extension's (plus what ``torch.utils.cpp_extension.BuildExtension`` adds to every
nvcc call: its common flags, ``-fPIC``, the extension-name defines and the Python
headers), with one ``-gencode`` for ``--arch``. Compile only (``-c`` into a temporary
directory, ``-keep`` for the PTX); nothing is built in the tree.

The block size of a kernel is its ``.maxntid`` in the PTX, i.e. its
``__launch_bounds__``: every kernel in ``csrc/cuda`` declares the bound it is launched
with (``launch::kBlockThreads`` for the row kernels, ``kForwardThreads``, ``kTile`` and
``kFinishThreads`` in coordinate_lstm.cu); a kernel without one is reported with no
occupancy. A kernel that references the translation unit's ``extern __shared__`` buffer
takes dynamic shared memory; its occupancy is given with none and with 48 KiB per block in
all, static plus dynamic (the most a launch may take without the opt-in attribute, and
what the coordinate_lstm host code allows, ``kSmemLimit``).

Occupancy (resident warps / maximum warps per SM) follows the CUDA occupancy
calculator's rules for the device: registers are allocated per warp in units of
256 (a thread's count rounded up to 8) from four 16 K-register sub-partitions,
shared memory in 128-byte units plus 1 KiB the runtime reserves per block, and blocks
are also limited by threads and by the per-SM block slots.

``--check`` exits with status 1 when a kernel of the row ops (kd_loss, slam_loss,
sparse_kd_loss, distance) spills, and lists them; coordinate_lstm's spills are reported,
not failed (its fp64 kernels for hidden > 32 keep large per-thread arrays).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
CHECKED_OPS = ("kd_loss", "slam_loss", "sparse_kd_loss", "distance")


@dataclass(frozen=True)
class Device:
    """The per-SM limits of a compute capability that occupancy depends on."""

    name: str
    regs_per_sm: int = 65536
    reg_sub_partitions: int = 4
    reg_unit_per_warp: int = 256
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    smem_per_sm: int = 228 * 1024
    smem_unit: int = 128
    smem_reserved_per_block: int = 1024
    warp_size: int = 32


DEVICES = {
    "90": Device("sm_90 (H100, H200)"),
    "80": Device("sm_80 (A100)", smem_per_sm=164 * 1024),
}

DEFAULT_DYNAMIC_SMEM = 48 * 1024


@dataclass
class Kernel:
    source: str
    mangled: str
    name: str = ""
    registers: int = 0
    barriers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    block: Optional[int] = None
    dynamic_smem: bool = False


def occupancy(dev: Device, regs: int, block: int, smem: int) -> Tuple[float, int, str]:
    """Theoretical occupancy, resident blocks per SM and the limiting resource."""
    warps = math.ceil(block / dev.warp_size)
    limits: Dict[str, int] = {
        "blocks": dev.max_blocks_per_sm,
        "threads": dev.max_threads_per_sm // (warps * dev.warp_size),
    }
    if regs > 0:
        per_warp = math.ceil(regs * dev.warp_size / dev.reg_unit_per_warp) * dev.reg_unit_per_warp
        warps_per_part = (dev.regs_per_sm // dev.reg_sub_partitions) // per_warp
        limits["registers"] = (warps_per_part * dev.reg_sub_partitions) // warps
    per_block = math.ceil(smem / dev.smem_unit) * dev.smem_unit + dev.smem_reserved_per_block
    limits["shared memory"] = dev.smem_per_sm // per_block
    blocks = min(limits.values())
    limiter = "+".join(k for k, v in limits.items() if v == blocks)
    max_warps = dev.max_threads_per_sm // dev.warp_size
    return blocks * warps / max_warps, blocks, limiter


def extension_compile_command(arch: str) -> Tuple[List[str], str]:
    """nvcc arguments (without sources) the extension build uses, and the nvcc path.

    setup.py is executed with ``setuptools.setup`` replaced by a function that keeps its
    arguments, so the flags are read from the one place that defines them.
    """
    import setuptools

    captured = {}

    def capture(**kwargs):
        captured.update(kwargs)

    real_setup = setuptools.setup
    setuptools.setup = capture
    argv, cwd = sys.argv, os.getcwd()
    try:
        sys.argv = [str(ROOT / "setup.py"), "--name"]
        os.chdir(ROOT)
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    finally:
        setuptools.setup, sys.argv = real_setup, argv
        os.chdir(cwd)
    ext = captured["ext_modules"][0]
    if "nvcc" not in ext.extra_compile_args:
        raise SystemExit("setup.py did not configure CUDA sources (no CUDA toolkit or a CPU-only "
                         "torch, or DISTILLKIT_FORCE_CPU=1): nothing to report")
    from torch.utils import cpp_extension

    cuda_home = os.environ["CUDA_HOME"]  # setup.py exports the toolkit it picked
    includes = list(ext.include_dirs) + [sysconfig.get_paths()["include"]]
    args = [f"-I{d}" for d in includes]
    args += list(cpp_extension.COMMON_NVCC_FLAGS)
    args += ["--compiler-options", "-fPIC"]
    args += list(ext.extra_compile_args["nvcc"])
    args += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
    args += [f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]
    return args, os.path.join(cuda_home, "bin", "nvcc")


ENTRY_RE = re.compile(r"Compiling entry function '([^']+)' for 'sm_\d+'")
PROPS_RE = re.compile(r"Function properties for (\S+)")
FRAME_RE = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
# "Used R registers[, used B barriers][, S bytes cumulative stack size][, M bytes smem]...":
# the optional fields are read one by one, whatever comes between them.
USED_RE = re.compile(r"Used (\d+) registers")
BARRIERS_RE = re.compile(r"used (\d+) barriers")
SMEM_RE = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str, source: str) -> List[Kernel]:
    """Kernels (entry functions only) with their ptxas -v figures, in log order."""
    kernels: Dict[str, Kernel] = {}
    current: Optional[Kernel] = None
    props_for: Optional[str] = None
    for line in log.splitlines():
        m = ENTRY_RE.search(line)
        if m:
            current = kernels.setdefault(m.group(1), Kernel(source, m.group(1)))
            continue
        m = PROPS_RE.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = FRAME_RE.search(line)
        if m and props_for in kernels:
            k = kernels[props_for]
            k.stack, k.spill_stores, k.spill_loads = (int(g) for g in m.groups())
            continue
        m = USED_RE.search(line)
        if m and current is not None:
            current.registers = int(m.group(1))
            barriers, smem = BARRIERS_RE.search(line), SMEM_RE.search(line)
            current.barriers = int(barriers.group(1)) if barriers else 0
            current.smem = int(smem.group(1)) if smem else 0
            current = None
    return list(kernels.values())


def parse_ptx(ptx: str) -> Dict[str, Tuple[Optional[int], bool]]:
    """Per entry: the block size bound (.maxntid) and whether it uses extern shared memory."""
    externs = re.findall(r"\.extern\s+\.shared\s+[^;]*?(\w+)\[\]", ptx)
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\(", ptx):
        start = ptx.index("{", m.end())
        header = ptx[m.end():start]
        depth, i = 0, start
        while True:
            c = ptx[i]
            depth += c == "{"
            depth -= c == "}"
            i += 1
            if depth == 0:
                break
        body = ptx[start:i]
        nt = re.search(r"\.maxntid\s+(\d+)\s*,\s*(\d+)\s*,\s*(\d+)", header)
        block = int(nt.group(1)) * int(nt.group(2)) * int(nt.group(3)) if nt else None
        out[m.group(1)] = (block, any(re.search(rf"\b{e}\b", body) for e in externs))
    return out


SHORT = [
    (r"^void ", ""),
    (r"distillkit::\(anonymous namespace\)::", ""),
    (r"distillkit::", ""),
    (r"c10::BFloat16", "bf16"),
    (r"c10::Half", "fp16"),
    (r"\bfloat\b", "fp32"),
    (r"\bdouble\b", "fp64"),
]


def short_name(demangled: str) -> str:
    """The kernel template with its arguments, without namespaces and parameter list."""
    name = demangled
    for pat, rep in SHORT:
        name = re.sub(pat, rep, name)
    depth = 0
    for i, c in enumerate(name):  # drop the trailing parameter list
        depth += c == "<"
        depth -= c == ">"
        if c == "(" and depth == 0:
            return name[:i]
    return name


def demangle(names: List[str]) -> List[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def compile_file(nvcc: str, args: List[str], source: Path, tmp: Path) -> List[Kernel]:
    keep = tmp / source.stem
    keep.mkdir()
    cmd = [nvcc, *args, "-c", str(source), "-o", str(keep / "out.o"), "-keep",
           f"-keep-dir={keep}"]
    print(f"ptxas_report: compiling {source.relative_to(ROOT)}", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"nvcc failed on {source}")
    kernels = parse_ptxas(res.stdout + res.stderr, source.stem)
    ptx = {}
    for f in keep.glob("*.ptx"):
        ptx.update(parse_ptx(f.read_text()))
    for k, name in zip(kernels, demangle([k.mangled for k in kernels])):
        k.name = short_name(name)
        k.block, k.dynamic_smem = ptx.get(k.mangled, (None, False))
    return sorted(kernels, key=lambda k: k.name)


def fmt_occ(dev: Device, k: Kernel, smem: int) -> str:
    occ, blocks, limiter = occupancy(dev, k.registers, k.block, smem)
    return f"{occ:.0%} ({blocks} blk, {limiter})"


def render(kernels: List[Kernel], dev: Device, header: List[str]) -> str:
    lines = header + [
        "",
        "| kernel | block | regs | spill st/ld (B) | stack (B) | static smem (B) | "
        f"occupancy, no dynamic smem | occupancy, {DEFAULT_DYNAMIC_SMEM // 1024} KiB smem in all |",
        "|---|--:|--:|--:|--:|--:|---|---|",
    ]
    source = None
    for k in kernels:
        if k.source != source:
            source = k.source
            lines.append(f"| **{source}.cu** | | | | | | | |")
        if k.block is None:
            occ0 = occ1 = "no launch bound"
        else:
            occ0 = fmt_occ(dev, k, k.smem)
            occ1 = (fmt_occ(dev, k, max(k.smem, DEFAULT_DYNAMIC_SMEM)) if k.dynamic_smem
                    else "-")
        lines.append(
            f"| `{k.name}` | {k.block or '?'} | {k.registers} | {k.spill_stores}/{k.spill_loads} "
            f"| {k.stack} | {k.smem} | {occ0} | {occ1} |")
    return "\n".join(lines) + "\n"


def spill_summary(kernels: List[Kernel]) -> Tuple[List[str], List[str]]:
    """Spilling kernels of the checked ops (failures) and of the others (notes)."""
    fail, note = [], []
    for k in kernels:
        if k.spill_stores or k.spill_loads:
            item = (f"{k.source}: `{k.name}`: spill stores {k.spill_stores} B, spill loads "
                    f"{k.spill_loads} B, stack frame {k.stack} B, {k.registers} registers")
            (fail if k.source in CHECKED_OPS else note).append(item)
    return fail, note


def git_revision() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    rev = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "csrc")
    return rev + (" (csrc/ modified)" if dirty else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="90", choices=sorted(DEVICES),
                   help="compute capability without the dot (default 90)")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file (default benchmarks/results/cuda_resources_sm<arch>.md)")
    p.add_argument("--check", action="store_true",
                   help=f"exit 1 if a kernel of {', '.join(CHECKED_OPS)} spills")
    opts = p.parse_args(argv)
    dev = DEVICES[opts.arch]
    out = opts.out or ROOT / "benchmarks" / "results" / f"cuda_resources_sm{opts.arch}.md"

    args, nvcc = extension_compile_command(opts.arch)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-2:]
    kernels: List[Kernel] = []
    with tempfile.TemporaryDirectory(prefix="ptxas_report_") as tmp:
        for source in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            kernels += compile_file(nvcc, args, source, Path(tmp))

    fail, note = spill_summary(kernels)
    header = [
        f"# CUDA kernel resources, {dev.name}",
        "",
        f"Written by `benchmarks/ptxas_report.py --arch {opts.arch}` (compile only; no GPU "
        "involved, so nothing here is a measured speed).",
        "",
        f"- git revision: {git_revision()}",
        f"- nvcc: {' / '.join(version)}",
        f"- flags: the extension's nvcc flags from setup.py, `-gencode=arch=compute_{opts.arch},"
        f"code=sm_{opts.arch} -Xptxas -v`",
        f"- limits per SM: {dev.regs_per_sm} registers ({dev.reg_unit_per_warp}-register units "
        f"per warp), {dev.max_threads_per_sm} threads, {dev.max_blocks_per_sm} blocks, "
        f"{dev.smem_per_sm // 1024} KiB shared memory ({dev.smem_unit} B units + "
        f"{dev.smem_reserved_per_block} B reserved per block)",
        "- block: the kernel's `__launch_bounds__` (`.maxntid`), which is the block size "
        "its launch site uses; occupancy = resident warps / 64, with the limiting resource",
        "- spill st/ld: ptxas's bytes of spill store / load instructions in the kernel's code "
        "(a static count, not traffic); stack: the local memory frame per thread (spill slots "
        "plus local arrays not kept in registers)",
        "",
        f"Spills in {', '.join(CHECKED_OPS)}: " + ("none." if not fail else f"{len(fail)} kernels:"),
    ]
    header += [f"- {f}" for f in fail]
    header += ["", "Spills elsewhere: " + ("none." if not note else f"{len(note)} kernels:")]
    header += [f"- {n}" for n in note]
    text = render(kernels, dev, header)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"ptxas_report: {len(kernels)} kernels, written to {out}", file=sys.stderr)
    return 1 if (opts.check and fail) else 0


if __name__ == "__main__":
    sys.exit(main())
