r"""Logit distillation of Hugging Face ``*ForCausalLM`` models inside ``transformers.Trainer``.

:class:`DistillationTrainer` is a ``transformers.Trainer`` whose loss is
:func:`distillkit.fused_linear_kd_loss` from a frozen teacher::

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=train, eval_dataset=held,
                                  temperature=2.0, hard_weight=0.5)
    trainer.train()
    trainer.evaluate()   # eval_loss (the KD objective), eval_cross_entropy, eval_perplexity

Per token t of a batch (labels shifted as the model's own causal-LM loss shifts them:
position s predicts ``labels[s + 1]``, rows whose label is −100 count for nothing), with
student logits z_t = W h_t (+ b) and teacher logits u_t = W_t g_t (+ b_t), h and g the
final hidden states of the two backbones, the row loss is that of :func:`distillkit.kd_loss`
with the trainer's :class:`distillkit.KDOptions`:
``(1 − hard_weight)·T²·D(softmax(u/T) ‖ softmax(z/T)) + hard_weight·CE(z, label)``
(D the chosen divergence). The loss is Σ_t row_t / n with n as in Hugging Face's
``ForCausalLMLoss``: ``num_items_in_batch`` (the non-ignored labels of the whole
accumulated step, gathered over ranks when ``average_tokens_across_devices``, the Trainer then
multiplying the loss by the world size so that DDP's gradient *average* is the global token
mean), or this batch's non-ignored labels when the Trainer passes none (evaluation). So
gradient accumulation over k micro-batches equals one k-times larger batch.

Neither model's (tokens × vocabulary) logits exist: both heads are applied ``chunk_rows``
rows at a time inside the fused loss, each followed by its model's own logit transform read
from its config (:meth:`distillkit.ops.options.LogitHead.from_config`: Cohere's
``logit_scale``, Granite's ``logits_scaling``, Gemma 2/3's ``final_logit_softcapping``),
before the temperature, as the model's forward applies it. A teacher whose vocabulary is the
student's plus padding rows needs ``teacher_vocab="truncate"`` (its extra logits are
dropped); any other mismatch is a ``ValueError``.

Why a wrapper module: the Trainer hands ``Trainer.model`` to accelerate, which wraps it
in DDP or FSDP. Here ``Trainer.model`` is :class:`CausalLMDistillation`, a module that
holds the student and computes the whole loss — backbone, output head, teacher, KD — in its
``forward``. So every parameter the loss touches (the head included, which a loss computed
outside the wrapped forward would leave un-all-reduced under DDP and sharded under FSDP2)
is used inside the wrapped forward, and DDP/FSDP synchronise every gradient as for any
model. The teacher is held outside the module tree: DDP does not broadcast it, FSDP does
not shard it, the optimizer and checkpoints do not see it. ``save_model`` and checkpoints
write the student alone, in ``from_pretrained`` form.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutput

from ..losses.fused_linear import fused_linear_kd_loss
from ..ops.options import KDOptions, LogitHead
from ..trainers.lm import (IGNORE_INDEX, causal_lm_parts, cross_entropy_sum,
                           final_hidden_states, logit_transform)

__all__ = ["CausalLMDistillation", "DistillationTrainer"]

_KD_FIELDS = tuple(f.name for f in dataclasses.fields(KDOptions))


class CausalLMDistillation(nn.Module):
    """A student ``*ForCausalLM`` whose ``forward`` returns the fused KD loss from ``teacher``.

    ``forward(input_ids, attention_mask=None, labels=None, shift_labels=None,
    num_items_in_batch=None, **kwargs)`` takes what the Trainer passes a causal LM
    (``labels`` (B, S) unshifted, or ``shift_labels`` (B, S) already shifted, −100 where
    ignored; other keyword arguments such as ``position_ids`` go to both backbones) and
    returns a ``CausalLMOutput`` whose ``loss`` is documented in the module docstring and
    whose ``logits`` are ``None``. In eval mode it also adds the student's next-token
    cross entropy sum and label count to :attr:`eval_totals` when that is a tensor (the
    trainer's evaluation loop sets it).

    Args:
        student: the ``*ForCausalLM`` to train (its base model and
            ``get_output_embeddings()`` are used).
        teacher: a ``*ForCausalLM`` over the same vocabulary (hidden size may differ);
            put in eval mode with ``requires_grad=False``.
        options: :class:`distillkit.KDOptions`; ``reduction`` must be ``"mean"`` and
            ``ignore_index`` −100 (Hugging Face's label convention); ``teacher_vocab=
            "truncate"`` accepts a teacher with extra (padding) vocabulary rows.
        chunk_rows: rows of logits formed at a time (peak extra memory O(chunk_rows × C)).
    """

    # Read by transformers.Trainer: it passes num_items_in_batch, treats the loss as
    # normalized over the accumulated step, and counts labels[..., 1:] as the causal-LM
    # loss does.
    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"
    main_input_name = "input_ids"

    def __init__(self, student: nn.Module, teacher: nn.Module, options: KDOptions,
                 chunk_rows: int = 1024):
        super().__init__()
        if options.reduction != "mean" or options.ignore_index != IGNORE_INDEX:
            raise ValueError(
                "options.reduction must be 'mean' and options.ignore_index -100, the "
                "normalization and label convention of Hugging Face's causal-LM loss (got "
                f"reduction={options.reduction!r}, ignore_index={options.ignore_index})")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int (got {chunk_rows!r})")
        for name, model in (("model", student), ("teacher_model", teacher)):
            if not callable(getattr(model, "get_output_embeddings", None)):
                raise ValueError(f"{name} must be a Hugging Face *ForCausalLM model (got "
                                 f"{type(model).__name__}, which has no get_output_embeddings)")
            causal_lm_parts(model, name)
        options.teacher_classes(student.get_output_embeddings().out_features,
                                teacher.get_output_embeddings().out_features,
                                "teacher_model and model have different vocabularies")
        # Each model's logit transform, where its own forward applies it.
        self.logit_heads = (logit_transform(student), logit_transform(teacher))
        _check_logits_are_head_of_backbone(student, "model", self.logit_heads[0])
        _check_logits_are_head_of_backbone(teacher, "teacher_model", self.logit_heads[1])
        self.student = student
        # A tuple hides the teacher from nn.Module: not a submodule, so DDP/FSDP, the
        # optimizer, .train() and state_dict leave it alone.
        self._teacher = (teacher.eval().requires_grad_(False),)
        self.options = options
        self.chunk_rows = chunk_rows
        self.eval_totals: Optional[Tensor] = None

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    @property
    def config(self):
        return self.student.config

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.student.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, shift_labels: Optional[Tensor] = None,
                num_items_in_batch: Optional[Any] = None, **kwargs) -> CausalLMOutput:
        shift_labels = _shifted_labels(input_ids, labels, shift_labels)
        student_backbone, head = causal_lm_parts(self.student, "model")
        teacher_backbone, teacher_head = causal_lm_parts(self.teacher, "teacher_model")
        if teacher_head.weight.device != head.weight.device:
            raise ValueError(
                f"teacher_model is on {teacher_head.weight.device} but the student on "
                f"{head.weight.device}; move the teacher there (teacher_model.to(...)) before "
                "training")
        hidden = final_hidden_states(self.student, student_backbone, input_ids, attention_mask,
                                     **kwargs)
        with torch.no_grad():
            teacher_hidden = final_hidden_states(self.teacher, teacher_backbone, input_ids,
                                                 attention_mask, **kwargs)
        labels_flat = shift_labels.reshape(-1).to(hidden.device)
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(hidden.device)
        # Heads and loss outside autocast (bf16=True): each model's logits in its head's
        # dtype, as its own forward forms them, the loss in fp32.
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.reshape(-1, hidden.shape[-1]).to(head.weight.dtype)
            g = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(teacher_head.weight.dtype)
            loss = fused_linear_kd_loss(
                h, head.weight, student_bias=head.bias, teacher_hidden=g,
                teacher_weight=teacher_head.weight, teacher_bias=teacher_head.bias,
                student_head=self.logit_heads[0], teacher_head=self.logit_heads[1],
                labels=labels_flat, chunk_rows=self.chunk_rows, normalizer=num_items_in_batch,
                options=self.options)
            if not self.training and self.eval_totals is not None:
                with torch.no_grad():
                    self.eval_totals += torch.stack([
                        cross_entropy_sum(h, head, labels_flat, self.chunk_rows,
                                          self.logit_heads[0]),
                        (labels_flat != IGNORE_INDEX).sum().double()]).to(self.eval_totals)
        return CausalLMOutput(loss=loss)


def _shifted_labels(input_ids: Tensor, labels: Optional[Tensor],
                    shift_labels: Optional[Tensor]) -> Tensor:
    """Position s's target: ``labels[:, s + 1]`` (−100 at the last position), as
    ``ForCausalLMLoss`` shifts them, or ``shift_labels`` as given."""
    if input_ids is None or input_ids.dim() != 2:
        raise ValueError("input_ids must be given as a (batch, sequence) tensor (got "
                         f"{None if input_ids is None else tuple(input_ids.shape)})")
    if shift_labels is None:
        if labels is None:
            raise ValueError("the batch has no 'labels' (or 'shift_labels'): distillation "
                             "needs them; a causal-LM collator (DataCollatorForLanguageModeling"
                             "(tokenizer, mlm=False)) or labels = input_ids with -100 on padding")
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)} "
                             f"(got {tuple(labels.shape)}); pass unshifted labels, -100 where "
                             "ignored")
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    elif shift_labels.shape != input_ids.shape:
        raise ValueError(f"shift_labels must have the shape of input_ids "
                         f"{tuple(input_ids.shape)} (got {tuple(shift_labels.shape)})")
    return shift_labels


@torch.no_grad()
def _check_logits_are_head_of_backbone(model: nn.Module, name: str, logit_head: LogitHead
                                       ) -> None:
    """The model's own logits on a 2-token probe equal ``logit_head`` of its head applied to
    its backbone's last hidden state: what the fused path computes. Catches architectures
    that transform hidden states or logits in a way their config does not declare, before
    they train on a wrong loss."""
    backbone, head = causal_lm_parts(model, name)
    was_training = model.training
    model.eval()
    try:
        probe = torch.zeros(1, 2, dtype=torch.long, device=head.weight.device)
        want = model(input_ids=probe, use_cache=False).logits
        got = logit_head.apply(head(final_hidden_states(model, backbone, probe)))
    finally:
        model.train(was_training)
    # The same matmul on the same rows: only a different kernel choice could move it.
    tol = 64 * torch.finfo(got.dtype).eps * max(1.0, want.abs().max().item())
    if got.shape != want.shape or (got - want).abs().max().item() > tol:
        raise ValueError(
            f"{name}'s logits are not its output embedding applied to its base model's last "
            f"hidden state, then {logit_head} (largest difference "
            f"{(got - want).abs().max().item() if got.shape == want.shape else 'shape'}); "
            f"{type(model).__name__} transforms them in between, which the fused path does not "
            "reproduce")


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` that distils ``teacher_model`` into ``model`` on the fused loss.

    Args:
        model: the student ``*ForCausalLM``.
        teacher_model: the frozen teacher ``*ForCausalLM``, same vocabulary, on the device
            the student trains on.
        args, train_dataset, eval_dataset, data_collator, …: those of ``Trainer``. Batches
            need ``input_ids`` and ``labels`` (−100 where ignored), as for the model's own
            loss (batches with ``shift_labels`` instead need
            ``args.label_names=["shift_labels"]``).
        options: :class:`distillkit.KDOptions` (default ``KDOptions()``: forward KL, T = 1).
        chunk_rows: rows of logits the loss forms at a time.
        temperature, divergence, beta, hard_weight, scale_by_t2: :class:`KDOptions` fields,
            given directly (they replace those of ``options``).

    The loss and its normalization are documented in the module docstring.
    ``evaluate()`` reports ``eval_loss`` (the KD objective on the eval set, as in training)
    and the student's next-token ``eval_cross_entropy`` (nats per label, all batches'
    labels pooled, across ranks) and ``eval_perplexity`` (its exp). ``predict`` returns
    no logits (the point is never to form them); run the student itself for predictions.
    ``save_model`` and checkpoints save the student (``from_pretrained`` loads them) and
    resuming loads it back. Not supported: ``label_smoothing_factor``, ``compute_loss_func``
    (the loss is the KD loss), ``model_init``, ``load_best_model_at_end``.
    """

    def __init__(self, model: nn.Module = None, teacher_model: nn.Module = None, args=None, *,
                 options: Optional[KDOptions] = None, chunk_rows: int = 1024, **kwargs):
        fields = {name: kwargs.pop(name) for name in _KD_FIELDS if name in kwargs}
        if model is None or teacher_model is None:
            raise ValueError("DistillationTrainer needs model (the student) and teacher_model")
        for name in ("compute_loss_func", "model_init"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name} is not supported by DistillationTrainer: the loss is "
                                 "the KD loss of the student given as model")
        distillation = CausalLMDistillation(model, teacher_model,
                                            KDOptions.resolve(options, **fields), chunk_rows)
        super().__init__(model=distillation, args=args, **kwargs)
        if self.args.label_smoothing_factor != 0:
            raise ValueError("label_smoothing_factor must be 0 with DistillationTrainer (got "
                             f"{self.args.label_smoothing_factor}); use hard_weight < 1 and the "
                             "teacher's soft labels instead")
        if self.args.load_best_model_at_end:
            raise ValueError("load_best_model_at_end is not supported by DistillationTrainer")
        if self.args.label_names is None:
            # The Trainer takes every forward argument naming a label (labels and
            # shift_labels) and, missing one, would skip the loss in evaluation.
            self.label_names = ["labels"]
        self.distillation = distillation

    @property
    def student(self) -> nn.Module:
        return self.distillation.student

    @property
    def teacher(self) -> nn.Module:
        return self.distillation.teacher

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None
                        ) -> Tuple[Optional[Tensor], None, None]:
        # The wrapper forms no logits, so there are none to return.
        return super().prediction_step(model, inputs, True, ignore_keys)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None,
                        ignore_keys=None, metric_key_prefix: str = "eval"):
        self.distillation.eval_totals = torch.zeros(2, dtype=torch.float64,
                                                    device=self.args.device)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only,
                                             ignore_keys, metric_key_prefix)
            nll_sum, labels = self.accelerator.reduce(self.distillation.eval_totals,
                                                      "sum").tolist()
        finally:
            self.distillation.eval_totals = None
        nll = nll_sum / max(labels, 1.0)
        output.metrics[f"{metric_key_prefix}_cross_entropy"] = nll
        output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(nll, 700.0))
        return output

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[Dict] = None) -> None:
        # Trainer.model is the distillation wrapper; what is worth saving is the student, in
        # from_pretrained form. The base class saves self.model: point it at the student.
        if state_dict is not None:
            state_dict = {k.removeprefix("student."): v for k, v in state_dict.items()}
        self.model = self.student
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            self.model = self.distillation

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint,
                                      self.student if model is None else model)
