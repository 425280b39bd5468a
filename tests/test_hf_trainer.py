"""DistillationTrainer: the real transformers.Trainer on the fused loss equals the Trainer on a
plain-PyTorch loss over materialized logits, accumulates like one big batch, evaluates, runs in
bf16 and under 2-process gloo DDP equals one process.

Models are tiny random Llama / Qwen2 (tied head) / Gemma 2 (final-logit soft cap) / Cohere
(logit scale) ``*ForCausalLM``s built from configs; batches are padded
with token 0 (a real token id), masked, and labelled -100 on the padding, with very uneven
lengths, so a wrong normalization or a trained pad shows.
"""
import json
import os

import pytest
import torch
from torch import nn

from conftest import rounding_bound, spawn_ranks
from distillkit import KDOptions
from distillkit.__main__ import main
from distillkit.reference import kd_loss_ref

transformers = pytest.importorskip("transformers")
from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config,  # noqa: E402
                          Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Trainer, TrainingArguments)

from distillkit.integrations.transformers import DistillationTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ = 48, 12
KD = KDOptions(temperature=2.0, hard_weight=0.3)
ARCHS = {
    "llama": lambda h, vocab: LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)),
    "qwen2": lambda h, vocab: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=True)),
    # A cap of the logits' own size (they are ~0.04 at init): tanh far from the identity.
    "gemma2": lambda h, vocab: Gemma2ForCausalLM(Gemma2Config(
        vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=h // 2,
        max_position_embeddings=32, sliding_window=8, final_logit_softcapping=0.05,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "cohere": lambda h, vocab: CohereForCausalLM(CohereConfig(
        vocab_size=vocab, hidden_size=h, intermediate_size=2 * h, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
        logit_scale=4.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def model(arch, hidden, seed, vocab=VOCAB):
    torch.manual_seed(seed)
    return ARCHS[arch](hidden, vocab)


def pair(arch="llama"):
    """(teacher, student): same vocabulary, different widths and initialisations."""
    return model(arch, 32, 0), model(arch, 16, 1)


def padded_data(count=16, seed=0):
    """Sequences of 2 to SEQ real tokens, right-padded with token 0, masked, labels -100 there."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        n = 2 + (i * 7) % (SEQ - 1)
        ids = torch.randint(1, VOCAB, (SEQ,), generator=gen)
        ids[n:] = 0
        mask = (torch.arange(SEQ) < n).long()
        rows.append({"input_ids": ids, "attention_mask": mask,
                     "labels": ids.masked_fill(mask == 0, -100)})
    return rows


def arguments(tmp_path, **kw):
    """SGD at a constant rate (Adam's normalized steps would hide gradient-scale errors),
    no shuffling surprises: one seed, no saving, no logging integrations."""
    defaults = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                    learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                    warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0, report_to=[],
                    use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
                    seed=7, dataloader_num_workers=0)
    return TrainingArguments(**{**defaults, **kw})


class PlainKDTrainer(Trainer):
    """The Trainer with the KD loss written in plain PyTorch on materialized logits:
    Σ_t kd_row(z_t, u_t) / num_items_in_batch, labels shifted as ForCausalLMLoss shifts them."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, teacher_model, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher_model.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        logits = model(input_ids=inputs["input_ids"],
                       attention_mask=inputs["attention_mask"]).logits
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"],
                                          attention_mask=inputs["attention_mask"]).logits
        shifted = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
        # A teacher with padding rows: its first C logits are the student's classes.
        teacher_logits = teacher_logits[..., :logits.shape[-1]]
        total = kd_loss_ref(logits.float(), teacher_logits.float(), labels=shifted,
                            options=KD.replace(reduction="sum"))
        loss = total / (num_items_in_batch if num_items_in_batch is not None
                        else (shifted != -100).sum())
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, {"logits": logits}) if return_outputs else loss


def trained(trainer_cls, arch, tmp_path, data=None, teacher_vocab=VOCAB, **kw):
    teacher, student = model(arch, 32, 0, vocab=teacher_vocab), model(arch, 16, 1)
    options = KD.replace(teacher_vocab="truncate" if teacher_vocab > VOCAB else "exact")
    extra = dict(options=options, chunk_rows=5) if trainer_cls is DistillationTrainer else {}
    trainer = trainer_cls(model=student, teacher_model=teacher, args=arguments(tmp_path, **kw),
                          train_dataset=data or padded_data(), **extra)
    trainer.train()
    return trainer, student


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(got, want, terms):
    """Equal up to the rounding of gradients that are sums of ``terms`` products in another
    order (chunked, fused) over 3 SGD steps; the update is lr × gradient, so relative to
    the parameter's scale."""
    tol = rounding_bound(torch.float32, terms, c=4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(b.abs().max().item(), 1e-3))


@pytest.mark.parametrize("arch, teacher_vocab", [("llama", VOCAB), ("qwen2", VOCAB),
                                                 ("gemma2", VOCAB), ("cohere", VOCAB),
                                                 ("llama", VOCAB + 16)],
                         ids=["llama", "qwen2", "gemma2-softcap", "cohere-scale",
                              "llama-padded-teacher-vocab"])
def test_matches_plain_pytorch_loss_over_steps(arch, teacher_vocab, tmp_path):
    fused, student = trained(DistillationTrainer, arch, tmp_path / "fused",
                             teacher_vocab=teacher_vocab)
    plain, reference = trained(PlainKDTrainer, arch, tmp_path / "plain",
                               teacher_vocab=teacher_vocab)
    assert_params_close(params(student), params(reference), terms=4 * SEQ * VOCAB)
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (fused, plain)]
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    # The run moved the student (a no-op trainer would pass the comparisons above).
    assert max((a - b).abs().max() for a, b in zip(params(student), params(pair(arch)[1]))) > 1e-3


def test_accumulation_1x4_equals_4x1(tmp_path):
    _, whole = trained(DistillationTrainer, "llama", tmp_path / "a", per_device_train_batch_size=4,
                       gradient_accumulation_steps=1)
    _, split = trained(DistillationTrainer, "llama", tmp_path / "b", per_device_train_batch_size=1,
                       gradient_accumulation_steps=4)
    assert_params_close(params(split), params(whole), terms=4 * SEQ * VOCAB)


def test_evaluate_reports_loss_cross_entropy_and_perplexity(tmp_path):
    teacher, student = pair()
    held = padded_data(10, seed=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=arguments(tmp_path, per_device_eval_batch_size=4),
                                  eval_dataset=held, options=KD)
    metrics = trainer.evaluate()
    ids = torch.stack([r["input_ids"] for r in held])
    mask = torch.stack([r["attention_mask"] for r in held])
    labels = nn.functional.pad(torch.stack([r["labels"] for r in held]), (0, 1),
                               value=-100)[:, 1:]
    with torch.no_grad():
        logits = student(input_ids=ids, attention_mask=mask).logits
        teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
    ce = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
    assert metrics["eval_cross_entropy"] == pytest.approx(ce.item(), rel=1e-5)
    assert metrics["eval_perplexity"] == pytest.approx(ce.exp().item(), rel=1e-5)
    # eval_loss: the Trainer's mean of per-batch KD losses (batches of 4, 4, 2 sequences).
    batch_losses, sizes = [], []
    for start in range(0, len(held), 4):
        rows = slice(start, start + 4)
        batch_losses.append(kd_loss_ref(logits[rows], teacher_logits[rows],
                                        labels=labels[rows], options=KD))
        sizes.append(len(held[rows]))
    want = sum(loss * n for loss, n in zip(batch_losses, sizes)) / sum(sizes)
    assert metrics["eval_loss"] == pytest.approx(want.item(), rel=1e-5)


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    """4 steps in one run equal 2 steps, a checkpoint, and 2 more steps in a new trainer
    (a fresh student, resumed through ``Trainer.train(resume_from_checkpoint=...)``): the
    checkpoint holds the student, AdamW's moments and the data position; the frozen
    teacher is the caller's and not in it."""
    adam = dict(optim="adamw_torch", learning_rate=0.05, max_steps=4, save_strategy="steps",
                save_steps=2)
    whole, student = trained(DistillationTrainer, "llama", tmp_path / "whole", **adam)
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file()
    saved = {f.name for f in checkpoint.iterdir()}
    assert not any("teacher" in name for name in saved), saved

    def resume(name):
        """A new trainer on a fresh student, resumed from the checkpoint."""
        teacher, fresh = model("llama", 32, 0), model("llama", 16, 1)
        trainer = DistillationTrainer(model=fresh, teacher_model=teacher, options=KD,
                                      chunk_rows=5, args=arguments(tmp_path / name, **adam),
                                      train_dataset=padded_data())
        trainer.train(resume_from_checkpoint=str(checkpoint))
        return trainer, fresh

    resumed, fresh = resume("resumed")
    assert resumed.state.global_step == 4
    assert_params_close(params(fresh), params(student), terms=4 * SEQ * VOCAB)
    # The resumed steps are the uninterrupted run's steps 3 and 4 (same batches, same loss).
    tail = [[h["loss"] for h in t.state.log_history if "loss" in h][-2:] for t in (resumed, whole)]
    assert tail[0] == pytest.approx(tail[1], rel=1e-5)
    # Without the optimizer state (moments reset) the same two steps end elsewhere: the
    # comparison above can fail.
    (checkpoint / "optimizer.pt").unlink()
    _, reset = resume("cold")
    assert max((a - b).abs().max() for a, b in zip(params(reset), params(student))) > 1e-4


def test_save_model_writes_the_student(tmp_path):
    trainer, student = trained(DistillationTrainer, "qwen2", tmp_path, max_steps=1)
    trainer.save_model(str(tmp_path / "final"))
    loaded = Qwen2ForCausalLM.from_pretrained(str(tmp_path / "final"))
    for (name, a), b in zip(student.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["bf16-autocast", "bf16-weights"])
def test_bf16_runs_and_matches_plain_loss(mode, tmp_path):
    kw = dict(bf16=True) if mode == "bf16-autocast" else {}
    data = padded_data()

    def run(trainer_cls):
        teacher, student = pair()
        if mode == "bf16-weights":
            teacher, student = teacher.bfloat16(), student.bfloat16()
        extra = dict(options=KD, chunk_rows=5) if trainer_cls is DistillationTrainer else {}
        trainer = trainer_cls(model=student, teacher_model=teacher,
                              args=arguments(tmp_path / trainer_cls.__name__, max_steps=2, **kw),
                              train_dataset=data, **extra)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], student

    fused, student = run(DistillationTrainer)
    plain, _ = run(PlainKDTrainer)
    assert all(p.dtype == (torch.bfloat16 if mode == "bf16-weights" else torch.float32)
               for p in student.parameters())
    # bf16 logits or hidden states: a few bf16 roundings of each logit (eps 2^-8).
    assert fused == pytest.approx(plain, rel=3e-2)


