"""What the training loops share: distributed context, RNG and checkpoint state, optimizers.

:class:`BaseTrainer` is the runtime :class:`~distillkit.trainers.KDTrainer` (and the
trainers built on it) and :class:`~distillkit.trainers.LMDistillationTrainer` run on:
it places the models, builds the optimizer and owns the checkpoint protocol
(:meth:`~BaseTrainer.state_dict`, :meth:`~BaseTrainer.save_checkpoint`,
:meth:`~BaseTrainer.resume`); the loops count progress in different units (epochs,
optimizer steps) but checkpoint it the same way. Communication is plain
:mod:`torch.distributed`, through :class:`DistributedContext`.
"""
from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = ["BaseTrainer", "DistributedContext", "OptimizerFactory", "build_optimizer",
           "rng_state", "save_atomically", "set_rng_state"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class DistributedContext:
    """This process's ``rank`` among ``world_size`` processes of the default
    ``torch.distributed`` group (0 of 1 without one), and the ``device`` its tensors live on.

    The reductions are collectives: under DDP every rank must call them, in the same order.
    """

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def current(cls, device: Union[str, torch.device]) -> "DistributedContext":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), torch.device(device))
        return cls(0, 1, torch.device(device))

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` when there are several ranks, else itself."""
        return DistributedDataParallel(model) if self.world_size > 1 else model

    def shard(self, n: int) -> range:
        """This rank's indices r, r + R, … of 0..n − 1: each index on one rank, no padding."""
        return range(self.rank, n, self.world_size)

    def sum(self, values: Union[Tensor, Sequence[float]]) -> List[float]:
        """``values`` summed elementwise over ranks, in float64 on :attr:`device`."""
        return self._all_reduce(values, dist.ReduceOp.SUM).tolist()

    def max(self, value: float) -> float:
        """The largest ``value`` of any rank."""
        return self._all_reduce(value, dist.ReduceOp.MAX).item()

    def _all_reduce(self, values, op) -> Tensor:
        totals = torch.as_tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(totals, op=op)
        return totals

    def gather_object(self, obj: Any) -> List[Any]:
        """Every rank's (picklable) ``obj``, in rank order."""
        if self.world_size == 1:
            return [obj]
        objects = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def rng_state(device: torch.device) -> Dict[str, Any]:
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


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    """Restore an :func:`rng_state`."""
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"], key=np.asarray(np_state["state"]["key"], np.uint32))
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if "device" in state:
        torch.get_device_module(device).set_rng_state(state["device"], device)


def build_optimizer(optimizer: Union[torch.optim.Optimizer, OptimizerFactory, None],
                    model: nn.Module) -> torch.optim.Optimizer:
    """``optimizer`` as given, or built by a factory over ``model.parameters()`` (default Adam(1e-3))."""
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    elif not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer(model.parameters())
    given = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if given != {id(p) for p in model.parameters()}:
        raise ValueError("optimizer must be built over exactly student.parameters()")
    return optimizer


def save_atomically(obj: Any, path: str) -> None:
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


class BaseTrainer:
    """The state and checkpoints of a loop that trains ``student``, optionally distilling
    from a frozen ``teacher``; subclasses write the loop.

    Sets :attr:`distributed` (a :class:`DistributedContext`; :attr:`device`, :attr:`rank`
    and :attr:`world_size` read it), :attr:`student` (moved to the device),
    :attr:`teacher` (frozen, eval mode), :attr:`loss_config` (see
    :func:`~distillkit.trainers.kd.loss_config_for`), :attr:`model` (the student, wrapped in
    DDP when the process group has several ranks: forward passes that train go through
    it), :attr:`optimizer` (see :func:`build_optimizer`), :attr:`history` and the other
    arguments as attributes.

    Progress is counted in units named by :attr:`progress_key` (``"epoch"``,
    ``"step"``): the attribute of that name holds the units completed (0 here), the
    one with an ``s`` appended (``epochs``) the total of the run.
    """

    progress_key: str  # set by each subclass
    # Bumped when the checkpoint layout changes, so an old file fails loudly.
    checkpoint_version = 1

    def __init__(self, student: nn.Module, train_data: Dataset, *,
                 teacher: Optional[nn.Module], eval_data: Optional[Dataset],
                 optimizer: Union[torch.optim.Optimizer, OptimizerFactory, None],
                 loss_config: Optional[Any], batch_size: int,
                 device: Union[str, torch.device], seed: int, progress: bool):
        self.distributed = DistributedContext.current(device)
        self.student = student.to(self.device)
        self.teacher = teacher
        if teacher is not None:
            teacher.to(self.device).eval().requires_grad_(False)
        self.loss_config = loss_config
        self.model = self.distributed.wrap(self.student)
        self.train_data = train_data
        self.eval_data = eval_data
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress
        self.optimizer = build_optimizer(optimizer, self.student)
        self.history: List[Dict[str, float]] = []
        setattr(self, self.progress_key, 0)

    @property
    def device(self) -> torch.device:
        return self.distributed.device

    @property
    def rank(self) -> int:
        return self.distributed.rank

    @property
    def world_size(self) -> int:
        return self.distributed.world_size

    def _progress(self) -> Tuple[int, int]:
        """(units completed, units of the run)."""
        return getattr(self, self.progress_key), getattr(self, self.progress_key + "s")

    def stop_at(self, stop: Optional[int]) -> int:
        """The unit a ``fit(stop_<unit>=stop)`` ends at: ``stop``, checked, or the run's total."""
        done, total = self._progress()
        if stop is None:
            return total
        if not done <= stop <= total:
            raise ValueError(f"stop_{self.progress_key} must be in [{done}, {total}] (got {stop})")
        return stop

    def progress_bar(self, total: int) -> tqdm:
        """A bar of ``total`` steps, shown with ``progress`` on rank 0 only."""
        return tqdm(
            total=total,
            disable=not self.progress or self.rank != 0,
            unit="step",
            leave=False,  # the history keeps the numbers; finished bars are clutter
            dynamic_ncols=True,
        )

    # ---- checkpoints --------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs, this rank's RNG states excepted: the checkpoint
        version, progress, seed, history, student and optimizer.

        Subclasses with more state extend this, :meth:`check_state_dict` and
        :meth:`load_state_dict`.
        """
        return {
            "version": self.checkpoint_version,
            self.progress_key: getattr(self, self.progress_key),
            "seed": self.seed,
            "history": self.history,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` cannot continue this run; nothing is loaded yet."""
        if state.get("version") != self.checkpoint_version:
            raise ValueError(
                f"checkpoint version {state.get('version')} is not {self.checkpoint_version}"
            )
        key, (_, total) = self.progress_key, self._progress()
        if state[key] > total:
            raise ValueError(f"checkpoint is at {key} {state[key]}, past {key}s={total}")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, checked by :meth:`check_state_dict` first."""
        self.check_state_dict(state)
        setattr(self, self.progress_key, state[self.progress_key])
        self.seed = state["seed"]
        self.history = list(state["history"])
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save_checkpoint(self, path: str) -> None:
        """Write the run's state to ``path`` so that :meth:`resume` continues it exactly.

        The file holds :meth:`state_dict` and, under ``"rng"``, every rank's python /
        numpy / torch (and accelerator) RNG states as they are now (between epochs or
        steps, where ``fit`` calls it). Under DDP call it on every rank (the RNG states
        are gathered); rank 0 writes (:func:`save_atomically`), and no rank returns
        before the file is complete.
        """
        state = self.state_dict()
        rng = self.distributed.gather_object(rng_state(self.device))
        if self.rank == 0:
            save_atomically({**state, "rng": rng}, path)
        self.distributed.barrier()

    def resume(self, path: str) -> None:
        """Load a :meth:`save_checkpoint` file; the next ``fit`` continues the run.

        Needs the same world size as the run that wrote it (each rank restores its own
        RNG states), and whatever else :meth:`check_state_dict` checks. Under DDP every
        rank reads ``path``.
        """
        state = torch.load(path, map_location="cpu", weights_only=True)
        if len(state["rng"]) != self.world_size:
            raise ValueError(
                f"checkpoint was written by {len(state['rng'])} processes; "
                f"this run has {self.world_size}"
            )
        self.load_state_dict(state)
        set_rng_state(state["rng"][self.rank], self.device)
