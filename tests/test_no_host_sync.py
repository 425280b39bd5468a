"""No host code reached from the CUDA kernels reads device memory (issue 13).

A device read on the host (``.item()``, ``nonzero``, a copy to the CPU, an explicit
synchronize) is a device-to-host copy and a stream sync on every call. The emulator
cannot see syncs, so this reads the C++ sources: every file reached from csrc/cuda/*.cu
through ``#include "..."`` (and, for a header, its own .cpp) must be free of the
patterns below, comments and string literals aside. The one documented sync is
check_errors' (csrc/cuda/device_errors.cu), allowed by name below.
"""
import os
import re
import textwrap

import pytest

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
