"""Checkpoints survive a process killed (SIGKILL) in the middle of a save."""
import os
import subprocess
import sys

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
