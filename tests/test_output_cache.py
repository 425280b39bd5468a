"""The CPU output cache (csrc/cpu/output_cache.cpp): freed gradient blocks are reused for the
next request of the same size, never while a tensor still holds them, within the
DISTILLKIT_CPU_CACHE_MB bound."""
import os
import subprocess
import sys

import pytest
import torch

import distillkit
from distillkit.reference import distance_ref

MIB = 1 << 20
SHAPE = (500, 1000)  # 2 000 000 bytes of fp32: one 2 MiB block


def l2_grad(seed):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(SHAPE, generator=gen).requires_grad_()
    t = torch.randn(SHAPE, generator=gen)
    (got,) = torch.autograd.grad(distillkit.distance(s, t, "l2"), s)
    (want,) = torch.autograd.grad(distance_ref(s, t, "l2"), s)
    return got, want


def test_blocks_are_reused_only_once_free():
    distillkit.empty_cpu_cache()
    first, want = l2_grad(0)
    torch.testing.assert_close(first, want)
    ptr = first.data_ptr()
    assert distillkit.cpu_cache_bytes() == 0
    del first
    assert distillkit.cpu_cache_bytes() == 2 * MIB
    # The freed block comes back, still holding the old gradient: every element is rewritten.
    second, want = l2_grad(1)
    assert second.data_ptr() == ptr and distillkit.cpu_cache_bytes() == 0
    torch.testing.assert_close(second, want)
    # While `second` lives, a new request gets a block of its own.
    third, want3 = l2_grad(2)
    assert third.data_ptr() != second.data_ptr()
    torch.testing.assert_close(second, want)
    torch.testing.assert_close(third, want3)
    # A cached tensor's storage resizes like any other.
    third.resize_(2 * SHAPE[0], SHAPE[1]).fill_(1.0)
    assert third.sum().item() == 2 * SHAPE[0] * SHAPE[1]
    del second, third
    # second's block, third's first block (freed by the resize) and its 4 MiB one.
    assert distillkit.cpu_cache_bytes() == 8 * MIB
    assert distillkit.empty_cpu_cache() == 8 * MIB
    assert distillkit.cpu_cache_bytes() == 0


def run_with_cache_mb(value, code):
    env = dict(os.environ, DISTILLKIT_CPU_CACHE_MB=value)
    prelude = "import torch, distillkit\nfrom test_output_cache import l2_grad\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(__file__))


def test_capacity_bound_and_off_switch():
    # 3 MiB holds one 2 MiB block: freeing a second one releases the older.
    out = run_with_cache_mb("3", "a = l2_grad(0)[0]; b = l2_grad(1)[0]\n"
                                 "pa, pb = a.data_ptr(), b.data_ptr(); del a, b\n"
                                 "assert distillkit.cpu_cache_bytes() == 2 << 20\n"
                                 "c = l2_grad(2)[0]; assert c.data_ptr() == pb, (pa, pb, c.data_ptr())\n"
                                 "print('ok')")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    out = run_with_cache_mb("0", "a = l2_grad(0)[0]; del a\n"
                                 "assert distillkit.cpu_cache_bytes() == 0; print('ok')")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("value", ["lots", "-5", " -5", "12 ", "1e3", "18446744073709551616",
                                   str(2**63)])
def test_bad_setting_names_the_variable(value):
    """Garbage, negative (with or without leading blanks), overflowing, or too large to be a
    byte count once shifted by 20 bits."""
    out = run_with_cache_mb(value, "l2_grad(0)")
    assert out.returncode != 0
    assert "DISTILLKIT_CPU_CACHE_MB must be a non-negative integer" in out.stderr
