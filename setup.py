"""Build distillkit._C: CPU kernels always, CUDA kernels when the toolchain has them.

Knobs (environment variables, read once here and printed):
  DISTILLKIT_FORCE_CPU=1     build without CUDA kernels even if a CUDA toolkit is found
  CUDA_HOME                  CUDA toolkit; when unset, /usr/local/cuda is preferred if it
                             exists (the nvcc on PATH may be a wrapper script)
  TORCH_CUDA_ARCH_LIST       CUDA archs; default "8.0;9.0" when no GPU is visible
  DISTILLKIT_CPU_ISA         default | avx2 | avx512: the highest CPU level compiled;
                             default avx512 (all three). Not the build machine's ISA: the
                             library runs on any x86-64 CPU whatever the value.
  DISTILLKIT_DEBUG=1         -O0 -g
  MAX_JOBS                   parallel compile jobs (ninja)

CPU levels: the kernel files of csrc/cpu (all but CPU_PORTABLE) are compiled once per
level, default (x86-64 baseline), avx2 and avx512, each with its -m flags and
CPU_CAPABILITY=<LEVEL> into its own namespace (csrc/cpu/capability.h); everything else is
compiled once without ISA flags. At load the kernels run at the best level the CPU
supports, capped by DISTILLKIT_CPU_CAPABILITY (runtime; see README). There is no AVX-512
BF16 level: ATen's Vectorized has no path that uses those instructions, and the kernels'
bf16 work (conversion to fp32) runs on AVX512BW.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


# The flags of each CPU level, in increasing order. ATen's Vectorized<T> picks its
# implementation from the CPU_CAPABILITY macros, as in ATen's own per-level kernel builds;
# csrc/cpu/capability.cpp checks the CPU for the features these flags let the compiler use.
CPU_LEVELS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f",
               "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
# Files of csrc/cpu without vectorized code: compiled once, like the host code.
CPU_PORTABLE = {"capability.cpp", "input_errors.cpp", "matmul_into.cpp", "output_cache.cpp"}


def _cpu_levels():
    top = os.environ.get("DISTILLKIT_CPU_ISA", "avx512")
    if top not in CPU_LEVELS:
        sys.exit(f"distillkit build: DISTILLKIT_CPU_ISA must be one of {', '.join(CPU_LEVELS)}, "
                 f"got {top!r}")
    names = list(CPU_LEVELS)
    return names[: names.index(top) + 1]


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


FORCE_CPU = os.environ.get("DISTILLKIT_FORCE_CPU", "0") == "1"
DEBUG = os.environ.get("DISTILLKIT_DEBUG", "0") == "1"
CPU_LEVELS_BUILT = _cpu_levels()
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
    f"cpu_levels={','.join(CPU_LEVELS_BUILT)} debug={DEBUG} "
    f"max_jobs={os.environ.get('MAX_JOBS', '-')}",
    flush=True,
)

opt = ["-O0", "-g"] if DEBUG else ["-O3"]
defines = [
    f'-DDISTILLKIT_TORCH_VERSION="{torch.__version__}"',
    f"-DDISTILLKIT_WITH_CUDA={int(WITH_CUDA)}",
]
# -fopenmp: at::parallel_for is an inline OpenMP region; without the flag it
# silently runs on one thread. The libgomp.so.1 torch already loaded is reused.
cxx_flags = opt + ["-std=c++20", "-fopenmp", "-fdiagnostics-color=always"] + defines + [
    f"-DDISTILLKIT_CPU_LEVEL_MAX={CPU_LEVELS_BUILT[-1].upper()}"]
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
sources += sorted(glob.glob(os.path.join("csrc", "python", "*.cpp")))
KERNEL_SOURCES = {s for s in sources
                  if os.path.dirname(s) == os.path.join("csrc", "cpu")
                  and os.path.basename(s) not in CPU_PORTABLE}

extra_compile_args = {"cxx": cxx_flags}
if WITH_CUDA:
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    extra_compile_args["nvcc"] = opt + defines + [
        "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
    ]
    Extension = CUDAExtension
else:
    Extension = CppExtension


class BuildExt(BuildExtension):
    """BuildExtension, with KERNEL_SOURCES compiled once per CPU level.

    Each level's objects go to their own folder (and ninja file) under build_temp, with
    that level's flags after the extension's. They are linked after the portable objects,
    lowest level first: of an inline function (from c10, the standard library) that
    several objects define, the linker keeps the first copy, so the one the library calls
    is portable or the default level's, never one compiled with AVX. tests/
    test_cpu_capability.py checks the result.
    """

    def build_extension(self, ext):
        compile_once = self.compiler.compile

        def compile_per_level(sources, output_dir=None, extra_postargs=None, **kwargs):
            kernels = [s for s in sources if s in KERNEL_SOURCES]
            objects = compile_once([s for s in sources if s not in KERNEL_SOURCES],
                                   output_dir=output_dir, extra_postargs=extra_postargs,
                                   **kwargs)
            for level in CPU_LEVELS_BUILT:
                flags = dict(extra_postargs, cxx=extra_postargs["cxx"] + CPU_LEVELS[level])
                objects += compile_once(kernels, output_dir=os.path.join(output_dir, level),
                                        extra_postargs=flags, **kwargs)
            return objects

        self.compiler.compile = compile_per_level
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = compile_once


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
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
