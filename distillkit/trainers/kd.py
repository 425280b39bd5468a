"""A knowledge-distillation training loop on :func:`distillkit.losses.functional.kd_loss`.

:class:`KDTrainer` owns the loop (shuffling, optimisation, evaluation, metrics,
checkpoints, DDP); the loss of one batch is :meth:`KDTrainer.compute_loss`,
which later trainers (SLaM, weighted distillation) override. Batches are dicts
of tensors (see :class:`distillkit.data.DictDataset`), so a data set can carry
extra per-example tensors such as teacher probabilities or importance weights.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from distillkit.losses.functional import kd_loss
from distillkit.ops.options import KDOptions
from distillkit.trainers.runtime import BaseTrainer, OptimizerFactory, check_items, check_like

__all__ = ["KDConfig", "KDTrainer", "loss_config_for"]

Batch = Dict[str, Tensor]


# The trainers' loss settings are kd_loss's own options object (validated when made);
# KDConfig is the name the trainers document.
KDConfig = KDOptions


def loss_config_for(teacher: Optional[nn.Module], loss: Optional[KDConfig]) -> Optional[KDConfig]:
    """The soft-label settings of a run: ``loss`` (default ``KDConfig()``) with a teacher;
    ``None`` without one (plain cross entropy), where ``loss`` must be ``None`` too."""
    if teacher is None:
        if loss is not None:
            raise ValueError(
                "loss (a KDConfig) needs a teacher; with teacher=None the loss is cross entropy"
            )
        return None
    if loss is None:
        return KDConfig()
    if not isinstance(loss, KDConfig):
        raise ValueError(f"loss must be a KDConfig (got {type(loss).__name__})")
    if loss.reduction != "mean":
        raise ValueError(f"loss.reduction must be 'mean' for a trainer (got {loss.reduction!r}): "
                         "the trainers normalize by the token count themselves")
    return loss


class KDTrainer(BaseTrainer):
    """Trains ``student`` on ``train_data``, distilling from a frozen ``teacher``.

    Args:
        student: the model to train; maps ``batch["input"]`` (B, ...) to logits (B, C).
        train_data: a map-style data set whose items are dicts with ``"input"``,
            ``"label"`` (int64 class, or ``-100`` = ignored; optional when
            ``hard_weight = 0``) and any extra per-example tensors, e.g. a
            :class:`distillkit.data.DictDataset`. A ``"weight"`` tensor is passed to
            kd_loss as per-example weights (weighted distillation, docs/math.md §9.2).
        teacher: frozen teacher mapping inputs to logits (B, C); it is put in eval
            mode with ``requires_grad=False``. ``None`` means no distillation: the
            loss is plain cross entropy on the labels.
        eval_data: labelled data set evaluated after every epoch (or ``None``).
        optimizer: an optimizer over ``student.parameters()``, or a factory called
            with them; default Adam(lr=1e-3).
        loss: :class:`KDConfig` for kd_loss (default ``KDConfig()``); must be ``None``
            when ``teacher`` is ``None``.
        epochs: total number of epochs of the run.
        batch_size: examples per step *per process*; under DDP the global batch is
            ``batch_size × world_size``.
        device: where student, teacher and batches live (CPU or CUDA).
        seed: shuffling seed. Epoch ``e`` (0-based) visits the data in the order
            ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``
            (``DistributedSampler``'s rule; under DDP, rank r takes every R-th index
            of that order), so the order depends only on ``(seed, e)``, is the same
            for any world size, and a resumed run replays it exactly.
        progress: show a tqdm bar (rank 0 only).

    Conventions: ``mean`` reductions throughout, so the DDP gradient average equals
    the single-process gradient of the global batch when ranks get equal batches
    (``DistributedSampler`` pads the data to a multiple of the world size by
    repeating examples). Under ``torch.distributed`` (initialized before the
    trainer is built) the student is wrapped in ``DistributedDataParallel``; the
    forward pass of :meth:`compute_loss` must go through :attr:`model`, which is
    that wrapper, so gradients are synchronised. Metrics are summed over ranks.

    Attributes:
        history: one dict per completed epoch: ``epoch`` (1-based), ``train_loss``
            (row-weighted mean of the batch losses), and with ``eval_data``,
            ``eval_loss`` (mean cross entropy) and ``eval_accuracy``.
        epoch: number of completed epochs.
    """

    progress_key = "epoch"

    def __init__(
        self,
        student: nn.Module,
        train_data: Dataset,
        *,
        teacher: Optional[nn.Module] = None,
        eval_data: Optional[Dataset] = None,
        optimizer: Union[torch.optim.Optimizer, OptimizerFactory, None] = None,
        loss: Optional[KDConfig] = None,
        epochs: int = 10,
        batch_size: int = 64,
        device: Union[str, torch.device] = "cpu",
        seed: int = 0,
        progress: bool = True,
    ):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1 (got {epochs})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        loss_config = loss_config_for(teacher, loss)
        self.epochs = epochs
        super().__init__(student, train_data, teacher=teacher, eval_data=eval_data,
                         optimizer=optimizer, loss_config=loss_config, batch_size=batch_size,
                         device=device, seed=seed, progress=progress)
        check_items("train_data", train_data, self.train_keys())
        if eval_data is not None:
            check_items("eval_data", eval_data, ("input", "label"))
        self.sampler = DistributedSampler(
            train_data, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed
        )
        # The loader draws a base seed per epoch (for worker processes) from this
        # generator; without one it would draw from torch's global RNG.
        self.loader_generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(
            train_data, batch_size=batch_size, sampler=self.sampler, generator=self.loader_generator
        )

    # ---- the per-batch loss: what subclasses override ------------------------

    def train_keys(self) -> Tuple[str, ...]:
        """The keys :meth:`compute_loss` reads from every training item: ``"input"``, and
        ``"label"`` for cross entropy (no teacher, or ``hard_weight > 0``)."""
        hard = self.teacher is None or self.loss_config.hard_weight > 0
        return ("input", "label") if hard else ("input",)

    def teacher_logits(self, batch: Batch) -> Tensor:
        """Teacher logits (B, C) for ``batch["input"]``, without autograd."""
        with torch.no_grad():
            return self.teacher(batch["input"])

    def compute_loss(self, batch: Batch) -> Tensor:
        """Scalar training loss of one batch (tensors already on :attr:`device`).

        Subclasses override this for other objectives; the student's forward pass
        goes through :attr:`model` (the DDP wrapper when distributed). With a
        teacher: ``kd_loss(student, teacher, labels=batch.get("label"),
        weight=batch.get("weight"), options=loss_config)``, ``mean`` over non-ignored
        rows. Without: ``F.cross_entropy(student, batch["label"])``.
        """
        logits = self.model(batch["input"])
        if self.teacher is None:
            if "weight" in batch:
                raise ValueError("per-example 'weight' needs a teacher (it weights kd_loss rows)")
            return F.cross_entropy(logits, batch["label"])
        return kd_loss(
            logits,
            self.teacher_logits(batch),
            labels=batch.get("label"),
            weight=batch.get("weight"),
            options=self.loss_config,
        )

    # ---- the loop -----------------------------------------------------------

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def fit(
        self, stop_epoch: Optional[int] = None, checkpoint_path: Optional[str] = None
    ) -> List[Dict[str, float]]:
        """Train from :attr:`epoch` to ``stop_epoch`` (default ``epochs``); return :attr:`history`.

        ``stop_epoch < epochs`` pauses the run (e.g. to checkpoint and resume later);
        with ``checkpoint_path``, a checkpoint is written after every epoch.
        """
        stop = self.stop_at(stop_epoch)
        self.check_checkpoint_path(checkpoint_path)
        with self.progress_bar((stop - self.epoch) * len(self.loader)) as bar:
            while self.epoch < stop:
                bar.set_description(f"epoch {self.epoch + 1}/{self.epochs}")
                self.on_epoch_start()
                record = {"epoch": self.epoch + 1, "train_loss": self._train_epoch(bar)}
                if self.eval_data is not None:
                    metrics = self.evaluate(self.eval_data)
                    record.update({f"eval_{k}": v for k, v in metrics.items()})
                self.history.append(record)
                self.epoch += 1
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "epoch"})
                if checkpoint_path is not None:
                    self.save_checkpoint(checkpoint_path)
        return self.history

    def on_epoch_start(self) -> None:
        """Called by :meth:`fit` before each epoch, with :attr:`epoch` = the epoch's 0-based index.

        A no-op here; subclasses that change per-example data or the model between
        epochs (weighted distillation's weight refreshes) override it. It runs after a
        :meth:`resume` too, so what it does at an epoch must depend only on the
        state a checkpoint holds.
        """

    def _train_epoch(self, bar: tqdm) -> float:
        self.sampler.set_epoch(self.epoch)
        self.model.train()
        # Σ loss·rows stays on the device: no host sync per step.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        rows = 0
        for batch in self.loader:
            batch = self._to_device(batch)
            loss = self.compute_loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach().double() * len(batch["input"])
            rows += len(batch["input"])
            bar.update()
        totals = torch.stack([loss_sum, loss_sum.new_tensor(rows)])
        loss_sum, rows = self.distributed.sum(totals)
        return loss_sum / rows

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> Dict[str, float]:
        """Mean cross entropy and accuracy of the student on labelled ``data``.

        Under DDP, call it on every rank: rank r evaluates examples r, r + R, …
        (no padding, so every example counts once) and the sums are all-reduced,
        so every rank returns the metrics of the whole data set.
        """
        self.student.eval()
        shard = Subset(data, self.distributed.shard(len(data)))
        # No gradients are kept, so batches can be larger than in training; a
        # private generator keeps the loader from drawing on torch's global RNG.
        loader = DataLoader(shard, batch_size=max(self.batch_size, 256),
                            generator=torch.Generator())
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, correct
        rows = 0
        for batch in loader:
            batch = self._to_device(batch)
            logits = self.student(batch["input"])
            labels = batch["label"]
            sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                 (logits.argmax(-1) == labels).sum().double()])
            rows += len(labels)
        totals = torch.cat([sums, sums.new_tensor([rows])])
        loss_sum, correct, rows = self.distributed.sum(totals)
        return {"loss": loss_sum / rows, "accuracy": correct / rows}

    # ---- checkpoints (the protocol is BaseTrainer's) -------------------------

    def state_dict(self) -> Dict[str, Any]:
        """:meth:`BaseTrainer.state_dict` and the loader's generator."""
        return {**super().state_dict(), "loader_generator": self.loader_generator.get_state()}

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        super().check_state_dict(state)
        check_like("loader_generator", state["loader_generator"],
                   self.loader_generator.get_state())

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sampler.seed = state["seed"]
        self.loader_generator.set_state(state["loader_generator"])
