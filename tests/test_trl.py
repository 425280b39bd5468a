"""TRL's own trainers on distillkit's fused losses, against TRL's own loss.

Tiny random models from configs (Llama, Gemma 2 with a final soft cap, Cohere with a
logit scale) and an in-memory word-level tokenizer: nothing is downloaded.

- GKDTrainer with the one-line ``generalized_jsd_loss`` swap: on every step both losses
  are computed on the trainer's own (row-strided) logits and compared, with their
  gradients; a run on TRL's loss and a run on ours end at the same parameters.
- DistillationTrainer with ``_chunked_divergence_loss`` pointed at
  ``chunked_divergence_loss``: on every step both are computed on the trainer's own
  hidden states and heads (soft cap and scale read by TRL from the configs), and loss,
  entropy, token count and the gradients w.r.t. the hidden states and head compared.
"""
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config,  # noqa: E402
                          Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402
import trl.trainer.distillation_trainer as trl_distillation  # noqa: E402

from conftest import rounding_bound  # noqa: E402
from distillkit.integrations import chunked_divergence_loss, generalized_jsd_loss  # noqa: E402
from distillkit.integrations.trl import _GridJSD  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["[PAD]", "[UNK]", "[EOS]", "user", "assistant", ":"] + [f"w{i}" for i in range(58)]
VOCAB = len(WORDS)
TRL_GKD_LOSS = GKDTrainer.generalized_jsd_loss
TRL_CHUNKED_LOSS = trl_distillation._chunked_divergence_loss


def tokenizer(padding_side="right"):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                unk_token="[UNK]", padding_side=padding_side)
    t.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [EOS] "
                       "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")
    return t


COMMON = dict(vocab_size=VOCAB, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=None,
              initializer_range=0.3)  # peaked random distributions: a loss well above rounding


def causal_lm(kind, seed, hidden):
    torch.manual_seed(seed)
    sizes = dict(hidden_size=hidden, intermediate_size=2 * hidden, head_dim=hidden // 2)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**COMMON, **sizes))
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**COMMON, **sizes, final_logit_softcapping=4.0))
    return CohereForCausalLM(CohereConfig(**COMMON, **sizes, logit_scale=0.5))


def words(g, n):
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 58, (n,), generator=g))


def gkd_data():
    g = torch.Generator().manual_seed(0)
    return Dataset.from_list([{"messages": [{"role": "user", "content": words(g, 3 + i % 3)},
                                            {"role": "assistant", "content": words(g, 6)}]}
                              for i in range(8)])


def close(got, want, n, c=8):
    """Equal up to two fp32 sums of n terms in different orders (c sqrt(n) eps of the size)."""
    tol = rounding_bound(torch.float32, n, c)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


def train_gkd(tmp_path, loss_fn, steps=2):
    """GKD off-policy (lmbda=0: deterministic) for ``steps`` SGD steps with ``loss_fn``
    as the trainer's loss; returns the final student parameters."""
    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps,
                     lmbda=0.0, beta=0.3, temperature=1.0, learning_rate=0.5, optim="sgd",
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                     max_length=32, seed=0, disable_tqdm=True, bf16=False)
    trainer = GKDTrainer(model=causal_lm("llama", 1, 16), teacher_model=causal_lm("llama", 2, 32),
                         args=args, train_dataset=gkd_data(), processing_class=tokenizer())
    trainer.generalized_jsd_loss = loss_fn  # instance attribute: the class stays TRL's
    trainer.train()
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_gkd_trainer_swap_matches_trl(tmp_path):
    calls = []

    def both(student_logits, teacher_logits, **kw):
        # The trainer's own row-strided logits[:, :-1, :], read in place by ours.
        assert not student_logits.is_contiguous()
        ours = generalized_jsd_loss(student_logits, teacher_logits, **kw)
        theirs = TRL_GKD_LOSS(student_logits, teacher_logits, **kw)
        grads = [torch.autograd.grad(x, student_logits, retain_graph=True)[0] for x in (ours, theirs)]
        calls.append((ours.detach(), theirs.detach(), *grads, student_logits[..., 0].numel()))
        return ours

    ours_params = train_gkd(tmp_path / "ours", both)
    trl_params = train_gkd(tmp_path / "trl", TRL_GKD_LOSS)
    assert len(calls) == 2
    for ours, theirs, g_ours, g_theirs, rows in calls:
        assert theirs > 1e-2
        close(ours, theirs, rows * VOCAB)
        close(g_ours, g_theirs, VOCAB)
    start = [p.detach() for p in causal_lm("llama", 1, 16).parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(trl_params, start))
    assert moved > 1e-3
    tol = rounding_bound(torch.float32, 2 * 40 * VOCAB, 8)
    for a, b in zip(ours_params, trl_params):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * moved)


