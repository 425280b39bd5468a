"""Checkpoints survive a process killed (SIGKILL) in the middle of a save: a plain writer's
and a real training run's, which then resumes from what is on disk."""
import os
import subprocess
import sys

import pytest
import torch

from distillkit.trainers.runtime import save_atomically
from sigkill import kill_while_growing

# 64 MiB per version: a save takes long enough to be caught in progress.
NUMEL = 16 * 2**20

WRITER = f"""
import sys, torch
from distillkit.trainers.runtime import save_atomically
path = sys.argv[1]
i = 1
while True:
    save_atomically({{"i": i, "x": torch.full(({NUMEL},), float(i))}}, path)
    i += 1
"""


def files(directory):
    return [os.path.join(directory, n) for n in os.listdir(directory)]


def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    save_atomically({"i": 0, "x": torch.zeros(NUMEL)}, path)
    child = subprocess.Popen([sys.executable, "-c", WRITER, path])
    # Every version has the same size, so only a file being written grows: the atomic
    # writer's temporary file, or a non-atomic writer's checkpoint itself.
    kill_while_growing(child, lambda: files(tmp_path))

    state = torch.load(path, weights_only=True)
    assert state["x"].shape == (NUMEL,)
    assert torch.equal(state["x"], torch.full((NUMEL,), float(state["i"])))


# A real training run that checkpoints after every epoch: an MLP whose checkpoint (weights
# and Adam state) is ~50 MB, so a save takes long enough to be caught in progress.
TRAINER = """
import torch
from distillkit.data import DictDataset, mlp
from distillkit.trainers import KDTrainer


def make_trainer(epochs):
    g = torch.Generator().manual_seed(0)
    data = DictDataset(input=torch.randn(64, 16, generator=g),
                       label=torch.randint(0, 10, (64,), generator=g))
    torch.manual_seed(0)
    teacher = mlp(16, [32], 10)
    student = mlp(16, [2048, 2048], 10, dropout=0.1)
    return KDTrainer(student, data, teacher=teacher, epochs=epochs, batch_size=32,
                     progress=False)
"""
RUN = TRAINER + """
import sys
torch.set_num_threads(1)  # as the test's process: the same GEMM blocking, the same bits
make_trainer(10_000).fit(checkpoint_path=sys.argv[1])
"""


@pytest.mark.usefixtures("one_thread")
def test_sigkill_of_a_training_run_during_a_save_then_resume(tmp_path):
    path = tmp_path / "run.pt"
    child = subprocess.Popen([sys.executable, "-c", RUN, str(path)])
    # Only a save in progress grows a temporary file beside the checkpoint; wait for a
    # checkpoint to be there first (killed in the first save, the run has nothing to resume).
    kill_while_growing(child, lambda: [p for p in files(tmp_path) if p.endswith(".tmp")]
                       if path.exists() else [])

    namespace = {}
    exec(TRAINER, namespace)
    resumed = namespace["make_trainer"](10_000)
    resumed.resume(str(path))  # what was on disk when the run died
    done = resumed.epoch
    assert done >= 1
    resumed.fit(stop_epoch=done + 2)
    whole = namespace["make_trainer"](10_000)
    whole.fit(stop_epoch=done + 2)
    assert resumed.history == whole.history
    assert all(torch.equal(a, b) for a, b in zip(resumed.student.parameters(),
                                                 whole.student.parameters()))


def test_save_through_a_symlink_replaces_its_target(tmp_path):
    (tmp_path / "disk").mkdir()
    save_atomically({"i": 0}, str(tmp_path / "disk" / "ckpt.pt"))
    (tmp_path / "ckpt.pt").symlink_to(tmp_path / "disk" / "ckpt.pt")
    save_atomically({"i": 1}, str(tmp_path / "ckpt.pt"))
    assert (tmp_path / "ckpt.pt").is_symlink()
    assert torch.load(tmp_path / "disk" / "ckpt.pt", weights_only=True) == {"i": 1}
    assert sorted(os.listdir(tmp_path / "disk")) == ["ckpt.pt"]
