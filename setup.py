"""Build distillkit._C: CPU kernels always, CUDA kernels when the toolchain has them.

Knobs (environment variables, read once here and printed):
  DISTILLKIT_FORCE_CPU=1     build without CUDA kernels even if a CUDA toolkit is found
  CUDA_HOME                  CUDA toolkit; when unset, /usr/local/cuda is preferred if it
                             exists (the nvcc on PATH may be a wrapper script)
  TORCH_CUDA_ARCH_LIST       CUDA archs; default "8.0;9.0" when no GPU is visible
  DISTILLKIT_CPU_ISA         avx512 | avx2 | default; default: the best this machine has
  DISTILLKIT_DEBUG=1         -O0 -g
  MAX_JOBS                   parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        flags = set()
    return flags


def _pick_isa():
    isa = os.environ.get("DISTILLKIT_CPU_ISA", "")
    if isa:
        return isa
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "default"


# ATen's Vectorized<T> picks its implementation from these macros; the flags
# must match the ISA, as in ATen's own per-capability kernel builds.
ISA_FLAGS = {
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f",
               "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


FORCE_CPU = os.environ.get("DISTILLKIT_FORCE_CPU", "0") == "1"
DEBUG = os.environ.get("DISTILLKIT_DEBUG", "0") == "1"
CPU_ISA = _pick_isa()
CUDA_HOME = _cuda_home()
WITH_CUDA = (not FORCE_CPU) and torch.version.cuda is not None and CUDA_HOME is not None

if WITH_CUDA:
    # torch.utils.cpp_extension reads CUDA_HOME at import time.
    os.environ["CUDA_HOME"] = CUDA_HOME
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

print(
    "distillkit build: "
    f"torch={torch.__version__} torch_cuda={torch.version.cuda} "
    f"with_cuda={WITH_CUDA} cuda_home={CUDA_HOME if WITH_CUDA else '-'} "
    f"cuda_archs={os.environ.get('TORCH_CUDA_ARCH_LIST', '-') if WITH_CUDA else '-'} "
    f"cpu_isa={CPU_ISA} debug={DEBUG} max_jobs={os.environ.get('MAX_JOBS', '-')}",
    flush=True,
)

opt = ["-O0", "-g"] if DEBUG else ["-O3"]
defines = [
    f'-DDISTILLKIT_TORCH_VERSION="{torch.__version__}"',
    f"-DDISTILLKIT_WITH_CUDA={int(WITH_CUDA)}",
]
# -fopenmp: at::parallel_for is an inline OpenMP region; without the flag it
# silently runs on one thread. The libgomp.so.1 torch already loaded is reused.
cxx_flags = opt + ["-std=c++20", "-fopenmp", "-fdiagnostics-color=always"] + defines
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
sources += sorted(glob.glob(os.path.join("csrc", "python", "*.cpp")))

# Only the kernel files get ISA flags; ops.cpp and the checks stay portable.
extra_compile_args = {"cxx": cxx_flags + ISA_FLAGS[CPU_ISA]}
if WITH_CUDA:
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    extra_compile_args["nvcc"] = opt + defines + [
        "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
    ]
    Extension = CUDAExtension
else:
    Extension = CppExtension

setup(
    name="distillkit",
    version="0.1.0",
    description="Fused C++/CUDA kernels for knowledge distillation in PyTorch",
    packages=find_packages(include=["distillkit", "distillkit.*"]),
    python_requires=">=3.10",
    ext_modules=[
        Extension(
            "distillkit._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