# ---- bad input: a ValueError that says what was found and what to pass ----------


def test_bad_input_raises(tmp_path):
    teacher, student = pair()
    args = arguments(tmp_path)
    padded = model("llama", 16, 0, vocab=64)
    with pytest.raises(ValueError, match="different vocabularies.*64 classes.*48.*truncate"):
        DistillationTrainer(model=student, teacher_model=padded, args=args)
    with pytest.raises(ValueError, match="different vocabularies.*40 classes.*48"):
        DistillationTrainer(model=student, teacher_model=model("llama", 16, 0, vocab=40),
                            args=args, teacher_vocab="truncate")
    with pytest.raises(ValueError, match="must be a Hugging Face \\*ForCausalLM"):
        DistillationTrainer(model=nn.Linear(4, 4), teacher_model=teacher, args=args)
    with pytest.raises(ValueError, match="reduction must be 'mean'"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, reduction="sum")
    bad_labels = [{**row, "labels": row["labels"][:-1]} for row in padded_data()]
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=bad_labels)
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        trainer.train()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=padded_data())
    trainer.teacher.to("meta")
    with pytest.raises(ValueError, match="teacher_model is on meta"):
        trainer.train()


def test_model_that_transforms_its_logits_is_rejected(tmp_path):
    class ScaledLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    torch.manual_seed(0)
    student = ScaledLogits(model("llama", 16, 1).config)
    with pytest.raises(ValueError, match="not its output embedding applied"):
        DistillationTrainer(model=student, teacher_model=pair()[0], args=arguments(tmp_path))