@pytest.mark.parametrize("student,teacher", [("llama", "gemma2"), ("cohere", "llama")])
def test_distillation_trainer_adapter_matches_trl(tmp_path, monkeypatch, student, teacher):
    calls = []

    def both(*args, **kw):
        ours = chunked_divergence_loss(*args, **kw)
        theirs = TRL_CHUNKED_LOSS(*args, **kw)
        h, w = args[0], args[2]
        grads = [torch.autograd.grad(x[0], (h, w), retain_graph=True) for x in (ours, theirs)]
        calls.append((tuple(t.detach() for t in ours), theirs, grads, kw, int(ours[2])))
        return ours

    monkeypatch.setattr(trl_distillation, "_chunked_divergence_loss", both)
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_list([{"prompt": words(g, 3 + i % 3)} for i in range(8)])
    args = DistillationConfig(output_dir=str(tmp_path), per_device_train_batch_size=4,
                              max_steps=2, beta=0.3, temperature=2.0, learning_rate=0.5,
                              optim="sgd", max_completion_length=6, logging_steps=1,
                              report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False,
                              disable_tqdm=True)
    trainer = DistillationTrainer(model=causal_lm(student, 1, 16),
                                  teacher_model=causal_lm(teacher, 2, 32), args=args,
                                  train_dataset=data, processing_class=tokenizer("left"))
    trainer.train()
    assert len(calls) == 2
    for (loss, entropy, n_valid), (t_loss, t_entropy, t_n), grads, kw, rows in calls:
        # TRL read the soft cap / scale from the configs and passed them on.
        if "gemma2" == teacher:
            assert kw["teacher_final_logit_softcapping"] == 4.0
        if "cohere" == student:
            assert kw["student_logit_scale"] == 0.5
        assert int(n_valid) == int(t_n) > 0 and t_loss > 1e-2
        close(loss, t_loss.detach(), rows * VOCAB)
        close(entropy, t_entropy, rows * VOCAB)
        for ours, theirs in zip(*grads):
            close(ours, theirs, rows * VOCAB)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([c[0][0].item() for c in calls], rel=1e-6)


# The drop-in on its own: GKDTrainer's causal shift is a (B, S, V) slice whose rows
# cannot be flattened into an (N, V) view; they are read where they are.
@pytest.mark.parametrize("window", [(None, -1), (2, -1), (1, None), (3, 5)], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_sliced_logits_read_in_place(window, beta):
    b, s, v = 3, 9, 33
    z_full = torch.randn(b, s, v, dtype=torch.float64, requires_grad=True)
    u_full = torch.randn(b, s, v + 7, dtype=torch.float64)  # a padded teacher: row stride 40
    labels = torch.randint(0, v, (b, s))
    labels[0, :4] = -100
    rows = slice(*window)
    z, u, y = z_full[:, rows], u_full[:, rows], labels[:, rows]
    ours = generalized_jsd_loss(z, u, labels=y, beta=beta, temperature=1.5,
                                teacher_vocab="truncate")
    theirs = TRL_GKD_LOSS(z, u[..., :v], labels=y, beta=beta, temperature=1.5)
    node = ours.grad_fn.next_functions[0][0]
    assert type(node).__name__ == "_GridJSDBackward"
    # The saved logits are views of the inputs' own storage: nothing was copied.
    saved = node.saved_tensors
    assert saved[0].untyped_storage().data_ptr() == z_full.untyped_storage().data_ptr()
    assert saved[1].untyped_storage().data_ptr() == u_full.untyped_storage().data_ptr()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, z_full),
                               torch.autograd.grad(theirs, z_full))


def test_grid_path_only_when_needed():
    z = torch.randn(2, 5, 8, requires_grad=True)
    contiguous = generalized_jsd_loss(z, torch.randn(2, 5, 8))
    assert type(contiguous.grad_fn.next_functions[0][0]) is not _GridJSD._backward_cls
    with pytest.raises(ValueError, match="teacher has 9 classes, the student 8"):
        generalized_jsd_loss(z[:, :-1], torch.randn(2, 5, 9)[:, :-1])
