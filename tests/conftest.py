import math
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distillkit

HAS_CUDA = torch.cuda.is_available()

# Tolerances declared once per dtype: (rtol, atol) for losses and for gradients.
# Losses accumulate in fp32 whatever the input dtype, so only gradients (returned
# in the input dtype) pay the low-precision rounding.
LOSS_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-4, 1e-4),
    torch.float16: (1e-4, 1e-4),
}
GRAD_TOL = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.bfloat16: (2e-2, 1e-4),
    torch.float16: (2e-3, 1e-5),
}

# The skip reason of every test that needs a GPU; such tests also get the ``cuda`` marker
# (pytest_collection_modifyitems), which benchmarks/gpu_check.sh selects with ``-m cuda``.
NEEDS_CUDA = "needs a CUDA GPU"

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)),
]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(m.kwargs.get("reason") == NEEDS_CUDA for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module: ``pytestmark = pytest.mark.usefixtures("one_thread")``.

    Tiny models gain nothing from intra-op threads, which only add
    synchronisation (and stall badly when another job holds the other core).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rounding_bound(dtype, n, c):
    """c sqrt(n) eps of dtype: the rounding error, relative to the terms' size, that two sums
    of n terms in different orders (other BLAS kernels, other blocking) may differ by."""
    return c * math.sqrt(n) * torch.finfo(dtype).eps


def spawn_ranks(fn, world, *args):
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined by a gloo group on loopback.

    The ranks meet through a file store: a TCP store's port, picked free here and bound
    later by rank 0, could be taken in between by anything else on the machine.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_method = "file://" + os.path.join(tmp, "store")
        mp.spawn(_rank_main, args=(fn, world, init_method, args), nprocs=world, join=True)


def _rank_main(rank, fn, world, init_method, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # No rank tears the group down while a peer may still use it.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # A rank that returned from here aborted now and then at interpreter exit, after
    # destroy_process_group ("terminate called without an active exception", SIGABRT;
    # about 1 run in 100 of the FSDP2 test). Its core shows why: a gloo worker thread
    # (ProcessGroupGloo::runLoop) was still destroying the barrier's work, which holds the
    # last all-gather's work and through it tensors with Python references; their decref
    # takes the GIL during interpreter finalization, which ends the thread by unwinding
    # through a noexcept frame. Everything the test reads is on disk by now (fn saved it),
    # so the rank leaves without finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def pytest_report_header(config):
    return (f"distillkit: torch {torch.__version__}, built with CUDA kernels: "
            f"{bool(distillkit._C.with_cuda)}, GPU visible: {HAS_CUDA}, "
            f"threads: {torch.get_num_threads()}, "
            f"DISTILLKIT_EXPECT_CUDA={os.environ.get('DISTILLKIT_EXPECT_CUDA', '0')}")


def copies_made(fn, shape):
    """The aten copy ops (contiguous, clone, copy_) of a tensor of `shape` that fn()
    dispatches (the ops' own value checks copy scalars, not inputs)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        fn()
    return [e.name for e in prof.events()
            if e.name in ("aten::contiguous", "aten::clone", "aten::copy_")
            and list(shape) in [list(s) for s in e.input_shapes]]
