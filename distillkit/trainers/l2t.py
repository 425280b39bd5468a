"""L2T-DLN: a student trained under a dynamic loss network that an LSTM teacher adjusts (docs/math.md §9.4).

Per iteration (one validation batch), with student weights w₀, DLN weights φ, the
teacher's LSTM state (h, c) and K training batches B_1..B_K:

1. **Hypergradient.** Unroll K differentiable SGD steps under the DLN loss,
   w_k = w_{k−1} − η ∇_w DLN_φ(student(w_{k−1}, x_k), y_k), and take
   d = ∂ CE(student(w_K, x_val), y_val) / ∂φ through the whole unroll (second order:
   every ∇_w is formed with ``create_graph``).
2. **Teacher step.** φ' = φ + s·LSTM(d; h, c) with the coordinate-wise LSTM of docs/math.md §8
   over the P = 5 000 coordinates of φ (input: the preprocessed d, detached; s = −10⁻³);
   φ' keeps its dependence on the teacher's weights.
3. **Teacher training.** Re-run the unroll from the same w₀ and the same batches with
   φ', and take one Adam step on the teacher's weights for CE(student(w'_K, x_val), y_val).
   The student becomes w'_K; φ ← φ' and (h, c) ← the teacher's new state, all detached.

The student's forward passes use ``torch.func.functional_call`` on its module with the
unrolled weights; only its parameters are unrolled (its buffers are used as they are).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate
from tqdm.auto import tqdm

from distillkit.data import BatchCycler
from distillkit.methods.dln import DynamicLossNetwork
from distillkit.methods.learned_optimizer import CoordinateLSTM
from distillkit.trainers.runtime import (Checkpointed, DistributedContext, check_items,
                                         check_like, check_module_state, check_optimizer_state)

__all__ = ["L2TDLNTrainer"]

Batch = Tuple[Tensor, Tensor]


def _tensors(data: Dataset) -> Tuple[Tensor, Tensor]:
    """(inputs, labels) of a dict-item data set, all of it (a ``DictDataset``'s own tensors)."""
    tensors = getattr(data, "tensors", None)
    if tensors is None:
        tensors = default_collate([data[i] for i in range(len(data))])
    return tensors["input"], tensors["label"]


def _check_cycler(name: str, saved: Any, cycler: BatchCycler) -> None:
    """Raise ``ValueError`` unless ``saved`` is a ``(generator state, order)`` pair that
    ``cycler`` can continue from: batches of its size, of rows it has."""
    if not (isinstance(saved, (tuple, list)) and len(saved) == 2
            and isinstance(saved[1], (tuple, list))):
        raise ValueError(f"checkpoint's {name} is not a (generator state, batch order) pair")
    check_like(f"{name} generator state", saved[0], cycler.generator.get_state())
    n = len(cycler.inputs)
    for rows in saved[1]:
        if not (isinstance(rows, Tensor) and rows.dtype == torch.int64
                and rows.shape == (cycler.batch_size,)
                and bool(((rows >= 0) & (rows < n)).all())):
            raise ValueError(f"checkpoint's {name} order holds {_describe_rows(rows)}, not "
                             f"batches of {cycler.batch_size} of this data's {n} rows")


def _describe_rows(rows: Any) -> str:
    return f"a {tuple(rows.shape)} {rows.dtype} batch" if isinstance(rows, Tensor) else repr(rows)


class L2TDLNTrainer(Checkpointed):
    """Trains ``student`` with a learned loss (a :class:`DynamicLossNetwork`) taught by an
    LSTM teacher from validation feedback (L2T-DLN, docs/math.md §9.4; see the module docstring).

    Args:
        student: maps inputs (B, ...) to logits (B, C); its parameters are the w above.
        train_data, val_data: dict-item data sets (``"input"``, ``"label"``), e.g.
            :class:`distillkit.data.DictDataset`; ``val_data`` drives the teacher.
        dln: the learned loss (default ``DynamicLossNetwork()``, drawn from the RNG of
            ``seed``); its weights are φ₀ and are updated in place as φ changes.
        teacher: a :class:`CoordinateLSTM` over φ (default hidden sizes (64, 64, 64, 1), no
            head, ``output_scale`` = −1e-3, p = 10, drawn from the RNG of ``seed``).
        eval_data: evaluated every ``eval_every`` iterations and after the last.
        unroll: K student SGD steps per iteration (15).
        student_lr: η of the student's SGD (0.1). teacher_lr: Adam's on the teacher (1e-3).
        batch_size: training batch (32); val_batch_size: validation batch (64).
        iterations: total iterations (= validation batches) of :meth:`fit`.
        device: where everything lives (CPU or CUDA). The DLN and the teacher are cast to
            the student's dtype (fp64 students give fp64 hypergradients).
        seed: seeds the default DLN and teacher (without touching the global RNG) and
            the batch orders; two trainers built alike produce identical runs.
        progress: show a tqdm bar.

    One process: the trainer does not use ``torch.distributed``. Checkpoints follow
    :class:`~distillkit.trainers.runtime.Checkpointed` (:meth:`save_checkpoint`,
    all-or-nothing :meth:`resume`), progress counted in iterations.

    Attributes:
        phi (P,), h, c (P, ΣH): the DLN weights and the teacher's state, detached.
        history: one dict per iteration: ``iteration`` (1-based); ``dln_loss``,
            ``train_loss`` (cross entropy) and ``train_accuracy``, means over the K steps
            of the kept (second) unroll, before each step; ``val_loss`` (the teacher's
            objective, cross entropy) and ``val_accuracy`` of the new student on the
            iteration's validation batch; ``eval_loss`` and ``eval_accuracy`` on
            iterations that evaluate ``eval_data``.
        iteration: completed iterations.
    """

    progress_key = "iteration"

    def __init__(self, student: nn.Module, train_data: Dataset, val_data: Dataset, *,
                 dln: Optional[DynamicLossNetwork] = None,
                 teacher: Optional[CoordinateLSTM] = None,
                 eval_data: Optional[Dataset] = None, unroll: int = 15,
                 student_lr: float = 0.1, teacher_lr: float = 1e-3, batch_size: int = 32,
                 val_batch_size: int = 64, iterations: int = 100,
                 eval_every: Optional[int] = None, device: Union[str, torch.device] = "cpu",
                 seed: int = 0, progress: bool = True):
        if unroll < 1 or iterations < 1:
            raise ValueError(f"unroll and iterations must be >= 1 (got {unroll} and {iterations})")
        if eval_every is not None and eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 or None (got {eval_every})")
        for name, data in (("train_data", train_data), ("val_data", val_data),
                           ("eval_data", eval_data)):
            if data is not None:
                check_items(name, data, ("input", "label"))
        self.distributed = DistributedContext(0, 1, torch.device(device))
        self.student = student.to(self.device)
        dtype = next(student.parameters()).dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dln = dln if dln is not None else DynamicLossNetwork()
            teacher = teacher if teacher is not None else CoordinateLSTM(
                (64, 64, 64, 1), head=False, preprocess_p=10.0, output_scale=-1e-3)
        self.dln = dln.to(self.device, dtype)
        self.teacher = teacher.to(self.device, dtype)
        self.teacher_optimizer = torch.optim.Adam(self.teacher.parameters(), lr=teacher_lr)
        self.phi = self.dln.flat_weights()
        self.h, self.c = self.teacher.init_state(self.phi.numel())
        self.unroll, self.student_lr = unroll, student_lr
        self.iterations, self.eval_every = iterations, eval_every
        self.eval_data, self.seed, self.progress = eval_data, seed, progress
        self.batch_size = batch_size
        to = dict(device=self.device)
        x, y = _tensors(train_data)
        self.train_batches = BatchCycler(x.to(**to, dtype=dtype), y.to(**to), batch_size, seed)
        x, y = _tensors(val_data)
        self.val_batches = BatchCycler(x.to(**to, dtype=dtype), y.to(**to), val_batch_size,
                                       seed + 1)
        self.history: List[Dict[str, float]] = []
        self.iteration = 0

    # ---- the pieces of one iteration -------------------------------------------------

    def student_weights(self) -> Dict[str, Tensor]:
        """The student's current parameters, detached: the w₀ of the next iteration."""
        return {n: p.detach() for n, p in self.student.named_parameters()}

    def unrolled_validation_loss(self, phi: Tensor, start: Dict[str, Tensor],
                                 batches: Sequence[Batch], val_batch: Batch
                                 ) -> Tuple[Tensor, Dict[str, Tensor], Dict[str, float]]:
        """CE on ``val_batch`` after len(batches) SGD steps under the DLN with weights ``phi``.

        Differentiable in ``phi`` (the whole unroll is kept, second order). Returns the
        validation cross entropy, the final student weights (still in the graph) and the
        unroll's statistics (``dln_loss``, ``train_loss``, ``train_accuracy``,
        ``val_accuracy``).
        """
        w = {n: t.detach().requires_grad_(True) for n, t in start.items()}
        dln_sum = ce_sum = correct = rows = 0.0
        for x, y in batches:
            logits = functional_call(self.student, w, (x,))
            loss = self.dln.functional_loss(phi, logits, y)
            grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
            w = {n: t - self.student_lr * g for (n, t), g in zip(w.items(), grads)}
            dln_sum += float(loss.detach())
            ce_sum += float(F.cross_entropy(logits.detach(), y)) * len(y)
            correct += float((logits.detach().argmax(1) == y).sum())
            rows += len(y)
        x_val, y_val = val_batch
        val_logits = functional_call(self.student, w, (x_val,))
        val_loss = F.cross_entropy(val_logits, y_val)
        stats = {"dln_loss": dln_sum / len(batches), "train_loss": ce_sum / rows,
                 "train_accuracy": correct / rows,
                 "val_accuracy": float((val_logits.detach().argmax(1) == y_val).float().mean())}
        return val_loss, w, stats

    def hypergradient(self, phi: Tensor, start: Dict[str, Tensor], batches: Sequence[Batch],
                      val_batch: Batch) -> Tensor:
        """d CE_val / dφ (P,) through the unroll of :meth:`unrolled_validation_loss`, detached."""
        leaf = phi.detach().requires_grad_(True)
        with torch.enable_grad():
            val_loss, _, _ = self.unrolled_validation_loss(leaf, start, batches, val_batch)
            (grad,) = torch.autograd.grad(val_loss, leaf)
        return grad

    def train_iteration(self) -> Dict[str, float]:
        """One L2T-DLN iteration (the three stages); returns and records its metrics."""
        batches = [next(self.train_batches) for _ in range(self.unroll)]
        val_batch = next(self.val_batches)
        start = self.student_weights()
        # (1) the hypergradient under the current φ
        grad_phi = self.hypergradient(self.phi, start, batches, val_batch)
        with torch.enable_grad():
            # (2) the teacher's step: φ' depends on the teacher's weights
            phi, h, c = self.teacher.step(grad_phi, self.phi, self.h, self.c)
            # (3) the unroll again under φ', and one Adam step of the teacher
            val_loss, w, stats = self.unrolled_validation_loss(phi, start, batches, val_batch)
            weights = list(self.teacher.parameters())
            grads = torch.autograd.grad(val_loss, weights, allow_unused=True)
        for p, g in zip(weights, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        self.teacher_optimizer.step()
        self.phi, self.h, self.c = phi.detach(), h.detach(), c.detach()
        self.dln.load_flat_weights(self.phi)
        with torch.no_grad():
            for p, new in zip(self.student.parameters(), w.values()):
                p.copy_(new)
        self.iteration += 1
        record = {"iteration": self.iteration, **stats, "val_loss": float(val_loss.detach())}
        self.history.append(record)
        return record

    # ---- the loop ----------------------------------------------------------------------

    def fit(self, stop_iteration: Optional[int] = None,
            checkpoint_path: Optional[str] = None) -> List[Dict[str, float]]:
        """Run the iterations from :attr:`iteration` to ``stop_iteration`` (default
        ``iterations``); return :attr:`history`. With ``checkpoint_path``, a checkpoint is
        written after every iteration."""
        stop = self.stop_at(stop_iteration)
        self.check_checkpoint_path(checkpoint_path)
        with tqdm(total=stop - self.iteration, disable=not self.progress,
                  unit="it", leave=False, dynamic_ncols=True, desc="L2T-DLN") as bar:
            while self.iteration < stop:
                record = self.train_iteration()
                last = self.iteration == self.iterations
                if self.eval_data is not None and (last or (
                        self.eval_every is not None and self.iteration % self.eval_every == 0)):
                    record.update({f"eval_{k}": v for k, v in self.evaluate(self.eval_data).items()})
                bar.update()
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                                 if k in ("val_loss", "val_accuracy", "eval_accuracy")})
                if checkpoint_path is not None:
                    self.save_checkpoint(checkpoint_path)
        return self.history

    @torch.no_grad()
    def evaluate(self, data: Dataset) -> Dict[str, float]:
        """Mean cross entropy and accuracy of the current student on labelled ``data``."""
        x, y = _tensors(data)
        dtype = next(self.student.parameters()).dtype
        logits = self.student(x.to(self.device, dtype))
        y = y.to(self.device)
        return {"loss": float(F.cross_entropy(logits, y)),
                "accuracy": float((logits.argmax(1) == y).float().mean())}

    # ---- checkpoints (the protocol is Checkpointed's) ---------------------------

    def state_dict(self) -> Dict[str, Any]:
        """:meth:`Checkpointed.state_dict`, the student, φ, the teacher (weights, Adam
        state, LSTM state) and the batch generators."""
        return {**super().state_dict(),
                "student": self.student.state_dict(), "phi": self.phi, "h": self.h, "c": self.c,
                "teacher": self.teacher.state_dict(),
                "teacher_optimizer": self.teacher_optimizer.state_dict(),
                "train_batches": (self.train_batches.generator.get_state(),
                                  self.train_batches.order),
                "val_batches": (self.val_batches.generator.get_state(), self.val_batches.order)}

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        super().check_state_dict(state)
        check_module_state("student", self.student, state["student"])
        check_module_state("teacher", self.teacher, state["teacher"])
        check_optimizer_state("teacher_optimizer", self.teacher_optimizer,
                              state["teacher_optimizer"])
        for key in ("phi", "h", "c"):
            check_like(key, state[key], getattr(self, key))
        _check_cycler("train_batches", state["train_batches"], self.train_batches)
        _check_cycler("val_batches", state["val_batches"], self.val_batches)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the next :meth:`fit` continues the run exactly."""
        super().load_state_dict(state)
        self.student.load_state_dict(state["student"])
        self.phi, self.h, self.c = (state[k].to(self.device) for k in ("phi", "h", "c"))
        self.dln.load_flat_weights(self.phi)
        self.teacher.load_state_dict(state["teacher"])
        self.teacher_optimizer.load_state_dict(state["teacher_optimizer"])
        for cycler, (generator, order) in ((self.train_batches, state["train_batches"]),
                                           (self.val_batches, state["val_batches"])):
            cycler.generator.set_state(generator)
            cycler.order = list(order)
