"""The dynamic loss network of L2T-DLN (docs/math.md §9.4): a small MLP that is the student's loss.

Student logits z (N, C) and labels y (N,) become N·C "1-vs-1" rows: with s = σ(z)
(elementwise sigmoid), the row of example n and class c is

    [s_{n,y_n}, s_{n,c}, 1, 0]   for c ≠ y_n,          [0, 0, 0, 0]   for c = y_n,

and the loss is the mean of a bias-free MLP 4→40→40→40→40→1 (LeakyReLU 0.01 after
each hidden layer) over all N·C rows. Being bias-free, the MLP maps the zero row to 0:
the correct-class rows add nothing but still count in the denominator N·C. The
weights φ (4·40 + 3·40·40 + 40 = 5 000) are what the L2T-DLN teacher adjusts; the
loss can be evaluated at any flat φ with :meth:`DynamicLossNetwork.functional_loss`
(``torch.func.functional_call``), differentiably in φ.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["DynamicLossNetwork", "one_vs_one_bce", "imitate"]


class DynamicLossNetwork(nn.Module):
    """L2T-DLN's learned loss ``loss(z, y) = mean over N·C rows of MLP(row)``.

    Args:
        hidden: width of the hidden layers (40).
        depth: number of hidden layers (4).
        negative_slope: LeakyReLU slope (0.01).

    Input: logits (N, C) (any float dtype; cast to the weights' dtype) and int64
    labels (N,) in [0, C); output: a 0-d tensor. Weights from ``nn.Linear``'s default
    init (torch's global RNG); :func:`imitate` fits them to a chosen loss first.
    """

    def __init__(self, hidden: int = 40, depth: int = 4, negative_slope: float = 0.01):
        super().__init__()
        if hidden < 1 or depth < 1:
            raise ValueError(f"hidden and depth must be >= 1 (got {hidden} and {depth})")
        layers = []
        width = 4
        for _ in range(depth):
            layers += [nn.Linear(width, hidden, bias=False), nn.LeakyReLU(negative_slope)]
            width = hidden
        layers.append(nn.Linear(width, 1, bias=False))
        self.net = nn.Sequential(*layers)

    @staticmethod
    def transform(logits: Tensor, labels: Tensor) -> Tensor:
        """The 1-vs-1 rows (N, C, 4): [σ(z_y), σ(z_c), 1, 0] for c ≠ y, zeros for c = y."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be (N, C) (got shape {tuple(logits.shape)})")
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"labels must be (N,) = ({logits.shape[0]},) "
                             f"(got shape {tuple(labels.shape)})")
        s = torch.sigmoid(logits)
        s_y = s.gather(1, labels[:, None]).expand_as(s)
        rows = torch.stack([s_y, s, torch.ones_like(s), torch.zeros_like(s)], dim=-1)
        wrong = torch.ones_like(s).scatter(1, labels[:, None], 0.0)
        return rows * wrong[..., None]

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        weight = self.net[0].weight
        rows = self.transform(logits.to(weight.dtype), labels)
        return self.net(rows).mean()

    def num_weights(self) -> int:
        """|φ| (5 000 for the default 4→40→40→40→40→1)."""
        return sum(p.numel() for p in self.parameters())

    def flat_weights(self) -> Tensor:
        """φ: the weights flattened in ``named_parameters`` order, a detached copy (P,)."""
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])

    def unflatten(self, phi: Tensor) -> Dict[str, Tensor]:
        """``{name: view of phi}`` for :func:`torch.func.functional_call` (keeps autograd)."""
        if phi.shape != (self.num_weights(),):
            raise ValueError(f"phi must be ({self.num_weights()},) (got shape {tuple(phi.shape)})")
        names, shapes = zip(*[(n, p.shape) for n, p in self.named_parameters()])
        sizes = [math.prod(s) for s in shapes]
        return {n: t.view(s) for n, t, s in zip(names, phi.split(sizes), shapes)}

    def load_flat_weights(self, phi: Tensor) -> None:
        """Copy a flat φ into the module's weights."""
        with torch.no_grad():
            for p, t in zip(self.parameters(), self.unflatten(phi).values()):
                p.copy_(t)

    def functional_loss(self, phi: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss with weights φ (P,) instead of the module's own, differentiable in φ."""
        return functional_call(self, self.unflatten(phi), (logits, labels))


def one_vs_one_bce(s_y: Tensor, s_c: Tensor) -> Tensor:
    """−log s_y − log(1 − s_c): two binary cross entropies per 1-vs-1 row (a CE-like start)."""
    return -torch.log(s_y) - torch.log1p(-s_c)


def imitate(dln: DynamicLossNetwork, target: Callable[[Tensor, Tensor], Tensor] = one_vs_one_bce,
            *, steps: int = 500, lr: float = 3e-3, points: int = 1024, margin: float = 0.01,
            generator: Optional[torch.Generator] = None) -> float:
    """Fit ``dln``'s row function to ``target(s_y, s_c)`` in place; return the final MSE.

    An initialization **[choice]**: a DLN straight from ``nn.Linear``'s init is a
    random loss whose gradient may push the student either way, and the teacher moves
    each weight by at most |s| = 10⁻³ per iteration. Here the MLP is regressed (Adam,
    MSE) on rows [s_y, s_c, 1, 0] with (s_y, s_c) drawn uniformly from
    [margin, 1 − margin]² afresh each step (from ``generator``, default seed 0).
    """
    generator = generator or torch.Generator().manual_seed(0)
    weight = dln.net[0].weight
    optimizer = torch.optim.Adam(dln.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        s = torch.rand(points, 2, generator=generator, dtype=weight.dtype)
        s = (margin + (1 - 2 * margin) * s).to(weight.device)
        rows = torch.cat([s, torch.ones_like(s[:, :1]), torch.zeros_like(s[:, :1])], dim=1)
        loss = torch.mean((dln.net(rows).squeeze(1) - target(s[:, 0], s[:, 1])) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for p in dln.parameters():
        p.grad = None
    return float(loss.detach())
