"""No host code reached from the CUDA kernels reads device memory (issue 13).

A device read on the host (``.item()``, ``nonzero``, a copy to the CPU, an explicit
synchronize) is a device-to-host copy and a stream sync on every call. The emulator
cannot see syncs, so this reads the C++ sources: every file reached from csrc/cuda/*.cu
through ``#include "..."`` (and, for a header, its own .cpp) must be free of the
patterns below, comments and string literals aside. The one documented sync is
check_errors' (csrc/cuda/device_errors.cu), allowed by name below. The Python host code
of a CUDA path (vocab_parallel_kd_loss) is checked at run time, at the foot.
"""
import os
import re
import sys
import textwrap

import pytest
import torch

from conftest import spawn_ranks

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

# Host-side reads of device memory, or waits for the device.
DEVICE_READS = {
    "item": re.compile(r"\.\s*item\s*(<[^>]*>)?\s*\("),
    "_local_scalar_dense": re.compile(r"_local_scalar_dense"),
    "cpu()": re.compile(r"\.\s*cpu\s*\("),
    "to CPU": re.compile(r"\.\s*to\s*\([^;]*kCPU"),
    "nonzero": re.compile(r"\bnonzero\s*\("),
    "is_nonzero": re.compile(r"\bis_nonzero\s*\("),
    "equal": re.compile(r"\b(at::)?(equal|allclose)\s*\("),
    "tolist": re.compile(r"\btolist\s*\("),
    "cudaMemcpy": re.compile(r"\bcudaMemcpy\w*\s*\("),
    "synchronize": re.compile(r"\b(cudaDeviceSynchronize|cudaStreamSynchronize|cudaEventSynchronize)"
                              r"\s*\(|\.\s*synchronize\s*\("),
}

# (file relative to csrc, pattern name): the documented sync of the check_errors op.
ALLOWED = {("cuda/device_errors.cu", "synchronize"): 1}

INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)


