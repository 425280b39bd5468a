"""A knowledge-distillation training loop on :func:`distillkit.functional.kd_loss`.

:class:`KDTrainer` owns the loop (shuffling, optimisation, evaluation, metrics,
checkpoints, DDP); the loss of one batch is :meth:`KDTrainer.compute_loss`,
which later trainers (SLaM, weighted distillation) override. Batches are dicts
of tensors (see :class:`distillkit.data.DictDataset`), so a data set can carry
extra per-example tensors such as teacher probabilities or importance weights.
"""
from __future__ import annotations

import os
import random
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from distillkit.functional import kd_loss

__all__ = ["KDConfig", "KDTrainer"]

Batch = Dict[str, Tensor]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

# Bumped when the checkpoint layout changes, so an old file fails loudly.
_CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class KDConfig:
    """Soft-label loss settings, passed unchanged to :func:`distillkit.functional.kd_loss`.

    ``temperature`` T > 0 softens both distributions; ``divergence`` is
    ``"forward_kl"`` KL(teacher‖student), ``"reverse_kl"`` or ``"jsd"`` with mixture
    weight ``beta`` (β = 0 and β = 1 are forward and reverse KL); the loss is
    ``(1 − hard_weight)·T²·soft + hard_weight·CE(labels)``, with the T² factor
    dropped when ``scale_by_t2=False``. Invalid values raise ``ValueError`` at
    construction, with kd_loss's own messages.
    """

    temperature: float = 1.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    hard_weight: float = 0.0
    scale_by_t2: bool = True

    def __post_init__(self):
        # One call on a 1×2 dummy validates with kd_loss's own rules and messages,
        # before any (possibly long) teacher or student work starts.
        dummy = torch.zeros(1, 2)
        kd_loss(dummy, dummy, labels=torch.zeros(1, dtype=torch.int64), **asdict(self))


def _dist_rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1



def _place_models(trainer, student: nn.Module, teacher: Optional[nn.Module],
                  loss: Optional[KDConfig]) -> None:
    """Sets ``student`` (on the trainer's device), ``teacher`` (frozen, eval mode),
    ``loss_config`` (None without a teacher: plain cross entropy) and ``model`` (the
    student, wrapped in DDP when the process group has several ranks)."""
    trainer.student = student.to(trainer.device)
    trainer.teacher = teacher
    if teacher is not None:
        teacher.to(trainer.device).eval().requires_grad_(False)
    trainer.loss_config = None if teacher is None else (loss or KDConfig())
    trainer.model = (DistributedDataParallel(trainer.student) if trainer.world_size > 1
                     else trainer.student)

def _rng_state(device: torch.device) -> Dict[str, Any]:
    """This process's RNG states, in types that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    # An accelerator has its own generator (dropout on CUDA draws from it); the
    # CPU's is torch's global one, and its device module has no get_rng_state.
    module = torch.get_device_module(device)
    if hasattr(module, "get_rng_state"):
        state["device"] = module.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"], key=np.asarray(np_state["state"]["key"], np.uint32))
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "device" in state:
        torch.get_device_module(device).set_rng_state(state["device"], device)


def _build_optimizer(optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """``optimizer`` as given, or built by a factory over ``model.parameters()`` (default Adam(1e-3))."""
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model.parameters())
    given = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if given != {id(p) for p in model.parameters()}:
        raise ValueError("optimizer must be built over exactly student.parameters()")
    return optimizer


def _save_atomically(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` so that a process killed at any instant leaves either the old
    file or the new one, never a torn one: write a temporary file in the same directory (same
    filesystem, so the rename is atomic), flush and fsync it, then ``os.replace`` it."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _save_with_rng(state: Dict[str, Any], path: str, rank: int, world_size: int,
                   device: torch.device) -> None:
    """Rank 0 writes ``state`` plus every rank's RNG states (gathered) to ``path``."""
    rng = [_rng_state(device)]
    if world_size > 1:
        rng = [None] * world_size
        dist.all_gather_object(rng, _rng_state(device))
    if rank == 0:
        _save_atomically({**state, "rng": rng}, path)
    if world_size > 1:
        # Nobody reads the file before it is complete.
        dist.barrier()


