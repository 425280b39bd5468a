"""LMDistillationTrainer: it learns, accumulates with a global normalizer, resumes exactly, runs under DDP."""
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from distillkit.__main__ import main
from distillkit.data import DictDataset
from distillkit.losses.functional import kd_loss
from distillkit.data.models import BOS, EOS, PAD, VOCAB_SIZE, ByteTransformer, byte_sequences
from distillkit.trainers import KDConfig, LMDistillationTrainer
from distillkit.trainers.lm import shift_batch
from conftest import rounding_bound, spawn_ranks

SEQ = 17  # tokens per row: 16 predictions
KD = KDConfig(temperature=2.0, hard_weight=0.3)
# Metrics that depend on the clock, not on the run.
TIMING = {"tokens_per_s"}

pytestmark = pytest.mark.usefixtures("one_thread")


def ragged_texts(count, seed):
    """Random byte texts of very different lengths: rows carry 1 to SEQ - 1 real labels."""
    gen = random.Random(seed)
    return ["".join(gen.choice("abcdefgh ") for _ in range(gen.randrange(1, 3 * SEQ)))
            for _ in range(count)]


def ragged_data(count=48, seed=0):
    return DictDataset(tokens=byte_sequences(ragged_texts(count, seed), SEQ))


def tiny(seed, dim=16, dropout=0.0):
    torch.manual_seed(seed)
    return ByteTransformer(dim=dim, layers=1, heads=2, max_len=32, dropout=dropout)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def test_byte_sequences_pad_uneven_texts():
    rows = byte_sequences(["ab", "abcdef"], 4)
    assert rows.tolist() == [[BOS, 97, 98, EOS],
                             [BOS, 97, 98, 99], [100, 101, 102, EOS]]
    rows = byte_sequences(["abc"], 4)
    assert rows.tolist() == [[BOS, 97, 98, 99], [EOS, PAD, PAD, PAD]]
    inputs, _, labels = shift_batch({"tokens": rows}, PAD)
    assert inputs.tolist() == [[BOS, 97, 98], [EOS, PAD, PAD]]
    assert labels.tolist() == [[97, 98, 99], [-100, -100, -100]]


def test_padding_does_not_change_real_tokens():
    model = tiny(0).eval()
    short = torch.tensor([[BOS, 104, 105]])
    padded = torch.tensor([[BOS, 104, 105, PAD, PAD]])
    # The two batches may take different GEMM kernels (BLAS promises no bit-equality across
    # shapes): allow the rounding of a few chained length-`dim` reductions, c sqrt(dim) eps
    # relative to the logits' size. A padding token that leaked into a real position would
    # move the logits by orders of magnitude more.
    want = model(short)
    tol = rounding_bound(torch.float32, model.lm_head.in_features, c=64)
    torch.testing.assert_close(model(padded)[:, :3], want, rtol=tol,
                               atol=tol * want.abs().max().item())
    assert model.lm_head.out_features == VOCAB_SIZE


def unigram_cross_entropy(train, held):
    """Held-out CE of the training set's byte frequencies (add-one): a model that ignores context."""
    *_, y_train = shift_batch(train.tensors, PAD)
    *_, y_held = shift_batch(held.tensors, PAD)
    counts = torch.bincount(y_train[y_train >= 0], minlength=VOCAB_SIZE).double() + 1
    log_p = (counts / counts.sum()).log()
    return -log_p[y_held[y_held >= 0]].mean().item()


def word_texts(count, seed):
    """Sentences of a dozen words in random order: within-word bytes are predictable, words are not."""
    gen = random.Random(seed)
    return [" ".join(gen.choice(WORDS) for _ in range(gen.randrange(5, 30))) for _ in range(count)]


WORDS = "the quick brown fox jumps over lazy dog while seven wizards box and judge".split()


def test_distilled_student_learns_context():
    train = DictDataset(tokens=byte_sequences(word_texts(300, seed=0), 33))
    held = DictDataset(tokens=byte_sequences(word_texts(30, seed=1), 33))
    adam = lambda p: torch.optim.Adam(p, lr=1e-2)  # noqa: E731
    teacher = ByteTransformer(dim=32, layers=1, heads=2, max_len=32)
    LMDistillationTrainer(teacher, train, optimizer=adam, steps=60, batch_size=16,
                          pad_id=PAD, progress=False).fit()
    student = tiny(1)
    trainer = LMDistillationTrainer(student, train, teacher=teacher, eval_data=held, loss=KD,
                                    optimizer=adam, steps=40, batch_size=16, eval_every=20,
                                    chunk_rows=100, pad_id=PAD, progress=False)
    history = trainer.fit()
    assert [h["step"] for h in history] == [20, 40]
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    # Far below the best context-free model (~3.1 nats): the student reads the bytes before.
    assert history[-1]["eval_loss"] < unigram_cross_entropy(train, held) - 1.0
    assert history[-1]["eval_perplexity"] == pytest.approx(math.exp(history[-1]["eval_loss"]))
    assert history[-1]["tokens_per_s"] > 0


