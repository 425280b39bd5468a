"""Training students with a distiller, and the search's fitness: a short proxy run (docs/math.md §9.5).

The student's objective is ``CE(z_s, y) + L(s, t)`` with ``L`` a
:class:`~distillkit.methods.kdzero.distiller.Distiller` (no distiller: plain cross entropy).
Teacher and student are ``nn.Sequential`` networks whose last layer maps a hidden
*feature* to the logits (the :func:`distillkit.data.mlp` factory builds these).
A distiller of the ``"feature"`` output compares the teacher's feature with the
student's, mapped to the teacher's width by a linear connector trained alongside
the student (and useless at inference).

The teacher is frozen and the inputs are not augmented, so its outputs are computed
once and carried in the data set (``"teacher_logits"``, ``"teacher_feature"``).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.data import DictDataset
from distillkit.methods.kdzero.distiller import Distiller
from distillkit.methods.kdzero.search import Evaluation
from distillkit.trainers import KDTrainer

__all__ = ["DistillStudent", "DistillerTrainer", "ProxyTask", "teacher_outputs"]

OUTPUTS = ("logits", "feature")


class DistillStudent(nn.Module):
    """A student ``nn.Sequential`` and, optionally, the connector of its feature.

    ``forward(x)`` returns logits (B, C); ``forward(x, feature=True)`` returns
    ``(logits, connector(feature))``. The connector is a ``Linear`` from the student's
    feature width to the teacher's.
    """

    def __init__(self, net: nn.Sequential, teacher_width: Optional[int] = None):
        super().__init__()
        self.net = net
        self.connector = (None if teacher_width is None
                          else nn.Linear(net[-1].in_features, teacher_width))

    def forward(self, x: Tensor, feature: bool = False):
        h = self.net[:-1](x)
        logits = self.net[-1](h)
        if not feature:
            return logits
        return logits, self.connector(h)


@torch.no_grad()
def teacher_outputs(teacher: nn.Sequential, x: Tensor) -> Dict[str, Tensor]:
    """``{"teacher_logits": (N, C), "teacher_feature": (N, D)}`` of the frozen teacher."""
    teacher.eval()
    h = teacher[:-1](x)
    return {"teacher_logits": teacher[-1](h), "teacher_feature": h}


class Diverged(RuntimeError):
    """A training loss turned NaN or infinite."""


class DistillerTrainer(KDTrainer):
    """:class:`~distillkit.trainers.KDTrainer` with the loss ``CE + distiller(s, t)``.

    ``train_data`` items carry ``"teacher_logits"`` (and ``"teacher_feature"`` for a
    feature distiller). Random transforms draw from a generator seeded with ``seed``.
    A non-finite training loss raises :class:`Diverged`.
    """

    def __init__(self, student: DistillStudent, train_data, distiller: Optional[Distiller], *,
                 seed: int = 0, **kwargs):
        super().__init__(student, train_data, seed=seed, **kwargs)
        self.distiller = distiller
        self.generator = torch.Generator().manual_seed(seed)

    def distill_terms(self, batch, generator: torch.Generator) -> Tuple[Tensor, Optional[Tensor]]:
        """(cross entropy, distiller loss or None) of one batch."""
        d = self.distiller
        if d is None:
            return F.cross_entropy(self.model(batch["input"]), batch["label"]), None
        if d.output == "feature":
            logits, s = self.model(batch["input"], feature=True)
        else:
            logits = s = self.model(batch["input"])
        t = batch[f"teacher_{d.output}"]
        return F.cross_entropy(logits, batch["label"]), d(s, t, generator=generator)

    def compute_loss(self, batch) -> Tensor:
        ce, kd = self.distill_terms(batch, self.generator)
        loss = ce if kd is None else ce + kd
        if not torch.isfinite(loss):
            raise Diverged(f"non-finite training loss at epoch {self.epoch + 1}")
        return loss

    def screen(self, max_loss: float) -> Optional[Evaluation]:
        """Loss rejection: None if the distiller's loss on the first training batch is
        finite, in ``[0, max_loss]`` and has a finite gradient; else the rejection.

        The student is left unchanged (gradients are dropped, nothing is stepped), and
        random transforms draw from a generator of their own, so training after
        screening is what it would have been without.
        """
        self.sampler.set_epoch(0)
        batch = self._to_device(next(iter(self.loader)))
        try:
            _, loss = self.distill_terms(batch, torch.Generator().manual_seed(self.seed))
            value = loss.item()
            if not math.isfinite(value):
                return _rejected("non-finite loss", value)
            # Rounding can take a zero distance a hair below 0.
            if not -1e-6 <= value <= max_loss:
                return _rejected("loss out of range", value)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in self.student.parameters() if p.grad is not None]
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            self.optimizer.zero_grad(set_to_none=True)
            if not finite:
                return _rejected("non-finite gradient", value)
        except Exception as e:  # noqa: BLE001 -- any failure of a candidate is a rejection
            return Evaluation("rejected", reason=f"raised {type(e).__name__}",
                              metrics={"error": str(e)})
        return None


def _rejected(reason: str, first_loss: float) -> Evaluation:
    # JSON has no NaN or infinity; the log keeps them readable as strings.
    value = first_loss if math.isfinite(first_loss) else str(first_loss)
    return Evaluation("rejected", reason=reason, metrics={"first_loss": value})


class ProxyTask:
    """The search's fitness function: validation accuracy after short training runs.

    Calling it on a distiller screens its loss on the first batch
    (:meth:`DistillerTrainer.screen`), then, for each seed ``s`` in ``seeds``, builds a
    student (``make_student()`` after ``torch.manual_seed(s)``: every candidate starts
    from the same weights and sees the same batches, so candidates differ only in
    their loss), trains it ``epochs`` epochs with ``CE + distiller`` and evaluates it
    on ``val``. Fitness = the mean accuracy over seeds, ties broken by the lower mean
    validation cross entropy. More seeds cost proportionally more and make the
    fitness less a matter of one initialization. Deterministic for a fixed thread count.

    Args:
        teacher: frozen ``nn.Sequential`` teacher (its outputs are precomputed).
        make_student: builds a fresh student ``nn.Sequential``.
        train: labelled :class:`~distillkit.data.DictDataset` the student trains on.
        val: labelled data set for the fitness.
        epochs: proxy training length.
        batch_size, lr: minibatch size and Adam learning rate.
        seeds: weight, batch-order and random-transform seeds, one proxy run each.
        max_loss: loss rejection bound on the first-batch distiller loss **[choice]**
            (1e3: several hundred times the initial cross entropy, ln C ≈ 2.3).
    """

    def __init__(self, teacher: nn.Sequential, make_student: Callable[[], nn.Sequential],
                 train: DictDataset, val, *, epochs: int = 3, batch_size: int = 32,
                 lr: float = 3e-3, seeds: Sequence[int] = (0,), max_loss: float = 1e3):
        if not seeds:
            raise ValueError("seeds must name at least one seed")
        self.train_data = train.with_tensors(**teacher_outputs(teacher, train.tensors["input"]))
        self.teacher_width = self.train_data.tensors["teacher_feature"].shape[1]
        self.make_student = make_student
        self.val = val
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.seeds, self.max_loss = tuple(seeds), max_loss

    def trainer(self, distiller: Optional[Distiller], *, seed: int,
                epochs: int) -> DistillerTrainer:
        """An unfitted trainer of a fresh student (weights from ``seed``)."""
        torch.manual_seed(seed)
        net = self.make_student()
        feature = distiller is not None and distiller.output == "feature"
        student = DistillStudent(net, self.teacher_width if feature else None)
        return DistillerTrainer(student, self.train_data, distiller, seed=seed, epochs=epochs,
                                batch_size=self.batch_size, progress=False,
                                optimizer=lambda p: torch.optim.Adam(p, lr=self.lr))

    def __call__(self, distiller: Optional[Distiller]) -> Evaluation:
        """Screen, train and evaluate ``distiller`` (``None``: plain cross entropy)."""
        if distiller is not None and distiller.output not in OUTPUTS:
            raise ValueError(
                f"distiller.output must be one of {OUTPUTS} (got {distiller.output!r})")
        accuracies, losses = [], []
        for i, seed in enumerate(self.seeds):
            trainer = self.trainer(distiller, seed=seed, epochs=self.epochs)
            rejected = None if distiller is None or i > 0 else trainer.screen(self.max_loss)
            if rejected is not None:
                return rejected
            try:
                trainer.fit()
            except Diverged as e:
                return Evaluation("diverged", reason="non-finite training loss",
                                  metrics={"error": str(e)})
            metrics = trainer.evaluate(self.val)
            accuracies.append(metrics["accuracy"])
            losses.append(metrics["loss"])
        loss = sum(losses) / len(losses)
        return Evaluation("ok", fitness=sum(accuracies) / len(accuracies), tiebreak=-loss,
                          metrics={"val_loss": loss, "val_accuracies": accuracies})