def _load_with_rng(path: str, world_size: int) -> Dict[str, Any]:
    """A :func:`_save_with_rng` file, checked to come from a run with ``world_size`` processes."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if len(state["rng"]) != world_size:
        raise ValueError(
            f"checkpoint was written by {len(state['rng'])} processes; "
            f"this run has {world_size}"
        )
    return state


class KDTrainer:
    """Trains ``student`` on ``train_data``, distilling from a frozen ``teacher``.

    Args:
        student: the model to train; maps ``batch["input"]`` (B, ...) to logits (B, C).
        train_data: a map-style data set whose items are dicts with ``"input"``,
            ``"label"`` (int64 class, or ``-100`` = ignored; optional when
            ``hard_weight = 0``) and any extra per-example tensors, e.g. a
            :class:`distillkit.data.DictDataset`. A ``"weight"`` tensor is passed to
            kd_loss as per-example weights (weighted distillation, SPEC §3).
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
        if len(train_data) == 0:
            raise ValueError("train_data must not be empty")
        if teacher is None and loss is not None:
            raise ValueError(
                "loss (a KDConfig) needs a teacher; with teacher=None the loss is cross entropy"
            )
        self.device = torch.device(device)
        self.rank, self.world_size = _dist_rank_world()
        _place_models(self, student, teacher, loss)
        self.train_data = train_data
        self.eval_data = eval_data
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.optimizer = self._make_optimizer(optimizer)
        self.sampler = DistributedSampler(
            train_data, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed
        )
        # The loader draws a base seed per epoch (for worker processes) from this
        # generator; without one it would draw from torch's global RNG.
        self.loader_generator = torch.Generator().manual_seed(seed)
        self.loader = DataLoader(
            train_data, batch_size=batch_size, sampler=self.sampler, generator=self.loader_generator
        )
        self.history: List[Dict[str, float]] = []
        self.epoch = 0

    def _make_optimizer(self, optimizer) -> torch.optim.Optimizer:
        return _build_optimizer(optimizer, self.student)

    # ---- the per-batch loss: what subclasses override ------------------------

    def teacher_logits(self, batch: Batch) -> Tensor:
        """Teacher logits (B, C) for ``batch["input"]``, without autograd."""
        with torch.no_grad():
            return self.teacher(batch["input"])

    def compute_loss(self, batch: Batch) -> Tensor:
        """Scalar training loss of one batch (tensors already on :attr:`device`).

        Subclasses override this for other objectives; the student's forward pass
        goes through :attr:`model` (the DDP wrapper when distributed). With a
        teacher: ``kd_loss(student, teacher, labels=batch.get("label"),
        weight=batch.get("weight"), **loss_config)``, ``mean`` over non-ignored
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
            **asdict(self.loss_config),
        )

    # ---- the loop -----------------------------------------------------------

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _sum_over_ranks(self, totals: Tensor) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        return totals

    def fit(
        self, stop_epoch: Optional[int] = None, checkpoint_path: Optional[str] = None
    ) -> List[Dict[str, float]]:
        """Train from :attr:`epoch` to ``stop_epoch`` (default ``epochs``); return :attr:`history`.

        ``stop_epoch < epochs`` pauses the run (e.g. to checkpoint and resume later);
        with ``checkpoint_path``, a checkpoint is written after every epoch.
        """
        stop = self.epochs if stop_epoch is None else stop_epoch
        if not self.epoch <= stop <= self.epochs:
            raise ValueError(
                f"stop_epoch must be in [{self.epoch}, {self.epochs}] (got {stop_epoch})"
            )
        bar = tqdm(
            total=(stop - self.epoch) * len(self.loader),
            disable=not self.progress or self.rank != 0,
            unit="step",
            leave=False,  # the history keeps the numbers; finished bars are clutter
            dynamic_ncols=True,
        )
        with bar:
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
        loss_sum, rows = self._sum_over_ranks(totals).tolist()
        return loss_sum / rows

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> Dict[str, float]:
        """Mean cross entropy and accuracy of the student on labelled ``data``.

        Under DDP, call it on every rank: rank r evaluates examples r, r + R, …
        (no padding, so every example counts once) and the sums are all-reduced,
        so every rank returns the metrics of the whole data set.
        """
        self.student.eval()
        shard = Subset(data, range(self.rank, len(data), self.world_size))
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
        loss_sum, correct, rows = self._sum_over_ranks(totals).tolist()
        return {"loss": loss_sum / rows, "accuracy": correct / rows}

    # ---- checkpoints --------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs, this rank's RNG states excepted.

        Subclasses with more state extend this and :meth:`load_state_dict`.
        """
        return {
            "version": _CHECKPOINT_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "history": self.history,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loader_generator": self.loader_generator.get_state(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("version") != _CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint version {state.get('version')} is not {_CHECKPOINT_VERSION}"
            )
        if state["epoch"] > self.epochs:
            raise ValueError(f"checkpoint is at epoch {state['epoch']}, past epochs={self.epochs}")
        self.epoch = state["epoch"]
        self.seed = state["seed"]
        self.sampler.seed = state["seed"]
        self.history = list(state["history"])
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader_generator.set_state(state["loader_generator"])

    def save_checkpoint(self, path: str) -> None:
        """Write the run's state to ``path`` so that :meth:`resume` continues it exactly.

        Holds student, optimizer, epoch, history, seed, the loader's generator and
        the python / numpy / torch (and accelerator) RNG states of every rank, as
        they are between epochs (where :meth:`fit` calls it).
        Under DDP call it on every rank (the RNG states are gathered); rank 0 writes.
        """
        _save_with_rng(self.state_dict(), path, self.rank, self.world_size, self.device)

    def resume(self, path: str) -> None:
        """Load a :meth:`save_checkpoint` file; the next :meth:`fit` continues the run.

        Needs the same world size as the run that wrote it (each rank restores
        its own RNG states). Under DDP every rank reads ``path``.
        """
        state = _load_with_rng(path, self.world_size)
        self.load_state_dict(state)
        _set_rng_state(state["rng"][self.rank], self.device)