# ---- FSDP2: the wrapper under plain fully_shard, 2 gloo processes == one process --------
# (accelerate 1.16 makes an FSDP config FSDP only on accelerator devices; on CPU the Trainer
# runs DDP, so FSDP2 is driven here by hand, as the Trainer would: the loss from the wrapped
# module's forward with the global token count, times the world size.)

def fsdp_steps(rank, world, sharded):
    from torch.distributed.fsdp import fully_shard
    from distillkit.integrations.transformers import CausalLMDistillation

    teacher, student = pair()
    wrapper = CausalLMDistillation(student, teacher, KD, chunk_rows=5)
    if sharded:
        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(wrapper)
        # gloo has no AVG / PREMUL_SUM: reduce with SUM, then divide (the same mean).
        wrapper.set_force_sum_reduction_for_comms(True)
    opt = torch.optim.SGD(wrapper.parameters(), lr=0.5)
    data = padded_data()
    for step in range(3):
        batch = {k: torch.stack([row[k] for row in data[4 * step:4 * step + 4]])
                 for k in data[0]}
        count = (batch["labels"][:, 1:] != -100).sum()
        mine = {k: v[rank::world] for k, v in batch.items()}
        wrapper.train()
        (wrapper(**mine, num_items_in_batch=count).loss * world).backward()
        opt.step()
        opt.zero_grad()
    return [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()
            for p in student.parameters()]


