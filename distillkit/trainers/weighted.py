r"""Weighted distillation with unlabeled examples: importance weights from ESTIMATEWEIGHTS (docs/math.md §9.2)."""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from distillkit.data import WithTensors
from distillkit.losses.functional import kd_loss
from distillkit.trainers.kd import Batch, KDTrainer
from distillkit.trainers.pool import label_with_teacher, predict_logits
from distillkit.trainers.runtime import check_like, check_module_state, check_optimizer_state
from distillkit.methods.weighting import DISTORTIONS, RULES, estimate_weights
from distillkit.ops.options import check_choice

__all__ = ["WeightedDistillationTrainer", "NORMALIZATIONS"]

NORMALIZATIONS = ("sum", "batch")


class WeightedDistillationTrainer(KDTrainer):
    r"""Distils a teacher into ``student`` on an unlabeled pool, down-weighting likely-wrong labels.

    The teacher labels the pool once (logits u, T = 1). Per batch B the loss is

    .. math::
        \frac1Z \sum_{x \in B} w(x)\, \mathrm{KL}\bigl(\mathrm{softmax}(u(x)) \,\|\, \mathrm{softmax}(z(x))\bigr),
        \qquad Z = \sum_{x \in B} w(x) \ (\texttt{normalize="sum"}, \text{default})
        \ \text{or}\ Z = |B| \ (\texttt{"batch"}),

    i.e. ``kd_loss(z, u, divergence="forward_kl", temperature=1, weight=w, normalizer=Z)``.
    ``"sum"`` (our default) makes the loss a weighted *mean*, so the effective step
    does not shrink with the mean weight: with mean weights of 0.1–0.5, ``"batch"``
    trains the weighted student with a 2–10× smaller step than the unweighted one. The
    paper's objective is the weighted sum over the pool, which fixes neither choice of
    per-batch scale; ``"batch"`` is the plain mean the op computes. A batch whose
    weights are all 0 contributes loss 0 under either. Under DDP each rank
    normalizes by its own shard's Σw.

    whose student gradient is that of :math:`\sum_x w(x)\,\mathrm{CE}(t(x), f(x))`
    (the two differ by the teacher's entropy, a constant). The weights come from
    :func:`distillkit.methods.weighting.estimate_weights`, which looks at the current
    student's confidence, so they are estimated on a schedule over the epochs
    0, 1, …, ``epochs − 1``:

    * epochs [0, ``first_epochs``): w ≡ 1, i.e. vanilla distillation (the first student);
    * at the start of epoch ``first_epochs``: weights from the first student; with
      ``retrain=True`` (default) the student's parameters and the optimizer state
      are then reset to their values at construction, so the remaining
      ``epochs − first_epochs`` epochs train a new student from the same
      initialization with the weights (the paper's protocol);
    * with ``refresh_every=E``: weights are re-estimated from the current student
      at the start of epochs ``first_epochs + E``, ``first_epochs + 2E``, … (no reset).

    E.g. ``epochs=2m, first_epochs=m`` trains an m-epoch first student and an
    m-epoch weighted one; ``first_epochs=E, refresh_every=E, retrain=False`` is one
    continuous run whose weights are refreshed every E epochs.

    Args:
        student, train_data, teacher: as for :class:`distillkit.trainers.SLaMTrainer`
            (``train_data`` is the pool; its ``"label"`` and ``"weight"``, if any,
            are not used).
        val_data: V, a non-empty data set of dicts with ``"input"`` and ``"label"``.
        epochs: total epochs of the run, first student included.
        first_epochs: unweighted epochs before the first estimate, in [1, epochs);
            default ``refresh_every`` if given, else ``epochs // 2``.
        refresh_every: re-estimate every this many epochs after the first estimate.
        retrain: reset the student and optimizer at the first estimate.
        rule, distortion, k_nn: passed to
            :func:`~distillkit.methods.weighting.estimate_weights`.
        normalize: ``"sum"`` (default) or ``"batch"``, the per-batch denominator Z above.
        device: where the models run.
        **kwargs: :class:`KDTrainer`'s ``eval_data``, ``optimizer``, ``batch_size``,
            ``seed``, ``progress``.

    Weights are estimated on every DDP rank from the whole pool and V (the
    replicas are identical, so the weights are too). Checkpoints also hold the
    weights and the initial student and optimizer state, so a resumed run
    estimates and resets exactly as an uninterrupted one.

    Attributes:
        weights: (N,) float32 current weight of every pool row (CPU; updated in place).
        teacher_logits_pool: (N, C) float32 teacher logits of the pool (CPU).
    """

    def __init__(
        self,
        student: nn.Module,
        train_data: Dataset,
        *,
        teacher: nn.Module,
        val_data: Dataset,
        epochs: int = 10,
        first_epochs: Optional[int] = None,
        refresh_every: Optional[int] = None,
        retrain: bool = True,
        rule: str = "distortion",
        distortion: str = "ignore",
        normalize: str = "sum",
        k_nn: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        **kwargs,
    ):
        if refresh_every is not None and refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1 (got {refresh_every})")
        if first_epochs is None:
            first_epochs = refresh_every if refresh_every is not None else epochs // 2
        if not 1 <= first_epochs < epochs:
            raise ValueError(f"first_epochs must be in [1, epochs={epochs}) (got {first_epochs})")
        check_choice("rule", rule, RULES)
        check_choice("distortion", distortion, DISTORTIONS)
        check_choice("normalize", normalize, NORMALIZATIONS)
        if "loss" in kwargs:
            raise ValueError("loss (a KDConfig) does not apply: the loss is forward KL at T = 1")
        device = torch.device(device)
        self.teacher_logits_pool, val_logits, self.val_labels = label_with_teacher(
            teacher, train_data, val_data, device)
        self.val_data = val_data
        self.val_teacher_probs = torch.softmax(val_logits, dim=1)
        self.first_epochs = first_epochs
        self.refresh_every = refresh_every
        self.retrain = retrain
        self.rule = rule
        self.distortion = distortion
        self.normalize = normalize
        self.k_nn = k_nn
        self.weights = torch.ones(len(train_data))
        pool = WithTensors(train_data, teacher_logits=self.teacher_logits_pool,
                           weight=self.weights)
        super().__init__(student, pool, epochs=epochs, device=device, **kwargs)
        self.initial_state = ({"student": copy.deepcopy(self.student.state_dict()),
                               "optimizer": copy.deepcopy(self.optimizer.state_dict())}
                              if retrain else None)

    def train_keys(self) -> Tuple[str, ...]:
        return ("input",)  # the rest comes with the teacher's labels of the pool

    def compute_loss(self, batch: Batch) -> Tensor:
        """Σ w(x)·KL(teacher‖student) at T = 1 over the batch, divided by Σw or by B."""
        weight = batch["weight"]
        # Σw = 0 (every row weighted 0) gives 0 / tiny = 0 rather than 0 / 0.
        normalizer = (weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)
                      if self.normalize == "sum" else None)
        return kd_loss(self.model(batch["input"]), batch["teacher_logits"], weight=weight,
                       normalizer=normalizer)

    def is_estimate_epoch(self, epoch: int) -> bool:
        """Whether weights are (re-)estimated at the start of 0-based ``epoch``."""
        after = epoch - self.first_epochs
        return after == 0 or (self.refresh_every is not None and after > 0
                              and after % self.refresh_every == 0)

    def on_epoch_start(self) -> None:
        if not self.is_estimate_epoch(self.epoch):
            return
        self.refresh_weights()
        if self.retrain and self.epoch == self.first_epochs:
            self.student.load_state_dict(self.initial_state["student"])
            self.optimizer.load_state_dict(self.initial_state["optimizer"])

    def refresh_weights(self) -> Tensor:
        """Re-estimate :attr:`weights` from the current student (in place); return them."""
        student_pool = torch.softmax(predict_logits(self.student, self.train_data, self.device), 1)
        student_val = torch.softmax(predict_logits(self.student, self.val_data, self.device), 1)
        self.weights.copy_(estimate_weights(
            torch.softmax(self.teacher_logits_pool, 1), student_pool, self.val_teacher_probs,
            student_val, self.val_labels, rule=self.rule, distortion=self.distortion,
            k_nn=self.k_nn))
        return self.weights

    def state_dict(self) -> Dict[str, Any]:
        return {**super().state_dict(), "weights": self.weights.clone(),
                "initial_state": self.initial_state}

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        super().check_state_dict(state)
        check_like("weights", state["weights"], self.weights)
        initial = state["initial_state"]
        if (initial is None) != (self.initial_state is None):
            raise ValueError(f"checkpoint {'has no' if initial is None else 'has an'} initial "
                             f"state, this run (retrain={self.retrain}) "
                             f"{'needs' if self.retrain else 'has none'}")
        if initial is not None:
            if not isinstance(initial, dict) or set(initial) != {"student", "optimizer"}:
                raise ValueError("checkpoint's initial_state is not a student and an optimizer state")
            check_module_state("initial student", self.student, initial["student"])
            check_optimizer_state("initial optimizer", self.optimizer, initial["optimizer"])

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.weights.copy_(state["weights"])
        self.initial_state = state["initial_state"]
