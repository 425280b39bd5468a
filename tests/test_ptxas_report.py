"""benchmarks/ptxas_report.py: its occupancy arithmetic and its parsers of ptxas -v and PTX.

The occupancy cases are the CUDA occupancy calculator's answers for sm_90 (registers per
warp in 256-register units from four 16 K sub-partitions, shared memory in 128-byte units
plus 1 KiB reserved per block); the log and PTX snippets have the shapes nvcc 13.0 prints.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import ptxas_report as report  # noqa: E402

SM90 = report.DEVICES["90"]


@pytest.mark.parametrize("regs,block,smem,blocks,limiter", [
    (32, 256, 0, 8, "threads+registers"),   # 8 x 256 = 2048 threads, 32 regs fit exactly
    (40, 256, 0, 6, "registers"),           # 1280 regs per warp: 12 warps per sub-partition
    (64, 256, 0, 4, "registers"),
    (72, 256, 0, 3, "registers"),           # 2304 per warp: 7 per sub-partition, 28 warps
    (255, 256, 0, 1, "registers"),          # rounded to 256 per thread: 8 warps per SM
    (24, 32, 0, 32, "blocks"),              # 32 block slots: 1024 threads, 50%
    (32, 256, 48 * 1024, 4, "shared memory"),  # 49 KiB per block with the reserved 1 KiB
    (32, 256, 8236, 8, "threads+registers"),   # 8320 + 1024 B: 24 blocks' worth of smem
])
def test_occupancy_matches_the_calculator(regs, block, smem, blocks, limiter):
    occ, got_blocks, got_limiter = report.occupancy(SM90, regs, block, smem)
    assert (got_blocks, got_limiter) == (blocks, limiter)
    assert occ == pytest.approx(blocks * block / 2048)


LOG = """\
ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelILi256EEvv' for 'sm_90'
ptxas info    : Function properties for _Z6kernelILi256EEvv
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8 bytes cumulative stack size, 8556 bytes smem
ptxas info    : Compile time = 601.268 ms
ptxas info    : Function properties for __internal_helper
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z5otherv' for 'sm_90'
ptxas info    : Function properties for _Z5otherv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 48 registers, used 0 barriers
"""


def test_parse_ptxas_reads_each_entry_and_skips_device_functions():
    first, second = report.parse_ptxas(LOG, "op")
    assert (first.mangled, first.registers, first.barriers, first.smem) == (
        "_Z6kernelILi256EEvv", 64, 1, 8556)
    assert (first.stack, first.spill_stores, first.spill_loads) == (8, 12, 4)
    assert (second.mangled, second.registers, second.smem, second.stack) == ("_Z5otherv", 48, 0, 0)


PTX = """\
.extern .shared .align 16 .b8 _ZN10distillkit4dynE[];
.visible .entry _Z1av(
\t.param .align 8 .b8 _Z1av_param_0[16]
)
.maxntid 64, 1, 1
{
\t{ .reg .b32 t; }
\tmov.u64 %rd1, _ZN10distillkit4dynE;
}
.entry _Z1bv(
\t.param .u64 _Z1bv_param_0
)
{
\tret;
}
"""


def test_parse_ptx_reads_launch_bound_and_dynamic_shared_use():
    assert report.parse_ptx(PTX) == {"_Z1av": (64, True), "_Z1bv": (None, False)}


def test_short_name_drops_namespaces_and_parameters():
    demangled = ("void distillkit::(anonymous namespace)::kd_loss_forward_kernel<c10::BFloat16, "
                 "float, float, 256>(distillkit::(anonymous namespace)::ForwardArgs<c10::BFloat16,"
                 " float, float>)")
    assert report.short_name(demangled) == "kd_loss_forward_kernel<bf16, fp32, fp32, 256>"


def test_spill_summary_fails_only_the_checked_ops():
    spilling = [report.Kernel("slam_loss", "_Za", name="a", spill_stores=8, spill_loads=8),
                report.Kernel("coordinate_lstm", "_Zb", name="b", spill_stores=4),
                report.Kernel("kd_loss", "_Zc", name="c")]
    fail, note = report.spill_summary(spilling)
    assert len(fail) == 1 and "slam_loss" in fail[0] and "spill stores 8 B" in fail[0]
    assert len(note) == 1 and "coordinate_lstm" in note[0]