def one_step(teacher, batch_size, accumulation_steps):
    student = tiny(1)
    trainer = LMDistillationTrainer(
        student, ragged_data(), teacher=teacher, loss=KD if teacher is not None else None,
        optimizer=lambda p: torch.optim.SGD(p, lr=1.0), steps=1, batch_size=batch_size,
        accumulation_steps=accumulation_steps, chunk_rows=7, pad_id=PAD, progress=False)
    trainer.train_step()
    return trainer, [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("with_teacher", [False, True], ids=["cross-entropy", "kd"])
def test_accumulation_uses_the_global_token_count(with_teacher):
    teacher = tiny(0, dim=24) if with_teacher else None
    split, grads = one_step(teacher, batch_size=4, accumulation_steps=2)
    _, whole = one_step(teacher, batch_size=8, accumulation_steps=1)
    for a, b in zip(grads, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    # The documented objective, unfused: Σ token losses of the step / its token count.
    micro = [shift_batch(batch, PAD) for batch in split._micro_batches(0)]
    counts = [int((y >= 0).sum()) for *_, y in micro]
    assert counts[0] != counts[1]  # uneven padding, or the check below proves nothing
    model = tiny(1)

    def micro_loss(inputs, labels, reduction):
        logits = model.lm_head(model(inputs))
        if teacher is None:
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction=reduction)
        with torch.no_grad():
            teacher_logits = teacher.lm_head(teacher(inputs))
        return kd_loss(logits, teacher_logits, labels=labels, reduction=reduction,
                       temperature=KD.temperature, hard_weight=KD.hard_weight)

    total = sum(micro_loss(x, y, "sum") for x, _, y in micro) / sum(counts)
    want = torch.autograd.grad(total, list(model.parameters()))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Averaging per-micro-batch means weights the tokens differently.
    averaged = sum(micro_loss(x, y, "mean") for x, _, y in micro) / len(micro)
    wrong = torch.autograd.grad(averaged, list(model.parameters()))
    assert max((a - b).abs().max() / b.abs().max() for a, b in zip(wrong, want)) > 1e-2


def resumable(teacher, seed=3):
    # Dropout makes the run consume torch's RNG, so resuming must restore it; a
    # scheduler and bf16 autocast ride along.
    return LMDistillationTrainer(
        tiny(1, dropout=0.2), ragged_data(), teacher=teacher, eval_data=ragged_data(12, seed=1),
        loss=KD, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        steps=7, batch_size=4, accumulation_steps=2, eval_every=2, amp_dtype=torch.bfloat16,
        max_grad_norm=1.0, seed=seed, pad_id=PAD, progress=False)


def test_resume_equals_uninterrupted_run(tmp_path):
    path = tmp_path / "run.pt"
    teacher = tiny(0, dim=24)
    whole = resumable(teacher)
    whole.fit()
    assert [h["step"] for h in whole.history] == [2, 4, 6, 7]

    first = resumable(teacher)
    first.fit(stop_step=3, checkpoint_path=path)  # mid-way through a metrics window
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    second = resumable(teacher, seed=11)
    second.resume(path)
    assert second.step == 3 and second.history == first.history
    second.fit()

    assert without_timing(second.history) == without_timing(whole.history)
    assert all(torch.equal(a, b) for a, b in zip(params(second.student), params(whole.student)))
    assert second.scheduler.state_dict() == whole.scheduler.state_dict()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps must be >= 1"),
        (dict(accumulation_steps=0), "accumulation_steps must be >= 1"),
        (dict(batch_size=1000), "fewer than one global batch"),
        (dict(loss=KD), "needs a teacher"),
        (dict(teacher=torch.nn.Linear(2, 2)), "teacher must expose its lm head"),
        (dict(teacher=ByteTransformer(dim=16, layers=1, heads=2, vocab_size=300)),
         "vocabularies differ"),
        (dict(amp_dtype=torch.float64), "amp_dtype"),
        (dict(pad_id=None), "pass pad_id"),
    ],
    ids=["steps", "accumulation", "batch", "loss-without-teacher", "no-lm-head", "vocab",
         "amp", "no-padding-rule"],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LMDistillationTrainer(tiny(1), ragged_data(), **{"pad_id": PAD, "progress": False,
                                                         **kwargs})


