"""fused_linear_kd_loss under data parallelism (2 gloo processes) equals one process.

Each run trains a tiny "language model" (a backbone and an lm head with a soft cap) for
3 SGD steps on the same global batches; rank r takes every other row, so the data-
parallel mean of the ranks' local means is the global batch's mean, and the parameters
after 3 steps must equal those of one process that sees the whole batch and computes
the loss from materialized logits (kd_loss on the soft-capped logits).

- DDP: the loss runs inside the wrapped module's forward, so DDP all-reduces every
  gradient, the head's included.
- FSDP2 (plain ``torch.distributed.fsdp.fully_shard``), loss inside the root's forward:
  FSDP unshards the head, our op sees plain tensors, FSDP reduce-scatters.
- FSDP2, loss outside any FSDP forward: the head stays a DTensor sharded on dim 0, which
  fused_linear_kd_loss gathers once and whose gradient it reduce-scatters as the mean.

gloo has no AVG / PREMUL_SUM reduce op, so FSDP is told to reduce with SUM and divide
afterwards (``set_force_sum_reduction_for_comms``), the same mean.
"""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from conftest import rounding_bound, spawn_ranks
from distillkit import fused_linear_kd_loss, kd_loss
from distillkit.ops.options import KDOptions, LogitHead

WORLD = 2
ROWS, IN, HIDDEN, CLASSES = 24, 6, 16, 40  # ROWS: the global batch, split over the ranks
STEPS = 3
HEAD = LogitHead(softcap=3.0)
OPTIONS = KDOptions(divergence="jsd", beta=0.5, temperature=2.0, hard_weight=0.2)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh())
        self.lm_head = nn.Linear(HIDDEN, CLASSES)
        with torch.no_grad():
            self.lm_head.weight.mul_(4.0)  # logits of a few units: the cap bends them

    def forward(self, x, teacher, labels):
        """The fused loss inside the module's forward (what a wrapper synchronises)."""
        return fused_linear_kd_loss(self.backbone(x), self.lm_head.weight, teacher,
                                    student_bias=self.lm_head.bias, student_head=HEAD,
                                    labels=labels, chunk_rows=5, options=OPTIONS)


def batches():
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(ROWS, IN, generator=g), torch.randn(ROWS, CLASSES, generator=g) * 2,
             torch.randint(0, CLASSES, (ROWS,), generator=g)) for _ in range(STEPS)]


def make_model():
    torch.manual_seed(0)
    return TinyLM()