# ---- 2-process gloo DDP through the Trainer, and FSDP2, == one process ------------

WORLD = 2


def ddp_worker(rank, world, out_dir):
    # What a launcher (torchrun, accelerate launch) sets; accelerate finds the process
    # group spawn_ranks made and runs the Trainer as MULTI_CPU DDP over gloo.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    trainer, student = trained(DistillationTrainer, "llama", os.path.join(out_dir, "run"),
                               per_device_train_batch_size=2, ddp_backend="gloo")
    assert trainer.args.world_size == world
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    torch.save(params(student), os.path.join(out_dir, f"ddp{rank}.pt"))
    # The same processes (their imports are most of the test's time) then run FSDP2.
    torch.save(fsdp_steps(rank, world, sharded=True), os.path.join(out_dir, f"fsdp{rank}.pt"))


@pytest.mark.slow
def test_ddp_and_fsdp2_two_processes_equal_one(tmp_path):
    spawn_ranks(ddp_worker, WORLD, str(tmp_path))
    ddp = [torch.load(tmp_path / f"ddp{r}.pt") for r in range(WORLD)]
    _, single = trained(DistillationTrainer, "llama", tmp_path / "single",
                        per_device_train_batch_size=4)
    for a, b in zip(*ddp):
        assert torch.equal(a, b)
    assert_params_close(ddp[0], params(single), terms=4 * SEQ * VOCAB)

    fsdp = [torch.load(tmp_path / f"fsdp{r}.pt") for r in range(WORLD)]
    single = fsdp_steps(0, 1, sharded=False)
    for r in range(WORLD):
        assert_params_close(fsdp[r], single, terms=4 * SEQ * VOCAB)
    assert max((a - b).abs().max() for a, b in zip(single, params(pair()[1]))) > 1e-3


@pytest.mark.slow
def test_experiment_hf_quick_writes_its_tables(tmp_path):
    assert main(["experiment", "hf", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    table = (tmp_path / "results.md").read_text()
    for needle in ("--quick run", "| teacher ", "| cross entropy |", "DistillationTrainer (fused)",
                   "TRL generalized_jsd_loss (eager)", "fused_linear_kd_loss, chunk_rows="):
        assert needle in table
    results = json.loads((tmp_path / "results.json").read_text())
    students = {r["loss"]: r for r in results["students"]}
    # The same objective, data order and initialisation: TRL's eager loss and the fused one
    # train the same student (up to rounding over 5 steps).
    fused = students["DistillationTrainer (fused)"]
    eager = students["TRL generalized_jsd_loss (eager)"]
    assert fused["ce"] == pytest.approx(eager["ce"], rel=1e-4)
    for vocab in {p["vocab"] for p in results["loss_step"]}:
        by_mode = {p["mode"]: p for p in results["loss_step"] if p["vocab"] == vocab}
        assert by_mode["fused"]["loss"] == pytest.approx(by_mode["trl"]["loss"], rel=1e-5)


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("### Hugging Face Trainer", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    metrics = scope["trainer"].evaluate()
    assert metrics["eval_perplexity"] == pytest.approx(
        torch.tensor(metrics["eval_cross_entropy"]).exp().item(), rel=1e-6)
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "out" / "student"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(),
                                                 scope["student"].parameters()))
