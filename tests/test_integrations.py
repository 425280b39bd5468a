"""distillkit.integrations.generalized_jsd_loss against TRL's own GKDTrainer.generalized_jsd_loss."""
import os

import pytest
import torch

from distillkit.integrations import generalized_jsd_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd.gkd_trainer import GKDTrainer  # noqa: E402  (requirements.txt installs TRL)

trl_loss = GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("num_items", [None, 7])
def test_matches_trl(beta, temperature, reduction, with_labels, num_items):
    b, s, v = 2, 5, 33
    z = torch.randn(b, s, v, dtype=torch.float64, requires_grad=True)
    u = torch.randn(b, s, v, dtype=torch.float64)
    labels = None
    if with_labels:
        labels = torch.randint(0, v, (b, s))
        labels[0, :3] = -100
    kw = dict(labels=labels, beta=beta, temperature=temperature, reduction=reduction,
              num_items_in_batch=num_items)
    ours = generalized_jsd_loss(z, u, **kw)
    theirs = trl_loss(z, u, **kw)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, z), torch.autograd.grad(theirs, z))


def test_all_masked_is_zero_like_trl():
    z = torch.randn(1, 3, 8, requires_grad=True)
    labels = torch.full((1, 3), -100)
    ours = generalized_jsd_loss(z, torch.randn(1, 3, 8), labels=labels)
    assert ours.item() == 0.0
    assert not torch.autograd.grad(ours, z)[0].any()


def test_none_reduction_is_rejected():
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 3), reduction="none")