def test_resume_rejects_another_global_batch(tmp_path):
    path = tmp_path / "run.pt"
    LMDistillationTrainer(tiny(1), ragged_data(), steps=1, batch_size=4,
                          pad_id=PAD, progress=False).fit(checkpoint_path=path)
    other = LMDistillationTrainer(tiny(1), ragged_data(), steps=1, batch_size=8, pad_id=PAD,
                                  progress=False)
    with pytest.raises(ValueError, match="global batch"):
        other.resume(path)


# ---- DDP: 2 gloo processes == 1 process with the same global batch ---------

WORLD = 2
DDP_STEPS = 4


def ddp_trainer(batch_size):
    """Micro-batches of ``batch_size`` × 2 accumulation steps; the global batch is fixed at 8."""
    teacher = tiny(0, dim=24)
    return LMDistillationTrainer(
        tiny(1), ragged_data(), teacher=teacher, eval_data=ragged_data(10, seed=1), loss=KD,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9), steps=DDP_STEPS,
        batch_size=batch_size, accumulation_steps=2, eval_every=2, chunk_rows=20, seed=5,
        pad_id=PAD, progress=False)


def ddp_worker(rank, world, out_dir):
    checkpoint = os.path.join(out_dir, "ddp.pt")
    ddp_trainer(2).fit(stop_step=1, checkpoint_path=checkpoint)
    resumed = ddp_trainer(2)
    assert isinstance(resumed.model, DistributedDataParallel)
    resumed.resume(checkpoint)
    resumed.fit()
    torch.save({"params": params(resumed.student), "history": resumed.history},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_matches_single_process(tmp_path):
    spawn_ranks(ddp_worker, WORLD, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    single = ddp_trainer(4)
    single.fit()

    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["params"], ranks[1]["params"]))
    assert without_timing(ranks[0]["history"]) == without_timing(ranks[1]["history"])
    for a, b in zip(ranks[0]["params"], params(single.student)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [h["step"] for h in ranks[0]["history"]] == [2, 4]
    for got, want in zip(ranks[0]["history"], single.history):
        for key in ("train_loss", "eval_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-5)


def test_experiment_lm_quick_writes_its_table(tmp_path):
    assert main(["experiment", "lm", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    table = (tmp_path / "results.md").read_text()
    for needle in ("| teacher |", "| student | ", "fused linear KD", "| unfused |",
                   "fused, chunk_rows="):
        assert needle in table
    assert (tmp_path / "history.json").exists()


# ---- Hugging Face causal LMs: data padded with token 0, an attention mask, labels -100 ---

def hf_llama(hidden, seed, vocab=40):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


def hf_data(count=16, seq=10):
    """Right-padded with 0 (a real token of the vocabulary) to very uneven lengths."""
    gen = torch.Generator().manual_seed(0)
    lengths = [2 + (i * 5) % (seq - 1) for i in range(count)]
    tokens = torch.randint(1, 40, (count, seq), generator=gen)
    mask = (torch.arange(seq) < torch.tensor(lengths)[:, None]).long()
    tokens = tokens * mask
    return DictDataset(tokens=tokens, attention_mask=mask,
                       labels=tokens.masked_fill(mask == 0, -100))


def test_hf_causal_lm_step_equals_plain_loss():
    teacher, student = hf_llama(24, 0), hf_llama(16, 1)
    reference = hf_llama(16, 1)
    data = hf_data()
    trainer = LMDistillationTrainer(student, data, teacher=teacher, loss=KD,
                                    optimizer=lambda p: torch.optim.SGD(p, lr=1.0), steps=1,
                                    batch_size=4, accumulation_steps=2, chunk_rows=7,
                                    progress=False)
    trainer.train_step()
    grads = [p.grad for p in student.parameters()]

    # Unfused, on the model's own logits: Σ token losses of the step / its label count.
    batches = trainer._micro_batches(0)
    total, count = 0.0, 0
    for batch in batches:
        ids, mask, labels = batch["tokens"], batch["attention_mask"], batch["labels"]
        logits = reference(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits
        total = total + kd_loss(logits, teacher_logits, labels=labels[:, 1:], reduction="sum",
                                temperature=KD.temperature, hard_weight=KD.hard_weight)
        count += int((labels[:, 1:] != -100).sum())
    want = torch.autograd.grad(total / count, list(reference.parameters()))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Training on the padding (label 0 where the mask is 0) would change the objective.
    assert count < sum(int(b["tokens"][:, 1:].numel()) for b in batches)

    metrics = trainer.evaluate(data, model=teacher)
    ids, mask = data.tensors["tokens"], data.tensors["attention_mask"]
    labels = data.tensors["labels"][:, 1:]
    with torch.no_grad():
        logits = teacher(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    assert metrics["loss"] == pytest.approx(ce.item(), rel=1e-5)
