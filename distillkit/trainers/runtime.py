"""What the training loops share: distributed context, RNG and checkpoint state, optimizers.

:class:`Checkpointed` is the one checkpoint protocol (:meth:`~Checkpointed.state_dict`,
:meth:`~Checkpointed.save_checkpoint`, :meth:`~Checkpointed.resume`) of every trainer;
:class:`BaseTrainer` adds what :class:`~distillkit.trainers.KDTrainer` (and the trainers
built on it) and :class:`~distillkit.trainers.LMDistillationTrainer` share: it places the
models and builds the optimizer. :class:`~distillkit.trainers.L2TDLNTrainer` runs on the
protocol alone. The loops count progress in different units (epochs, optimizer steps,
iterations) but checkpoint it the same way. Communication is plain
:mod:`torch.distributed`, through :class:`DistributedContext`.
"""
from __future__ import annotations

import copy
import os
import random
import tempfile
from dataclasses import dataclass
from typing import (IO, Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple,
                    Union)

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = ["BaseTrainer", "Checkpointed", "DistributedContext", "OptimizerFactory",
           "build_optimizer", "check_items", "check_like", "check_module_state",
           "check_optimizer_state", "read_checkpoint", "rng_state", "save_atomically",
           "write_atomically",
           "set_rng_state"]

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
    """``torch.save`` to ``path`` through :func:`write_atomically`."""
    write_atomically(path, lambda f: torch.save(obj, f))


