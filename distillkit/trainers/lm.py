"""Causal-LM distillation on :func:`distillkit.fused_linear_kd_loss` (docs/math.md §2).

:class:`LMDistillationTrainer` trains a student language model on token batches,
distilling from a frozen teacher through the fused linear KD loss, so neither
model's (tokens × vocabulary) logits exist at once: at most ``chunk_rows × C`` of
each per chunk. The loop is counted in optimizer steps (LM training rarely thinks
in epochs), each step accumulating gradients over micro-batches with one global
token normalizer. The models are Hugging Face ``*ForCausalLM`` models or models of
the hidden-states protocol (:class:`distillkit.data.models.ByteTransformer`); the
helpers that tell them apart (:func:`causal_lm_parts`, :func:`final_hidden_states`)
also serve :mod:`distillkit.integrations.transformers`.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from distillkit.losses.fused_linear import fused_linear_kd_loss
from distillkit.ops.options import LogitHead
from distillkit.trainers.kd import KDConfig, loss_config_for
from distillkit.trainers.runtime import BaseTrainer, DistributedContext, OptimizerFactory

__all__ = ["LMDistillationTrainer", "causal_lm_parts", "final_hidden_states",
           "logit_transform", "cross_entropy_sum", "shift_batch"]

SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]

IGNORE_INDEX = -100


def causal_lm_parts(model: nn.Module, name: str) -> Tuple[Optional[nn.Module], nn.Linear]:
    """``(backbone, head)`` of a causal LM, the head being the ``nn.Linear`` the loss fuses.

    A Hugging Face ``*ForCausalLM`` (it has ``get_output_embeddings``) gives its base model
    (``model.base_model``, which returns ``last_hidden_state`` after the final norm) and
    ``get_output_embeddings()``; a model of the hidden-states protocol gives
    ``(None, model.lm_head)``. ``name`` names the argument in the ``ValueError`` raised when
    neither is found.
    """
    if callable(getattr(model, "get_output_embeddings", None)):
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"{name}.get_output_embeddings() returned {type(head).__name__}, not an nn.Linear; "
                f"pass a *ForCausalLM model whose output head is a linear layer")
        backbone = getattr(model, "base_model", model)
        if backbone is model:
            raise ValueError(
                f"{name} ({type(model).__name__}) has no backbone: base_model_prefix "
                f"{getattr(model, 'base_model_prefix', None)!r} names no submodule; pass a "
                f"*ForCausalLM model whose base model returns last_hidden_state")
        return backbone, head
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"{name} must expose its lm head as an nn.Linear .lm_head, or be a Hugging Face "
            f"causal LM with get_output_embeddings() (got {type(model).__name__})")
    return None, head


def logit_transform(model: nn.Module) -> LogitHead:
    """What ``model``'s forward does to its head's output: a Hugging Face model's
    :meth:`LogitHead.from_config` (soft cap, logit scale), none for protocol models."""
    if callable(getattr(model, "get_output_embeddings", None)):
        return LogitHead.from_config(model.config)
    return LogitHead()


def final_hidden_states(model: nn.Module, backbone: Optional[nn.Module], input_ids: Tensor,
                        attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
    """Final hidden states (B, S, H) of ``model`` (``backbone`` from :func:`causal_lm_parts`).

    A Hugging Face backbone is called with ``input_ids``, ``attention_mask``,
    ``use_cache=False`` (training keeps no key-value cache) and ``kwargs``
    (``position_ids``, …); a protocol model is called with the tokens alone, so its
    batches must be right-padded (positions see only the tokens before them).
    """
    if backbone is None:
        return model(input_ids)
    return backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    **kwargs).last_hidden_state


def cross_entropy_sum(hidden: Tensor, head: nn.Linear, labels: Tensor, chunk_rows: int,
                      logit_head: Optional[LogitHead] = None) -> Tensor:
    """Σ next-token cross entropy of ``logit_head(head(hidden))`` (``hidden`` (N, H), no
    transform by default) over ``labels`` (N,) ≠ −100, as a float64 scalar (each chunk's
    logits in fp32, fp64 for fp64 heads), forming ``chunk_rows`` rows of logits at a time
    (for evaluation: no graph is kept under ``torch.no_grad``)."""
    acc = torch.float64 if head.weight.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        logits = F.linear(hidden[rows], head.weight, head.bias)
        if logit_head is not None:
            logits = logit_head.apply(logits)
        logits = logits.to(acc)
        total += F.cross_entropy(logits, labels[rows], ignore_index=IGNORE_INDEX,
                                 reduction="sum").double()
    return total


def shift_batch(batch: Mapping[str, Tensor], pad_id: Optional[int]
                ) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """``(inputs, attention_mask, labels)`` of a collated batch, shifted for next-token loss.

    ``batch["tokens"]`` (B, S) gives inputs ``tokens[:, :-1]``. Labels (B, S − 1) are
    ``batch["labels"][:, 1:]`` when the batch has labels (Hugging Face's convention: aligned
    with the tokens, −100 where nothing is predicted); otherwise ``tokens[:, 1:]`` with −100
    where ``batch["attention_mask"]`` is 0 or the token is ``pad_id``.
    """
    tokens = batch["tokens"]
    mask = batch.get("attention_mask")
    if "labels" in batch:
        labels = batch["labels"][:, 1:]
    else:
        labels = tokens[:, 1:]
        if pad_id is not None:
            labels = labels.masked_fill(labels == pad_id, IGNORE_INDEX)
        if mask is not None:
            labels = labels.masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    return tokens[:, :-1], mask[:, :-1] if mask is not None else None, labels


class _HiddenStates(nn.Module):
    """``model``'s final hidden states as a module: what DDP wraps, so that the student's
    forward through :attr:`LMDistillationTrainer.model` is the backbone's, not a forward that
    forms every logit (a Hugging Face ``*ForCausalLM``'s own)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        backbone, _ = causal_lm_parts(self.model, "model")
        return final_hidden_states(self.model, backbone, input_ids, attention_mask)


class LMDistillationTrainer(BaseTrainer):
    """Trains a causal ``student`` LM on token sequences, distilling from a frozen ``teacher``.

    Models (student and teacher, either kind): a Hugging Face ``*ForCausalLM`` — its
    base model gives the final hidden states (called with the batch's attention mask)
    and ``get_output_embeddings()`` the head — or a model of the hidden-states
    protocol (:class:`distillkit.data.models.ByteTransformer` follows it):
    ``model(tokens)`` maps int64 tokens (B, S) to final hidden states (B, S, H) —
    causal, position s seeing tokens 0..s only — and ``model.lm_head`` is an
    ``nn.Linear(H, C)`` (bias optional) that the forward pass does **not** apply.
    Either way the trainer fuses the head into the loss. Student and teacher share
    the vocabulary C (H may differ).

    Objective, per optimizer step: the rows are the positions of the step's
    sequences, predicting token s + 1 from tokens 0..s (the causal shift is done
    here, see :func:`shift_batch`: inputs ``tokens[:, :-1]``, labels ``labels[:, 1:]``
    or ``tokens[:, 1:]``, ``-100`` where nothing is to be predicted). With a teacher, the loss is
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
            int64 (S,) sequence, and optionally ``"attention_mask"`` (S,) (1 on real
            tokens) and ``"labels"`` (S,) (aligned with the tokens, −100 where nothing
            is predicted, as Hugging Face collators make them). Without labels, the
            tokens are the labels, ignored where the mask is 0 or the token is
            ``pad_id``; items with neither labels nor a mask need ``pad_id`` (byte data:
            ``DictDataset(tokens=byte_sequences(texts, S))`` with
            ``pad_id=distillkit.data.models.PAD``).
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
        pad_id: the padding token id of data without labels; labels equal to it are
            ignored. No default: a guessed id would silently train on another
            vocabulary's padding.
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
    student's hidden-states forward is wrapped in ``DistributedDataParallel``
    (:attr:`model`), gradients
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
        pad_id: Optional[int] = None,
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
        _, head = causal_lm_parts(student, "student")
        if teacher is not None:
            _, teacher_head = causal_lm_parts(teacher, "teacher")
            if teacher_head.out_features != head.out_features:
                raise ValueError(
                    f"teacher and student vocabularies differ (teacher lm head has "
                    f"{teacher_head.out_features} outputs, student {head.out_features})")
        if len(train_data) and pad_id is None and not {"labels", "attention_mask"} & set(
                train_data[0]):
            raise ValueError(
                "train_data items have no 'labels' or 'attention_mask', so padding cannot be "
                "told from tokens: pass pad_id (distillkit.data.models.PAD for byte_sequences "
                "data), or items with labels (-100 where ignored) or an attention_mask")
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
        # The base trainer wraps (in DDP) and optimizes what it is given: the student's
        # hidden-states module, so the wrapped forward is the backbone's. Checkpoints and
        # self.student hold the model itself.
        super().__init__(_HiddenStates(student), train_data, teacher=teacher,
                         eval_data=eval_data, optimizer=optimizer, loss_config=loss_config,
                         batch_size=batch_size, device=device, seed=seed, progress=progress)
        self.student = student
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

    def _micro_batches(self, step: int) -> List[Dict[str, Tensor]]:
        """This rank's ``accumulation_steps`` collated batches (b, S) of optimizer step ``step``."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(len(self.train_data), generator=generator)
            self._order_epoch = epoch
        mine = self._order[k * self.global_batch:(k + 1) * self.global_batch].view(
            self.world_size, self.accumulation_steps, self.batch_size)[self.rank]
        return [self._collate(self.train_data, rows.tolist()) for rows in mine]

    @staticmethod
    def _collate(data: Dataset, rows: List[int]) -> Dict[str, Tensor]:
        items = [data[i] for i in rows]
        return {key: torch.stack([item[key] for item in items])
                for key in ("tokens", "attention_mask", "labels") if key in items[0]}

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _hidden(self, hidden_states: nn.Module, inputs: Tensor,
                attention_mask: Optional[Tensor], head: nn.Linear) -> Tensor:
        """Final hidden states (B·S, H) from ``hidden_states`` (a :class:`_HiddenStates`, or
        :attr:`model`), in ``head``'s weight dtype."""
        with self._autocast():
            hidden = hidden_states(inputs, attention_mask)
        return hidden.flatten(0, 1).to(head.weight.dtype)

    # ---- the loss -----------------------------------------------------------

    def compute_loss(self, inputs: Tensor, attention_mask: Optional[Tensor], labels: Tensor,
                     normalizer: Tensor) -> Tensor:
        """Σ over this micro-batch's non-ignored tokens of the per-token loss, / ``normalizer``.

        ``inputs``, ``attention_mask`` (or ``None``) and ``labels``, all (b, S − 1), are
        shifted already (:func:`shift_batch`) and on :attr:`device`; the student's forward
        pass goes through :attr:`model`.
        """
        _, head = causal_lm_parts(self.student, "student")
        hidden = self._hidden(self.model, inputs, attention_mask, head)
        labels = labels.flatten()
        if self.teacher is None:
            logits = logit_transform(self.student).apply(F.linear(hidden, head.weight, head.bias))
            return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                                   reduction="sum") / normalizer
        _, teacher_head = causal_lm_parts(self.teacher, "teacher")
        with torch.no_grad():
            teacher_hidden = self._hidden(_HiddenStates(self.teacher), inputs, attention_mask,
                                          teacher_head)
        return fused_linear_kd_loss(
            hidden, head.weight, student_bias=head.bias,
            teacher_hidden=teacher_hidden, teacher_weight=teacher_head.weight,
            teacher_bias=teacher_head.bias, student_head=logit_transform(self.student),
            teacher_head=logit_transform(self.teacher), labels=labels,
            chunk_rows=self.chunk_rows, normalizer=normalizer, options=self.loss_config)

    # ---- the loop -----------------------------------------------------------

    def train_step(self) -> float:
        """One optimizer step over this rank's micro-batches; returns this rank's mean token loss."""
        self.model.train()
        batches = [shift_batch(batch, self.pad_id) for batch in self._micro_batches(self.step)]
        # The one all-reduce of the step that the loss needs: its token count.
        (tokens,) = self.distributed.sum([sum(int((y != IGNORE_INDEX).sum())
                                               for *_, y in batches)])
        # DDP averages gradients over ranks; dividing by count / world_size instead
        # of count makes that average the global sum over count.
        normalizer = max(tokens, 1.0) / self.world_size
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for m, (inputs, mask, labels) in enumerate(batches):
            last = m == len(batches) - 1
            sync = (self.model.no_sync() if self.world_size > 1 and not last
                    else contextlib.nullcontext())
            with sync:
                loss = self.compute_loss(inputs.to(self.device),
                                         mask.to(self.device) if mask is not None else None,
                                         labels.to(self.device), normalizer)
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

        ``model`` defaults to the student; any model the trainer accepts (the teacher)
        works. Padding labels are excluded; logits are formed ``chunk_rows`` rows
        at a time. Under DDP call it on every rank: rank r evaluates sequences r,
        r + R, … and the sums are all-reduced, so every rank gets the whole set's
        metrics.
        """
        model = self.student if model is None else model
        was_training = model.training
        model.eval()
        _, head = causal_lm_parts(model, "model")
        hidden_states = _HiddenStates(model)
        rows = list(self.distributed.shard(len(data)))
        batch_size = batch_size or 4 * self.batch_size
        loss_sum, tokens = 0.0, 0
        for start in range(0, len(rows), batch_size):
            inputs, mask, labels = shift_batch(
                self._collate(data, rows[start:start + batch_size]), self.pad_id)
            hidden = self._hidden(hidden_states, inputs.to(self.device),
                                  mask.to(self.device) if mask is not None else None, head)
            labels = labels.flatten().to(self.device)
            loss_sum += cross_entropy_sum(hidden, head, labels, self.chunk_rows,
                                          logit_transform(model)).item()
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
