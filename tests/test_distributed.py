"""KDTrainer under DDP (2 gloo processes on loopback) equals one process with the same global batch.

Both runs see the same global batches (DistributedSampler's order depends only on
seed and epoch, and rank r takes every other index), and DDP averages the ranks'
``mean`` gradients, which is the gradient of the global batch's mean. The DDP run
is also interrupted after one epoch and resumed from a checkpoint written by rank 0.
"""
import os

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset

from conftest import spawn_ranks
from distillkit.data import load_digits_splits, mlp
from distillkit.trainers import KDConfig, KDTrainer

WORLD = 2
GLOBAL_BATCH = 32
EPOCHS = 3
# 960 examples: 30 global batches, 15 per rank, none ragged.
TRAIN_SIZE = 960


def make_trainer(batch_size):
    """The same run for any world size: fixed inits, SGD, KD with a hard term."""
    splits = load_digits_splits(seed=0)
    torch.manual_seed(0)
    teacher = mlp(splits.num_features, [64], splits.num_classes)
    torch.manual_seed(1)
    student = mlp(splits.num_features, [32], splits.num_classes)
    return KDTrainer(student, Subset(splits.train, range(TRAIN_SIZE)), teacher=teacher,
                     eval_data=splits.val, loss=KDConfig(temperature=2.0, hard_weight=0.5),
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                     epochs=EPOCHS, batch_size=batch_size, seed=3, progress=False)


def ddp_worker(rank, world, out_dir):
    checkpoint = os.path.join(out_dir, "ddp.pt")
    make_trainer(GLOBAL_BATCH // world).fit(stop_epoch=1, checkpoint_path=checkpoint)
    resumed = make_trainer(GLOBAL_BATCH // world)
    assert isinstance(resumed.model, DistributedDataParallel)
    resumed.resume(checkpoint)
    resumed.fit()
    torch.save({"params": [p.detach() for p in resumed.student.parameters()],
                "history": resumed.history}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_matches_single_process(tmp_path):
    spawn_ranks(ddp_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = make_trainer(GLOBAL_BATCH)
        single.fit()
    finally:
        torch.set_num_threads(threads)

    # DDP keeps the replicas identical.
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(a, b)
    assert ranks[0]["history"] == ranks[1]["history"]
    # Equal to one process up to the order of float sums (gradient all-reduce).
    for a, b in zip(ranks[0]["params"], single.student.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    assert len(ranks[0]["history"]) == EPOCHS
    for got, want in zip(ranks[0]["history"], single.history):
        assert got["epoch"] == want["epoch"]
        assert got["eval_accuracy"] == want["eval_accuracy"]
        for key in ("train_loss", "eval_loss"):
            assert abs(got[key] - want[key]) <= 1e-5 * abs(want[key])