def strip_comments_and_strings(text):
    """C++ source without comments and string/char literals (newlines kept)."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            out.append("\n" * text.count("\n", i, n if j < 0 else j))
            i = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(c + c)
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def reached_files(csrc):
    """Files (relative to csrc) reached from cuda/*.cu: includes resolved against the
    including file's folder, then csrc; a reached header's .cpp is reached too."""
    todo = [os.path.join("cuda", f) for f in sorted(os.listdir(os.path.join(csrc, "cuda")))
            if f.endswith(".cu")]
    seen = set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        with open(os.path.join(csrc, rel)) as f:
            text = f.read()
        for inc in INCLUDE.findall(text):
            for cand in (os.path.normpath(os.path.join(os.path.dirname(rel), inc)), inc):
                if os.path.exists(os.path.join(csrc, cand)):
                    todo.append(cand)
                    stem, ext = os.path.splitext(cand)
                    if ext in (".h", ".cuh") and os.path.exists(os.path.join(csrc, stem + ".cpp")):
                        todo.append(stem + ".cpp")
                    break
    return sorted(seen)


def device_reads(csrc):
    """{(file, pattern name): count} over the reached files, before the allow list."""
    found = {}
    for rel in reached_files(csrc):
        with open(os.path.join(csrc, rel)) as f:
            code = strip_comments_and_strings(f.read())
        for name, pat in DEVICE_READS.items():
            count = len(pat.findall(code))
            if count:
                found[(rel, name)] = count
    return found


def violations(csrc):
    return {k: v for k, v in device_reads(csrc).items() if ALLOWED.get(k) != v}


def test_cuda_host_code_reads_no_device_memory():
    assert reached_files(CSRC), "no CUDA sources found"
    bad = violations(CSRC)
    assert not bad, f"device reads in host code reached from csrc/cuda: {bad}"


def test_the_one_documented_sync_is_check_errors():
    # The allow list is exact: it cannot hide a second sync in the same file.
    assert device_reads(CSRC).get(("cuda/device_errors.cu", "synchronize")) == 1


def test_check_flags_host_syncs_of_the_former_value_checks(tmp_path):
    # The host value checks as they were in csrc/row_loss.cpp and csrc/kd_loss.cpp
    # (main b2a1f28), reached from a .cu through its header: the check must flag them.
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "op.cu").write_text('#include "row_loss.h"\n')
    (tmp_path / "row_loss.h").write_text("int64_t first_bad_row(const at::Tensor& ok);\n")
    (tmp_path / "row_loss.cpp").write_text(textwrap.dedent("""\
        // .item() in a comment is not code
        int64_t first_bad_row(const at::Tensor& ok) {
          if (ok.all().item<bool>()) return -1;
          return (~ok).nonzero().select(1, 0)[0].item<int64_t>();
        }
        void f(const at::Tensor& y) { auto v = y.cpu(); const char* s = ".item()"; }
        """))
    found = violations(str(tmp_path))
    assert found == {("row_loss.cpp", "item"): 2, ("row_loss.cpp", "nonzero"): 1,
                     ("row_loss.cpp", "cpu()"): 1}


def test_cpu_value_checks_are_not_reached_from_cuda():
    # They read values on the host by design: only the CPU kernels may include them.
    assert "cpu_value_checks.cpp" not in reached_files(CSRC)
    assert device_reads(CSRC) is not None
    with open(os.path.join(CSRC, "cpu_value_checks.cpp")) as f:
        assert DEVICE_READS["item"].search(strip_comments_and_strings(f.read()))


@pytest.mark.parametrize("snippet,name", [
    ("x.to(at::kCPU);", "to CPU"),
    ("at::_local_scalar_dense(t);", "_local_scalar_dense"),
    ("cudaStreamSynchronize(s);", "synchronize"),
    ("stream.synchronize();", "synchronize"),
    ("cudaMemcpyAsync(a, b, n, k, s);", "cudaMemcpy"),
    ("if (at::equal(a, b)) {}", "equal"),
])
def test_each_pattern_is_caught(tmp_path, snippet, name):
    (tmp_path / "cuda").mkdir()
    (tmp_path / "cuda" / "op.cu").write_text(snippet + "\n")
    assert violations(str(tmp_path)) == {("cuda/op.cu", name): 1}


# --- the Python host code of the CUDA paths: vocab_parallel_kd_loss ---------------------
# Its CUDA path is device-independent Python over the ops above, so a host read there is a
# Python call on a tensor. The guard below records each such call (on any device: the
# same code runs on CUDA) made while the loss runs forward and backward, except inside
# _shard_layout, whose shape exchange reads host values (a CPU tensor with the gloo group
# used here; see its docstring for a device-only group). It patches the methods on
# torch.Tensor (and the torch functions), not a TorchFunctionMode: a mode does not reach
# the autograd engine's call of the backward.
HOST_READS = ("__bool__", "__int__", "__float__", "__index__", "__complex__", "item", "tolist",
              "numpy", "cpu", "nonzero", "argwhere", "masked_select", "unique", "equal",
              "allclose")


class HostReadGuard:
    """Records (name, in backward) of every host read outside the code object `allowed`;
    counts the intercepted calls made from the code object `backward`."""

    def __init__(self, allowed, backward):
        self.allowed, self.backward = allowed, backward
        self.reads, self.backward_calls = [], 0
        self._saved = []

    def _seen(self, name, args):
        codes = set()
        frame = sys._getframe(2)
        while frame is not None:
            codes.add(frame.f_code)
            frame = frame.f_back
        in_backward = self.backward in codes
        self.backward_calls += in_backward
        read = name in HOST_READS or (
            name in ("__getitem__", "__setitem__") and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if isinstance(args[1], tuple) else (args[1],))))
        if read and self.allowed not in codes:
            self.reads.append((name, in_backward))

    def _patch(self, owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            self._seen(name, args)
            return original(*args, **kwargs)
        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    def __enter__(self):
        for name in HOST_READS + ("__getitem__", "__setitem__", "where"):
            self._patch(torch.Tensor, name) if hasattr(torch.Tensor, name) else None
            self._patch(torch, name) if hasattr(torch, name) and not name.startswith("_") else None
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def guarded_worker(rank, world):
    from distillkit.losses import parallel
    c, n = 11, 6
    cols = torch.arange(c).tensor_split(world)[rank]
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    g = torch.Generator().manual_seed(3)
    z, u = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[::3] = -100
    calls = [dict(divergence="forward_kl", labels=labels, hard_weight=0.3, temperature=2.0,
                  weight=torch.rand(n, generator=g)),
             dict(divergence="jsd", beta=0.3, temperature=1e4, labels=labels),  # stable rows
             dict(divergence="reverse_kl", temperature=1e4, reduction="sum"),
             dict(divergence="forward_kl", labels=labels, hard_weight=1.0, reduction="none")]
    seen_backward = 0
    for kwargs in calls:
        zs = z[:, lo:hi].clone().requires_grad_()
        us = u[:, lo:hi].clone().requires_grad_()
        guard = HostReadGuard(parallel._shard_layout.__code__,
                              parallel._VocabParallelKD.backward.__code__)
        with guard:
            loss = parallel.vocab_parallel_kd_loss(zs, us, **kwargs)
            loss.sum().backward()
        assert not guard.reads, f"host reads in vocab_parallel_kd_loss {kwargs}: {guard.reads}"
        assert zs.grad is not None and us.grad is not None
        seen_backward += guard.backward_calls
    # The backward's own tensor calls (the hard term's column fix) went through the guard.
    assert seen_backward > 0, "the guard did not see the backward"


def test_vocab_parallel_reads_no_tensor_values_on_the_host():
    spawn_ranks(guarded_worker, 2)


def test_host_read_guard_sees_reads():
    # The guard is live: a bool() of a tensor, a mask index and a nonzero are reads; it
    # restores what it patched.
    guard = HostReadGuard(None, None)
    x = torch.arange(4)
    with guard:
        bool(x.any())
        x[x > 1]
        torch.nonzero(x)
        x.sum()
    assert guard.reads == [("__bool__", False), ("__getitem__", False), ("nonzero", False)]
    assert torch.Tensor.__bool__ is torch._C.TensorBase.__bool__