def single_process():
    """One process, the whole batch, materialized logits: the reference."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, u, y in batches():
        z = HEAD.apply(model.lm_head(model.backbone(x)))
        kd_loss(z, u, labels=y, options=OPTIONS).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


def local(t, rank, world):
    return t[rank::world]


def train_ddp(rank, world):
    model = DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, u, y in batches():
        model(local(x, rank, world), local(u, rank, world), local(y, rank, world)).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.module.parameters()]


def train_fsdp(rank, world, where):
    model = make_model()
    if where == "inside":
        fully_shard(model.backbone)
        fully_shard(model)
    else:
        # Separate units; the head's forward never runs, so its weight stays sharded.
        fully_shard(model.backbone)
        fully_shard(model.lm_head)
    for module in (model.backbone, model.lm_head if where == "outside" else model):
        module.set_force_sum_reduction_for_comms(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for x, u, y in batches():
        x, u, y = (local(t, rank, world) for t in (x, u, y))
        if where == "inside":
            loss = model(x, u, y)
        else:
            assert isinstance(model.lm_head.weight, DTensor)
            loss = fused_linear_kd_loss(model.backbone(x), model.lm_head.weight, u,
                                        student_bias=model.lm_head.bias, student_head=HEAD,
                                        labels=y, chunk_rows=5, options=OPTIONS)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return [p.full_tensor().detach() if isinstance(p, DTensor) else p.detach()
            for p in model.parameters()]


def worker(rank, world, out_dir, mode):
    params = train_ddp(rank, world) if mode == "ddp" else train_fsdp(rank, world, mode)
    torch.save(params, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("mode", ["ddp", "inside", "outside"])
def test_data_parallel_matches_single_process(tmp_path, mode):
    spawn_ranks(worker, WORLD, str(tmp_path), mode)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = single_process()
    finally:
        torch.set_num_threads(threads)
    # Sums over the batch's rows in another order (per rank, then the reduction), and
    # over chunks: c sqrt(n) eps relative to the parameters' size, per step.
    rtol = rounding_bound(torch.float32, ROWS, 8 * STEPS)
    for r in range(WORLD):
        for got, ref in zip(ranks[r], want):
            torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * ref.abs().max().item())
    moved = max((a - b).abs().max().item() for a, b in zip(want, make_model().parameters()))
    assert moved > 1e-2  # the steps did something, so equality says something


def grad_worker(rank, world, out_dir):
    """The DTensor head's gradient itself (one backward, no optimizer)."""
    model = make_model()
    fully_shard(model.lm_head)
    x, u, y = (local(t, rank, world) for t in batches()[0])
    with torch.no_grad():
        h = model.backbone(x)
    loss = fused_linear_kd_loss(h, model.lm_head.weight, u, student_bias=model.lm_head.bias,
                                student_head=HEAD, labels=y, options=OPTIONS)
    loss.backward()
    grad = model.lm_head.weight.grad
    assert isinstance(grad, DTensor) and grad.placements == model.lm_head.weight.placements
    # A frozen teacher head sharded the same way, with its own soft cap: gathered, no grad.
    teacher = make_teacher_head()
    fully_shard(teacher)
    assert isinstance(teacher.weight, DTensor)
    from_teacher = fused_linear_kd_loss(h, model.lm_head.weight.detach(), teacher_hidden=h,
                                        teacher_weight=teacher.weight,
                                        teacher_bias=teacher.bias, teacher_head=TEACHER_HEAD,
                                        labels=y, options=OPTIONS)
    out = {"grad": grad.full_tensor(), "bias_grad": model.lm_head.bias.grad.full_tensor()}
    for name, value in (("losses", loss), ("teacher_losses", from_teacher)):
        out[name] = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(out[name], value.detach())
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


TEACHER_HEAD = LogitHead(scale=1.5, softcap=4.0)


def make_teacher_head():
    torch.manual_seed(5)
    return nn.Linear(HIDDEN, CLASSES).requires_grad_(False)


def test_dtensor_heads(tmp_path):
    """A sharded student head: loss and gradient (the ranks' mean); a sharded teacher head
    with a soft cap: loss."""
    spawn_ranks(grad_worker, WORLD, str(tmp_path))
    got = torch.load(tmp_path / "rank0.pt")
    model = make_model()
    x, u, y = batches()[0]
    with torch.no_grad():
        h = model.backbone(x)
    ref = kd_loss(HEAD.apply(model.lm_head(h)), u, labels=y, options=OPTIONS)
    ref.backward()
    rtol = rounding_bound(torch.float32, ROWS, 8)
    # The mean of the ranks' losses is the global loss (equal local row counts).
    torch.testing.assert_close(torch.stack(got["losses"]).mean(), ref.detach(), rtol=rtol, atol=0)
    teacher = make_teacher_head()
    ref_teacher = kd_loss(h @ model.lm_head.weight.detach().t(), TEACHER_HEAD.apply(teacher(h)),
                          labels=y, options=OPTIONS)
    torch.testing.assert_close(torch.stack(got["teacher_losses"]).mean(), ref_teacher,
                               rtol=rtol, atol=0)
    for name, want in (("grad", model.lm_head.weight.grad), ("bias_grad", model.lm_head.bias.grad)):
        torch.testing.assert_close(got[name], want, rtol=rtol, atol=rtol * want.abs().max().item())