def write_atomically(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a binary file that becomes ``path`` so that a process killed at any
    instant leaves either the old file or the new one, never a torn one: write a temporary
    file in the same directory (same filesystem, so the rename is atomic), flush and fsync
    it, then ``os.replace`` it. A symlinked ``path`` has the file it points to replaced, the
    link kept."""
    path = os.path.realpath(os.fspath(path))
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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


def check_items(name: str, data: Dataset, keys: Tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``data``'s items are dicts holding ``keys`` (its first
    item is looked at: a data set's items share their keys), before any training."""
    if len(data) == 0:
        raise ValueError(f"{name} must not be empty")
    item = data[0]
    if not isinstance(item, Mapping):
        raise ValueError(f"{name} items must be dicts of tensors, e.g. a DictDataset "
                         f"(got {type(item).__name__})")
    missing = [k for k in keys if k not in item]
    if missing:
        raise ValueError(f"{name} items have no {', '.join(map(repr, missing))} "
                         f"(they have {', '.join(map(repr, item))})")


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The dict a :func:`save_atomically` checkpoint at ``path`` holds (tensors on the CPU).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming ``path``
    for one that is not a readable checkpoint (truncated, corrupt, not a dict), instead
    of the loader's bare ``EOFError`` or zip/pickle error.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):  # these name the file
        raise
    except Exception as e:  # EOFError, pickle/zip errors of a truncated or corrupt file
        raise ValueError(f"{path}: not a readable checkpoint, truncated or corrupt "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a trainer checkpoint")
    return state


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{tuple(value.shape)} {value.dtype}"
    return type(value).__name__


def check_like(name: str, saved: Any, current: Tensor) -> None:
    """Raise ``ValueError`` unless the checkpoint's ``name`` is a tensor of ``current``'s
    shape and dtype."""
    if not (isinstance(saved, Tensor) and saved.shape == current.shape
            and saved.dtype == current.dtype):
        raise ValueError(f"checkpoint's {name} is {_describe(saved)}, this run's is "
                         f"{_describe(current)}")


def check_module_state(name: str, module: nn.Module, state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` is a state dict of ``module``'s architecture:
    the same entries, each of the same shape and dtype. Loads nothing."""
    expected = module.state_dict()
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint's {name} is a {type(state).__name__}, not a state dict")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"checkpoint's {name} does not fit this {name} (another architecture?): "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, tensor in expected.items():
        if isinstance(tensor, Tensor):
            check_like(f"{name} {key!r}", state[key], tensor)


def check_optimizer_state(name: str, optimizer: torch.optim.Optimizer, state: Any) -> None:
    """Raise ``ValueError`` unless ``state`` is a state dict of an optimizer like
    ``optimizer``: the same groups of as many parameters, no hyperparameter it does not
    know (the same kind of optimizer), per-parameter tensors shaped like their parameters."""
    if not (isinstance(state, dict) and isinstance(state.get("param_groups"), list)
            and isinstance(state.get("state"), dict)):
        raise ValueError(f"checkpoint's {name} is not an optimizer state dict")
    groups, saved = optimizer.param_groups, state["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(g.get("params", ())) if isinstance(g, dict) else None for g in saved]
    if saved_sizes != sizes:
        raise ValueError(f"checkpoint's {name} has parameter groups of {saved_sizes}, this "
                         f"{name} of {sizes} (another model?)")
    for g, s in zip(groups, saved):
        # A setting this optimizer does not have: another kind of optimizer. (One it has
        # and the file lacks is an older torch's, which load_state_dict defaults.)
        foreign = sorted(set(s) - set(g))
        if foreign:
            raise ValueError(f"checkpoint's {name} has settings {foreign} that this {name} "
                             f"({type(optimizer).__name__}) does not (another optimizer?)")
    params = dict(zip((i for s in saved for i in s["params"]),
                      (p for g in groups for p in g["params"])))
    for i, per_param in state["state"].items():
        if i not in params or not isinstance(per_param, dict):
            raise ValueError(f"checkpoint's {name} has state for parameter {i!r}, which "
                             "none of its groups holds")
        for key, value in per_param.items():
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape != params[i].shape:
                raise ValueError(f"checkpoint's {name} {key!r} of parameter {i} is "
                                 f"{tuple(value.shape)}, the parameter {tuple(params[i].shape)}")


class _Offloaded:
    """A tensor copied to host memory, with the device it came from."""

    def __init__(self, tensor: Tensor):
        self.device = tensor.device
        self.tensor = tensor.detach().to("cpu", copy=True)


def _offload(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor copied to host memory (so a snapshot of a
    trainer does not double its device memory); :func:`_reload` undoes it."""
    if isinstance(obj, Tensor):
        return _Offloaded(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _offload(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_offload(v) for v in obj)
    return copy.deepcopy(obj)


def _reload(obj: Any) -> Any:
    if isinstance(obj, _Offloaded):
        return obj.tensor.to(obj.device)
    if isinstance(obj, dict):
        return type(obj)((k, _reload(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_reload(v) for v in obj)
    return obj


class Checkpointed:
    """The checkpoint protocol of a training loop: what it saves, checks and restores.

    A subclass sets :attr:`progress_key` (the unit its progress is counted in:
    ``"epoch"``, ``"step"``, ``"iteration"``; the attribute of that name holds the
    units completed, the one with an ``s`` appended the total of the run),
    :attr:`distributed` (a :class:`DistributedContext`) and :attr:`history` (a list of
    per-unit records), and extends :meth:`state_dict`, :meth:`check_state_dict` and
    :meth:`load_state_dict` with its own state.

    :meth:`resume` is all or nothing: a checkpoint that cannot continue this run (another
    architecture, another trainer, another version, a truncated or corrupt file) raises
    ``ValueError`` naming the file and what is wrong, and leaves the trainer exactly as it
    was (models, optimizers, schedulers, RNG states, progress, history).
    """

    progress_key: str  # set by each subclass
    distributed: DistributedContext
    history: List[Dict[str, float]]
    # Bumped when the checkpoint layout changes, so an old file fails loudly.
    checkpoint_version = 2

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

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs, this rank's RNG states excepted: here the
        checkpoint version, the trainer's class name, progress and history."""
        return {
            "version": self.checkpoint_version,
            "trainer": type(self).__qualname__,
            self.progress_key: getattr(self, self.progress_key),
            "history": self.history,
        }

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` cannot continue this run; nothing is loaded yet.

        Here: the version, the trainer class, the set of entries (those of this
        trainer's :meth:`state_dict`) and the progress, which must not be past the run's end.
        """
        if state.get("version") != self.checkpoint_version:
            raise ValueError(
                f"checkpoint version {state.get('version')!r} is not {self.checkpoint_version}"
            )
        if state.get("trainer") != type(self).__qualname__:
            raise ValueError(f"checkpoint is of a {state.get('trainer')}, not of a "
                             f"{type(self).__qualname__}")
        # "rng" is the file's, not the state dict's: save_checkpoint adds it.
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected - {"rng"})
        if missing or unexpected:
            raise ValueError(f"checkpoint's entries differ from this trainer's: missing "
                             f"{missing}, unexpected {unexpected}")
        key, (_, total) = self.progress_key, self._progress()
        if not (isinstance(state[key], int) and state[key] >= 0):
            raise ValueError(f"checkpoint's {key} is {state[key]!r}, not a count")
        if state[key] > total:
            raise ValueError(f"checkpoint is at {key} {state[key]}, past {key}s={total}")
        if not isinstance(state["history"], list):
            raise ValueError("checkpoint's history is not a list")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, checked by :meth:`check_state_dict` first.

        A failure after the check may leave part of ``state`` loaded; :meth:`resume`
        undoes that.
        """
        self.check_state_dict(state)
        setattr(self, self.progress_key, state[self.progress_key])
        self.history = list(state["history"])

    @staticmethod
    def check_checkpoint_path(path: Optional[str]) -> None:
        """Raise before any training if a ``fit(checkpoint_path=path)`` could not save
        (its directory missing or not writable, or ``path`` a directory), rather than
        after the first epoch's work."""
        if path is None:
            return
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise ValueError(f"checkpoint_path {path} is a directory")
        if not os.path.isdir(directory):
            raise ValueError(f"checkpoint_path {path}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ValueError(f"checkpoint_path {path}: directory {directory} is not writable")

    def save_checkpoint(self, path: str) -> None:
        """Write the run's state to ``path`` so that :meth:`resume` continues it exactly.

        The file holds :meth:`state_dict` and, under ``"rng"``, every rank's python /
        numpy / torch (and accelerator) RNG states as they are now (between units,
        where ``fit`` calls it). Under DDP call it on every rank (the RNG states are
        gathered); rank 0 writes (:func:`save_atomically`), and no rank returns before
        the file is complete.
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
        rank reads ``path``. All or nothing: on any error the trainer's state, RNG states
        included, is put back as it was (from a snapshot in host memory, as large as a
        checkpoint), and a ``ValueError`` names ``path`` and what is wrong.
        """
        state = read_checkpoint(path)
        try:
            self.check_state_dict(state)
            rng = state["rng"]
            if not isinstance(rng, list) or len(rng) != self.world_size:
                raise ValueError(
                    f"checkpoint was written by {len(rng) if isinstance(rng, list) else '?'} "
                    f"processes; this run has {self.world_size}"
                )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: cannot resume from this checkpoint: {e}") from e
        snapshot = _offload(self.state_dict()), rng_state(self.device)
        try:
            self.load_state_dict(state)
            set_rng_state(rng[self.rank], self.device)
        except BaseException as e:  # a KeyboardInterrupt mid-load is undone too
            self.load_state_dict(_reload(snapshot[0]))
            set_rng_state(snapshot[1], self.device)
            if not isinstance(e, Exception):
                raise
            raise ValueError(f"{path}: cannot resume from this checkpoint; the trainer is "
                             f"unchanged ({type(e).__name__}: {e})") from e


class BaseTrainer(Checkpointed):
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
    ``"step"``; see :class:`Checkpointed`), 0 here.
    """

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

    def progress_bar(self, total: int) -> tqdm:
        """A bar of ``total`` steps, shown with ``progress`` on rank 0 only."""
        return tqdm(
            total=total,
            disable=not self.progress or self.rank != 0,
            unit="step",
            leave=False,  # the history keeps the numbers; finished bars are clutter
            dynamic_ncols=True,
        )

    # ---- checkpoints (the protocol is Checkpointed's) ---------------------------

    def state_dict(self) -> Dict[str, Any]:
        """:meth:`Checkpointed.state_dict`, the seed, the student and the optimizer.

        Subclasses with more state extend this, :meth:`check_state_dict` and
        :meth:`load_state_dict`.
        """
        return {
            **super().state_dict(),
            "seed": self.seed,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """:meth:`Checkpointed.check_state_dict`, and the student's architecture and the
        optimizer's kind and shape (:func:`check_module_state`, :func:`check_optimizer_state`)."""
        super().check_state_dict(state)
        if not isinstance(state["seed"], int):
            raise ValueError(f"checkpoint's seed is {state['seed']!r}, not an int")
        check_module_state("student", self.student, state["student"])
        check_optimizer_state("optimizer", self.optimizer, state["optimizer"])

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, checked by :meth:`check_state_dict` first."""
        super().load_state_dict(state)
        self.seed = state["seed"]
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
