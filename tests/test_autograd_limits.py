"""What the ops' autograd does not support fails by name: double backward (a loss on a
gradient taken with create_graph=True) and torch.func transforms."""
import pytest
import torch

import distillkit
from distillkit.ops import coordinate_lstm_step


_HIDDEN = 3
_LSTM_WEIGHTS = (torch.randn(4 * _HIDDEN, 2), torch.randn(4 * _HIDDEN, _HIDDEN),
                 torch.randn(4 * _HIDDEN), torch.randn(1, _HIDDEN), torch.randn(1))


def _lstm(grad):
    p = grad.shape[0]
    w_ih, w_hh, bias, head_w, head_b = _LSTM_WEIGHTS
    h, c = torch.zeros(p, _HIDDEN), torch.zeros(p, _HIDDEN)
    out, _, _ = coordinate_lstm_step(grad, torch.zeros(p), h, c, [w_ih], [w_hh], [bias],
                                     head_w, head_b)
    return out.square().sum()


_U = torch.randn(4, 7)
_IDX = torch.tensor([[0, 3], [1, -1], [6, 2], [5, 4]])
_LP = torch.log(torch.tensor([[0.6, 0.3], [0.9, 0.0], [0.5, 0.2], [0.4, 0.4]]))
_W = torch.randn(7, 5)

# name in the error, loss of a (4, 7) (or (4, 5) hidden) input
LOSSES = {
    "kd_loss": lambda z: distillkit.kd_loss(z, _U, temperature=2.0, divergence="jsd"),
    "slam_loss": lambda z: distillkit.slam_loss(z, torch.softmax(_U, -1), 0.7, 2),
    "distance": lambda z: distillkit.distance(z, _U, "pearson"),
    "distance ": lambda z: distillkit.distance(z, _U, "l2"),
    "sparse_kd_loss": lambda z: distillkit.sparse_kd_loss(z, _IDX, _LP),
    "fused_linear_kd_loss": lambda z: distillkit.fused_linear_kd_loss(z[:, :5], _W, _U),
    "fused_linear_sparse_kd_loss": lambda z: distillkit.fused_linear_sparse_kd_loss(
        z[:, :5], _W, _IDX, _LP),
    "coordinate_lstm": lambda z: _lstm(z.reshape(-1)),
}


@pytest.mark.parametrize("name", LOSSES)
def test_double_backward_raises_by_name(name):
    torch.manual_seed(0)
    z = torch.randn(4, 7, dtype=torch.float32, requires_grad=True)
    loss = LOSSES[name](z)
    (g,) = torch.autograd.grad(loss, z, create_graph=True)
    # The first-order gradient itself is unchanged by create_graph=True.
    (plain,) = torch.autograd.grad(LOSSES[name](z), z)
    torch.testing.assert_close(g.detach(), plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=f"{name.strip()}.* does not support double backward"):
        torch.autograd.grad((g * g).sum(), z, allow_unused=True)


@pytest.mark.parametrize("name", LOSSES)
def test_torch_func_grad_is_rejected_by_name(name):
    z = torch.randn(4, 7)
    op = "coordinate_lstm_step" if name == "coordinate_lstm" else name.strip()
    with pytest.raises(RuntimeError, match=f"{op} does not support torch.func"):
        torch.func.grad(LOSSES[name])(z)
