"""distillkit refuses a missing or stale compiled extension with a clear ImportError, and
registers a CPU kernel (and, in a CUDA build, a CUDA kernel) for every op schema."""
import os
import subprocess
import sys

import pytest
import torch

import distillkit


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize("setup,expected", [
    # A _C built against another torch release.
    ("import torch; torch.__version__ = '0.0.1'", "built against torch"),
    # No _C at all (never built): importing it fails.
    ("import sys; sys.modules['distillkit._C'] = None", "could not be loaded"),
])
def test_import_error_says_what_and_how(setup, expected):
    out = run_python(f"{setup}\nimport distillkit")
    assert out.returncode != 0
    assert "ImportError" in out.stderr and expected in out.stderr
    assert "pip install --no-build-isolation -e ." in out.stderr


def test_every_op_has_its_kernels():
    """Every schema of csrc/ops.cpp has a CPU kernel; CI builds with a CUDA toolkit and sets
    DISTILLKIT_EXPECT_CUDA=1, and then every op must also have a CUDA kernel compiled,
    linked and registered, even without a GPU."""
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("distillkit::"))
    assert "distillkit::kd_loss_forward" in ops and "distillkit::coordinate_lstm_backward" in ops
    keys = ["CPU"]
    if os.environ.get("DISTILLKIT_EXPECT_CUDA") == "1":
        assert distillkit._C.with_cuda == 1
        keys.append("CUDA")
    # An op whose math is ATen's on every device but the CPU (matmul_into, empty_cached)
    # has a CompositeExplicitAutograd kernel, which serves the CUDA key.
    missing = [(op, key) for op in ops for key in keys
               if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
               and not (key != "CPU" and torch._C._dispatch_has_kernel_for_dispatch_key(
                   op, "CompositeExplicitAutograd"))]
    assert not missing
