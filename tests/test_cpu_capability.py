"""The CPU kernels' level: one build runs on every x86-64 CPU. The kernel files are compiled
once per level (default, avx2, avx512) and the level is chosen at load from the CPU's
features, capped by DISTILLKIT_CPU_CAPABILITY (csrc/cpu/capability.h)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

import distillkit
from distillkit import _C

LEVELS = ["default", "avx2", "avx512"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One test of every kernel file, its CPU cases: each compares the kernels with the
# references within the error bounds of its own module.
KERNEL_SAMPLE = ["tests/test_kd_loss.py::test_shapes", "tests/test_sparse_kd.py::test_shapes",
                 "tests/test_slam_loss.py::test_shapes_k_alpha",
                 "tests/test_distance.py::test_shapes",
                 "tests/test_coordinate_lstm.py::test_matches_reference"]


def run(args, cap, **kw):
    env = dict(os.environ)
    env.pop("DISTILLKIT_CPU_CAPABILITY", None)
    if cap is not None:
        env["DISTILLKIT_CPU_CAPABILITY"] = cap
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, **kw)


def expected_level(cap=None):
    """The best level that the CPU supports, the build has and cap allows."""
    limits = [_C.cpu_capability_supported, _C.cpu_capabilities[-1]] + ([cap] if cap else [])
    return LEVELS[min(map(LEVELS.index, limits))]


@pytest.mark.skipif(bool(os.environ.get("DISTILLKIT_CPU_CAPABILITY")), reason="capped here")
def test_every_level_is_compiled_and_the_best_is_chosen():
    assert _C.cpu_capabilities == tuple(LEVELS)
    assert _C.cpu_capability == expected_level() == _C.cpu_capability_supported
    assert _C.cpu_capability_reason.startswith(f"{_C.cpu_capability}: the best level this CPU")


@pytest.mark.parametrize("cap", LEVELS)
def test_cap_is_respected(cap):
    out = run(["-c", "from distillkit import _C; print(_C.cpu_capability); "
                     "print(_C.cpu_capability_reason)"], cap)
    assert out.returncode == 0, out.stderr
    level, reason = out.stdout.splitlines()
    assert level == expected_level(cap)
    assert f"DISTILLKIT_CPU_CAPABILITY={cap}" in reason
    # Above what the CPU or the build has: capped, and said so.
    assert ("RuntimeWarning" in out.stderr) == (level != cap)


@pytest.mark.parametrize("value", ["avx3", "AVX2", " avx2", "avx2 ", "2", "avx512,avx2"])
def test_garbage_cap_is_an_error_naming_the_variable(value):
    out = run(["-c", "import distillkit"], value)
    assert out.returncode != 0
    assert "ValueError" in out.stderr and "DISTILLKIT_CPU_CAPABILITY" in out.stderr
    assert repr(value) in out.stderr


def test_empty_cap_is_no_cap():
    out = run(["-c", "from distillkit import _C; print(_C.cpu_capability)"], "")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected_level()


@pytest.mark.parametrize("cap", LEVELS)
def test_info_prints_the_level(cap):
    out = run(["-m", "distillkit", "info"], cap)
    assert out.returncode == 0, out.stderr
    fields = dict(re.match(r"([^:]+):\s+(.*)", line).groups() for line in out.stdout.splitlines())
    assert fields["CPU level"] == expected_level(cap)
    assert fields["CPU levels compiled"] == " ".join(_C.cpu_capabilities)
    assert f"DISTILLKIT_CPU_CAPABILITY={cap}" in fields["CPU level reason"]
    assert fields["distillkit"].startswith(distillkit.__version__)
    assert fields["with_cuda"].startswith(str(_C.with_cuda))


@pytest.mark.parametrize("cap", LEVELS)
def test_kernels_at_each_level_match_the_references(cap):
    out = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpu", *KERNEL_SAMPLE], cap,
              timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert re.search(r"\d+ passed", out.stdout) and "failed" not in out.stdout


# A level's namespace in a mangled name (objdump cannot demangle every name it prints).
LEVEL_MARK = re.compile(r"4AVX2|6AVX512")
# VEX/EVEX mnemonics (v...), AVX-512 mask instructions (k...) and registers.
AVX = re.compile(r"^[vk]\w+\s|%[yz]mm|%k[0-7]", re.M)
CALL = re.compile(r"^(?:call\w*|j\w+)\s+[0-9a-f]+ <([^>+@]+)", re.M)


def functions(library):
    """{mangled name: (instructions, global?)} of every function in library's code."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library],
                             capture_output=True, text=True, check=True).stdout
    code, name = {}, None
    for line in listing.splitlines():
        header = re.match(r"[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
            code[name] = []
        elif name is not None and "\t" in line:
            code[name].append(line.split("\t", 1)[1])
    symbols = subprocess.run(["nm", "--defined-only", library], capture_output=True, text=True,
                             check=True).stdout
    is_global = {fields[2]: fields[1] in "TWiu" for fields in map(str.split, symbols.splitlines())
                 if len(fields) == 3}
    return {n: ("\n".join(lines), is_global.get(n, False)) for n, lines in code.items()}


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None,
                    reason="needs objdump and nm (binutils)")
def test_avx_only_in_the_levels_code():
    """What SIGILL would come from on a CPU without AVX2 or AVX-512, checked in the library
    itself. The code any CPU may run is the library's global functions outside the levels'
    namespaces (at::vec::<LEVEL>, distillkit::cpu::<LEVEL>), where the linker may have kept
    an inline function's copy from a level's object, and the load-time initializers (a level
    object's run on every CPU), with all they call directly: none of it may use AVX."""
    code = functions(_C.__file__)
    roots = [n for n, (_, is_global) in code.items()
             if (is_global and not LEVEL_MARK.search(n)) or n.startswith("_GLOBAL__sub_I")]
    reached, todo = set(roots), list(roots)
    while todo:
        for callee in CALL.findall(code[todo.pop()][0]):
            if callee in code and callee not in reached:
                reached.add(callee)
                todo.append(callee)
    assert len(reached) > 100 and any(LEVEL_MARK.search(n) for n in code)
    portable_avx = sorted(n for n in reached if AVX.search(code[n][0]))
    assert not portable_avx, f"AVX in code that every CPU may run: {portable_avx[:10]}"
