"""vocab_parallel_kd_loss over the whole range of the temperature (issue 11), as
tests/test_extreme_scalars.py checks kd_loss: 2 gloo ranks (shards of 49 + 48 of the
C = 97 classes), per-row losses and student gradients within c sqrt(C) eps of the
accumulation dtype of the exact (mpmath) values, T from 1e-3 to 1e6, every divergence,
float32 and float64; and a student close to its teacher at T = 1 (teacher = student +
1e-3 noise), where the divergence cancels as it does at a large T.

Stated constants: those of test_extreme_scalars (kd_loss's own), c = 4 for the losses
(relative to the exact loss) and c = 4 for the gradients (relative to the size of the
terms that form an entry, the `scale` of exact_rows_and_grads). The cross-shard
combination only adds a sum over the ranks of per-shard partial sums (docs/math.md §3);
measured here, at most 0.3 sqrt(C) eps for the losses and 0.06 for the gradients.

One spawn for the module runs every case; the tests compare its results.
"""
import os

import pytest
import torch

from distillkit.parallel import vocab_parallel_kd_loss

from conftest import spawn_ranks
from test_extreme_scalars import (C, DIVERGENCES, N, TEMPERATURES, assert_accurate,
                                  exact_rows_and_grads)

WORLD = 2
DTYPES = [torch.float32, torch.float64]
# (logits, T): "far" are test_extreme_scalars' independent logits at each temperature,
# "close" a teacher 1e-3 away from the student.
CASES = [("far", T) for T in TEMPERATURES] + [("close", 1.0)]


def full_logits(kind):
    """(z, u) of a case, the same on every rank and in the test process."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(N, C, generator=g) * 3
    if kind == "close":
        return z, z + 1e-3 * torch.randn(N, C, generator=g)
    return z, torch.randn(N, C, generator=g) * 3


def worker(rank, world, out_dir):
    cols = torch.arange(C).tensor_split(world)[rank]
    lo, hi = int(cols[0]), int(cols[-1]) + 1
    results = {}
    for dtype in DTYPES:
        for kind, T in CASES:
            z, u = (x.to(dtype) for x in full_logits(kind))
            for divergence, beta in DIVERGENCES:
                zs = z[:, lo:hi].clone().requires_grad_()
                rows = vocab_parallel_kd_loss(zs, u[:, lo:hi], temperature=T,
                                              divergence=divergence, beta=beta, reduction="none")
                (grad,) = torch.autograd.grad(rows.sum(), zs)
                results[(dtype, kind, T, divergence, beta)] = (rows.detach(), grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("extreme_parallel")
    spawn_ranks(worker, WORLD, str(out_dir))
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=lambda v: str(v))
@pytest.mark.parametrize("kind,T", CASES, ids=lambda v: v if isinstance(v, str) else f"T{v:g}")
def test_vocab_parallel_is_accurate_at_every_temperature(ranks, kind, T, divergence, beta,
                                                         dtype):
    key = (dtype, kind, T, divergence, beta)
    rows = ranks[0][key][0]
    for other in ranks[1:]:
        assert torch.equal(other[key][0], rows)  # every rank combines the same numbers alike
    grad = torch.cat([r[key][1] for r in ranks], 1)
    z, u = (x.to(dtype) for x in full_logits(kind))
    exact, exact_grad, scale = exact_rows_and_grads(z, u, T, divergence, beta)
    assert_accurate(rows, grad, exact, exact_grad, scale)
