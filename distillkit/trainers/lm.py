"""Causal-LM distillation on :func:`distillkit.fused_linear_kd_loss` (docs/math.md §2).

:class:`LMDistillationTrainer` trains a student language model on token batches,
distilling from a frozen teacher through the fused linear KD loss, so neither
model's (tokens × vocabulary) logits exist at once: at most ``chunk_rows × C`` of
each per chunk. The loop is counted in optimizer steps (LM training rarely thinks
in epochs), each step accumulating gradients over micro-batches with one global
token normalizer.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from distillkit.losses.fused_linear import fused_linear_kd_loss
from distillkit.data.models import PAD
from distillkit.trainers.kd import KDConfig, loss_config_for
from distillkit.trainers.runtime import BaseTrainer, DistributedContext, OptimizerFactory

__all__ = ["LMDistillationTrainer"]

SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

IGNORE_INDEX = -100


def shift_tokens(tokens: Tensor, pad_id: int) -> Tuple[Tensor, Tensor]:
    """Model inputs ``tokens[:, :-1]`` and next-token labels ``tokens[:, 1:]``, −100 on padding."""
    labels = tokens[:, 1:]
    return tokens[:, :-1], labels.masked_fill(labels == pad_id, IGNORE_INDEX)


class LMDistillationTrainer(BaseTrainer):
    """Trains a causal ``student`` LM on token sequences, distilling from a frozen ``teacher``.

    Model protocol (student and teacher; :class:`distillkit.data.models.ByteTransformer`
    follows it): ``model(tokens)`` maps int64 tokens (B, S) to final hidden states
    (B, S, H) — causal, position s seeing tokens 0..s only — and ``model.lm_head`` is
    an ``nn.Linear(H, C)`` (bias optional) that the forward pass does **not** apply;
    the trainer fuses it into the loss. Student and teacher share the vocabulary C
    (H may differ).

    Objective, per optimizer step: the rows are the positions of the step's
    sequences, predicting token s + 1 from tokens 0..s (the causal shift is done
    here: inputs ``tokens[:, :-1]``, labels ``tokens[:, 1:]``, ``-100`` where the
    label is ``pad_id``). With a teacher, the loss is
    ``fused_linear_kd_loss(h_student, W_student, teacher_hidden=h_teacher,
    teacher_weight=W_teacher, labels=..., options=loss)`` — the soft term is
    ``(1 − hard_weight)·T²·divergence`` and the hard term next-token cross entropy,
    see :class:`distillkit.trainers.KDConfig`. Without one it is plain next-token
    cross entropy. Either way the per-token losses are *summed* and divided by
    the number of non-padding labels of the whole optimizer step — every
    micro-batch and, under DDP, every rank — all-reduced once per step and passed
    as ``normalizer``. So the update equals one big batch's token mean however
    the batch is split, even when micro-batches hold different numbers of real
    tokens (a per-micro-batch mean would weight a token of a short micro-batch
    more).

    Args:
        student: the model to train (protocol above).
        train_data: map-style data set whose items are dicts with ``"tokens"``, an
            int64 (S,) sequence right-padded with ``pad_id`` (e.g.
            ``DictDataset(tokens=distillkit.data.models.byte_sequences(texts, S))``).
        teacher: frozen teacher (protocol above); put in eval mode with
            ``requires_grad=False``. ``None`` trains on cross entropy alone.
        eval_data: held-out data set like ``train_data``, evaluated every
            ``eval_every`` steps and at the end of :meth:`fit` (perplexity).
        optimizer: an optimizer over ``student.parameters()`` or a factory called
            with them; default Adam(lr=1e-3).
        scheduler: optional factory ``optimizer -> LRScheduler``, stepped once per
            optimizer step (its state is checkpointed).
        loss: :class:`KDConfig` (default ``KDConfig()``); must be ``None`` without a
            teacher.
        steps: total optimizer steps of the run.
        batch_size: sequences per micro-batch *per process*.
        accumulation_steps: micro-batches per optimizer step. The global batch is
            ``G = batch_size × accumulation_steps × world_size`` sequences.
        chunk_rows: rows of logits the fused loss (and evaluation) forms at once.
        amp_dtype: ``torch.bfloat16`` (or ``float16`` on CUDA) runs both models'
            forward passes (and the backward of the student's body) under
            :func:`torch.autocast`; ``None`` (default) runs in the parameters'
            dtype. The lm heads and the loss run outside autocast, in the head
            weight's dtype (fp32 logits: the fused loss already bounds their memory,
            and the log-softmax is where low precision hurts). fp16 needs a
            gradient scaler, which this loop does not have; prefer bf16.
        max_grad_norm: clip the global gradient norm to this (``None``: no clipping).
        pad_id: the padding token id; labels equal to it are ignored.
        eval_every: steps between metric records (and checkpoints, see :meth:`fit`).
        device: where models and batches live (CPU or CUDA).
        seed: data-order seed. Step k reads global batch ``k mod P`` (P =
            ``len(train_data) // G`` steps per epoch; the last ``len mod G``
            sequences of each shuffle are dropped) of epoch ``e = k // P``, whose order
            is ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``.
            Rank r takes sequences ``[r·A·b, (r+1)·A·b)`` of the global batch
            (A = ``accumulation_steps``, b = ``batch_size``) and micro-batch m of
            them the m-th b. The order depends only on (seed, step, G), so runs with
            the same global batch see the same sequences at every step whatever the
            split, and a resumed run replays it.
        progress: show a tqdm bar with the step's loss and tokens/s (rank 0 only).

    Under ``torch.distributed`` (initialized before the trainer is built) the
    student is wrapped in ``DistributedDataParallel`` (:attr:`model`), gradients
    are synchronised only on a step's last micro-batch (``no_sync`` before), and
    each rank's loss is scaled by the world size so DDP's gradient *average*
    becomes the global token *sum* over the normalizer. Metrics are all-reduced, so
    every rank records the same history.

    Attributes:
        history: one dict per record: ``step`` (optimizer steps done),
            ``train_loss`` (token-weighted mean loss since the previous record),
            ``tokens_per_s`` (non-padding labels of all ranks per second of training,
            evaluation excluded) and, with ``eval_data``, ``eval_loss`` (mean
            next-token cross entropy, nats) and ``eval_perplexity`` (its exp).
        step: optimizer steps completed.
    """

    progress_key = "step"

    def __init__(
        self,
        student: nn.Module,
        train_data: Dataset,
        *,
        teacher: Optional[nn.Module] = None,
        eval_data: Optional[Dataset] = None,
        optimizer: Union[torch.optim.Optimizer, OptimizerFactory, None] = None,
        scheduler: Optional[SchedulerFactory] = None,
        loss: Optional[KDConfig] = None,
        steps: int = 1000,
        batch_size: int = 16,
        accumulation_steps: int = 1,
        chunk_rows: int = 1024,
        amp_dtype: Optional[torch.dtype] = None,
        max_grad_norm: Optional[float] = None,
        pad_id: int = PAD,
        eval_every: int = 100,
        device: Union[str, torch.device] = "cpu",
        seed: int = 0,
        progress: bool = True,
    ):
        for name, value in [("steps", steps), ("batch_size", batch_size),
                            ("accumulation_steps", accumulation_steps),
                            ("chunk_rows", chunk_rows), ("eval_every", eval_every)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1 (got {value})")
        loss_config = loss_config_for(teacher, loss)
        if loss_config is not None and loss_config.ignore_index != IGNORE_INDEX:
            raise ValueError(f"loss.ignore_index must be {IGNORE_INDEX}, the label of padding and "
                             f"prompt tokens here (got {loss_config.ignore_index})")
        for name, model in [("student", student), ("teacher", teacher)]:
            if model is not None and not isinstance(getattr(model, "lm_head", None), nn.Linear):
                raise ValueError(f"{name} must expose its lm head as an nn.Linear .lm_head")
        if teacher is not None and teacher.lm_head.out_features != student.lm_head.out_features:
            raise ValueError(
                f"teacher and student vocabularies differ (teacher lm_head has "
                f"{teacher.lm_head.out_features} outputs, student {student.lm_head.out_features})"
            )
        if amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16 "
                             f"(got {amp_dtype})")
        world_size = DistributedContext.current(device).world_size
        self.global_batch = batch_size * accumulation_steps * world_size
        if len(train_data) < self.global_batch:
            raise ValueError(
                f"train_data has {len(train_data)} sequences, fewer than one global batch "
                f"(batch_size × accumulation_steps × world_size = {self.global_batch})"
            )
        self.steps = steps
        super().__init__(student, train_data, teacher=teacher, eval_data=eval_data,
                         optimizer=optimizer, loss_config=loss_config, batch_size=batch_size,
                         device=device, seed=seed, progress=progress)
        self.accumulation_steps = accumulation_steps
        self.chunk_rows = chunk_rows
        self.amp_dtype = amp_dtype
        self.max_grad_norm = max_grad_norm
        self.pad_id = pad_id
        self.eval_every = eval_every
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self.steps_per_epoch = len(train_data) // self.global_batch
        # The window since the last record: Σ token losses, tokens, training seconds.
        self._window = [0.0, 0, 0.0]
        self._order_epoch, self._order = -1, None

    # ---- data ---------------------------------------------------------------

    def _micro_batches(self, step: int) -> List[Tensor]:
        """This rank's ``accumulation_steps`` token batches (b, S) of optimizer step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(len(self.train_data), generator=generator)
            self._order_epoch = epoch
        mine = self._order[k * self.global_batch:(k + 1) * self.global_batch].view(
            self.world_size, self.accumulation_steps, self.batch_size)[self.rank]
        return [self._collate(self.train_data, rows.tolist()) for rows in mine]

    @staticmethod
    def _collate(data: Dataset, rows: List[int]) -> Tensor:
        return torch.stack([data[i]["tokens"] for i in rows])

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _hidden(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """Final hidden states (B·S, H) of ``model``, in its head weight's dtype."""
        with self._autocast():
            hidden = model(inputs)
        return hidden.flatten(0, 1).to(self._head(model).weight.dtype)

    def _head(self, model: nn.Module) -> nn.Linear:
        return (model.module if isinstance(model, DistributedDataParallel) else model).lm_head

    # ---- the loss -----------------------------------------------------------

    def compute_loss(self, inputs: Tensor, labels: Tensor, normalizer: Tensor) -> Tensor:
        """Σ over this micro-batch's non-ignored tokens of the per-token loss, / ``normalizer``.

        ``inputs`` (b, S − 1) and ``labels`` (b, S − 1) are shifted already and on
        :attr:`device`; the student's forward pass goes through :attr:`model`.
        """
        hidden = self._hidden(self.model, inputs)
        head = self.student.lm_head
        labels = labels.flatten()
        if self.teacher is None:
            logits = F.linear(hidden, head.weight, head.bias)
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                                   reduction="sum") / normalizer
        with torch.no_grad():
            teacher_hidden = self._hidden(self.teacher, inputs)
        return fused_linear_kd_loss(
            hidden, head.weight, student_bias=head.bias,
            teacher_hidden=teacher_hidden, teacher_weight=self.teacher.lm_head.weight,
            teacher_bias=self.teacher.lm_head.bias, labels=labels, chunk_rows=self.chunk_rows,
            normalizer=normalizer, options=self.loss_config)

    # ---- the loop -----------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step over this rank's micro-batches; returns this rank's mean token loss."""
        self.model.train()
        batches = [shift_tokens(tokens, self.pad_id) for tokens in self._micro_batches(self.step)]
        # The one all-reduce of the step that the loss needs: its token count.
        (tokens,) = self.distributed.sum([sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)])
        # DDP averages gradients over ranks; dividing by count / world_size instead
        # of count makes that average the global sum over count.
        normalizer = max(tokens, 1.0) / self.world_size
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for m, (inputs, labels) in enumerate(batches):
            last = m == len(batches) - 1
            sync = (self.model.no_sync() if self.world_size > 1 and not last
                    else contextlib.nullcontext())
            with sync:
                loss = self.compute_loss(inputs.to(self.device), labels.to(self.device),
                                         normalizer)
                loss.backward()
            loss_sum += loss.detach().double()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        # Σ token losses of this rank; ranks are summed when a record is made.
        loss_sum = loss_sum.item() * normalizer
        self._window[0] += loss_sum
        self._window[1] += int(tokens)
        return loss_sum * self.world_size / max(tokens, 1.0)

    def fit(self, stop_step: Optional[int] = None,
            checkpoint_path: Optional[str] = None) -> List[Dict[str, float]]:
        """Train from :attr:`step` to ``stop_step`` (default ``steps``); return :attr:`history`.

        A metrics record is appended every ``eval_every`` steps and at ``steps``;
        with ``checkpoint_path``, a checkpoint is written at each record and at
        ``stop_step`` (so a paused run can :meth:`resume` exactly).
        """
        stop = self.stop_at(stop_step)
        with self.progress_bar(stop - self.step) as bar:
            while self.step < stop:
                start = time.perf_counter()
                loss = self.train_step()
                self._window[2] += time.perf_counter() - start
                bar.update()
                bar.set_postfix(loss=f"{loss:.4g}",
                                tok_s=f"{self._window[1] / max(self._window[2], 1e-9):.3g}")
                record_now = self.step % self.eval_every == 0 or self.step == self.steps
                if record_now:
                    self._record()
                if checkpoint_path is not None and (record_now or self.step == stop):
                    self.save_checkpoint(checkpoint_path)
        return self.history

    def _record(self) -> None:
        (loss_sum,) = self.distributed.sum([self._window[0]])
        tokens, seconds = self._window[1:]
        # Ranks time their own loops; the slowest one sets the pace.
        seconds = self.distributed.max(seconds)
        record = {"step": self.step, "train_loss": loss_sum / max(tokens, 1),
                  "tokens_per_s": tokens / max(seconds, 1e-9)}
        if self.eval_data is not None:
            record.update({f"eval_{k}": v for k, v in self.evaluate(self.eval_data).items()})
        self.history.append(record)
        self._window = [0.0, 0, 0.0]

    @torch.no_grad()
    def evaluate(self, data: Dataset, model: Optional[nn.Module] = None,
                 batch_size: Optional[int] = None) -> Dict[str, float]:
        """Mean next-token cross entropy (nats per token) and perplexity of ``model`` on ``data``.

        ``model`` defaults to the student; any model of the protocol (the teacher)
        works. Padding labels are excluded; logits are formed ``chunk_rows`` rows
        at a time. Under DDP call it on every rank: rank r evaluates sequences r,
        r + R, … and the sums are all-reduced, so every rank gets the whole set's
        metrics.
        """
        model = self.student if model is None else model
        was_training = model.training
        model.eval()
        head = model.lm_head
        rows = list(self.distributed.shard(len(data)))
        batch_size = batch_size or 4 * self.batch_size
        loss_sum, tokens = 0.0, 0
        for start in range(0, len(rows), batch_size):
            inputs, labels = shift_tokens(self._collate(data, rows[start:start + batch_size]),
                                          self.pad_id)
            hidden = self._hidden(model, inputs.to(self.device))
            labels = labels.flatten().to(self.device)
            for c in range(0, len(labels), self.chunk_rows):
                chunk = slice(c, c + self.chunk_rows)
                logits = F.linear(hidden[chunk], head.weight, head.bias)
                loss_sum += F.cross_entropy(logits, labels[chunk], ignore_index=IGNORE_INDEX,
                                            reduction="sum").item()
            tokens += int((labels != IGNORE_INDEX).sum())
        model.train(was_training)
        loss_sum, tokens = self.distributed.sum([loss_sum, tokens])
        loss = loss_sum / max(tokens, 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    # ---- checkpoints (the protocol is BaseTrainer's) -------------------------

    def state_dict(self) -> Dict[str, Any]:
        """:meth:`BaseTrainer.state_dict`, the global batch, the open metrics window and the
        scheduler. The data order needs no state: it is a function of (seed, step)."""
        return {
            **super().state_dict(),
            "global_batch": self.global_batch,
            "window": list(self._window),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        super().check_state_dict(state)
        if state["global_batch"] != self.global_batch:
            raise ValueError(f"checkpoint has global batch {state['global_batch']}; "
                             f"this run has {self.global_batch} (the data order would change)")
        if (state["scheduler"] is None) != (self.scheduler is None):
            raise ValueError("checkpoint and run disagree on having a scheduler")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        super().load_state_dict(state)
        # The saved loss sum is all ranks' (see save_checkpoint): rank 0 carries it.
        self._window = [state["window"][0] if self.rank == 0 else 0.0, *state["window"][1:]]
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._order_epoch = -1

    def save_checkpoint(self, path: str) -> None:
        # The open window's loss sum is per rank: gather it on rank 0, which writes
        # it, so the sum over ranks (what the next record reports) is unchanged.
        (loss_sum,) = self.distributed.sum([self._window[0]])
        self._window[0] = loss_sum if self.rank == 0 else 0.0
        super().save_checkpoint(path)
