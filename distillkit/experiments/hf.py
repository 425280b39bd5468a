"""Distil a Hugging Face Llama into a smaller one with transformers.Trainer and DistillationTrainer.

``python -m distillkit experiment hf``: the corpus and split of ``experiment lm``
(``pydoc_data.topics``, the language reference that ships with CPython; every 10th topic
held out; byte tokens, windows of ``--seq-len`` + 1, the last window of a topic padded),
fed to Hugging Face models as ``input_ids``, ``attention_mask`` and ``labels`` (−100 on
padding). Models are ``LlamaForCausalLM`` built from configs (random initialisation,
nothing downloaded) over the 259-token byte vocabulary.

1. A teacher Llama is trained with the plain ``transformers.Trainer`` (the model's own
   cross entropy).
2. For each of ``--seeds`` seeds, a student Llama (same initialisation and data order in
   every run) is trained for the same steps (a) with the plain Trainer on cross entropy and
   (b) with :class:`distillkit.integrations.transformers.DistillationTrainer` on forward KL
   from the teacher (``--temperature``, no hard term, so that TRL's loss below is the same
   objective), and
   (c) with TRL's own eager loss: a Trainer whose ``compute_loss`` forms both models' full
   logits and calls ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss`` (β = 0:
   forward KL), normalized by ``num_items_in_batch`` like ours — the same objective, so (b)
   and (c) train the same student up to rounding; training tokens/s are compared. The three
   runs of a seed follow each other, so they see the same load on a shared machine.
3. Peak memory and time of one loss step (student hidden states → lm head + loss, forward and
   backward; the teacher given as hidden states + its head for the fused loss, as logits for
   TRL's) at the run's shape and at a 32000-token vocabulary, each in a fresh process:
   ``VmHWM`` above the RSS once the inputs exist, glibc's mmap threshold pinned so that freed
   tensors leave the RSS (as ``experiment lm`` measures).

Held-out cross entropy is pooled over every held-out label (nats per byte), perplexity is its
exp. Results go to ``<out>/results.md`` and ``<out>/results.json``; ``--quick`` shrinks
everything to seconds for CI.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import torch
from torch import nn

from distillkit.data.models import PAD, VOCAB_SIZE
from distillkit.experiments.lm import _proc_status_bytes, topic_splits
from distillkit.losses.fused_linear import fused_linear_kd_loss
from distillkit.trainers.lm import cross_entropy_sum

# (hidden, layers, heads) per model and preset.
TEACHER = {"default": (128, 3, 4), "quick": (32, 1, 2)}
STUDENT = {"default": (48, 2, 2), "quick": (16, 1, 2)}
PROBE_VOCABS = {"default": (VOCAB_SIZE, 32000), "quick": (4096,)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, a few steps, a tenth of the corpus, one seed, 64 "
                             "held-out sequences (seconds; for CI)")
    parser.add_argument("--out", default="runs/hf", help="output directory")
    parser.add_argument("--teacher-steps", type=int, default=500)
    parser.add_argument("--student-steps", type=int, default=250)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--chunk-rows", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: tiny matmuls gain nothing from more, "
                             "and stall when other jobs hold the cores)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars")


def _hf_items(tokens: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """Byte rows (n, S) as the dicts a causal-LM collator makes: padding masked, labels −100."""
    mask = (tokens != PAD).long()
    return [{"input_ids": t.masked_fill(m == 0, 0), "attention_mask": m,
             "labels": t.masked_fill(m == 0, -100)} for t, m in zip(tokens, mask)]


def _llama(shape: Tuple[int, int, int], seq_len: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, layers, heads = shape
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=(8 * hidden) // 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=seq_len + 1, pad_token_id=0, bos_token_id=None,
        eos_token_id=None, tie_word_embeddings=False))


def _arguments(args, out: str, steps: int, seed: int):
    from transformers import TrainingArguments
    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=steps,
        learning_rate=args.lr, weight_decay=0.01, lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20), max_grad_norm=1.0, seed=seed, data_seed=seed,
        use_cpu=True, report_to=[], save_strategy="no", logging_steps=max(1, steps // 5),
        disable_tqdm=not args.progress, dataloader_num_workers=0)


@torch.no_grad()
def held_out_cross_entropy(model: nn.Module, held: List[Dict], chunk_rows: int) -> float:
    """Next-token cross entropy (nats per byte) pooled over every held-out label."""
    model.eval()
    total, labels = 0.0, 0
    for start in range(0, len(held), 32):
        batch = {k: torch.stack([row[k] for row in held[start:start + 32]]) for k in held[0]}
        hidden = model.base_model(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"]).last_hidden_state
        shifted = nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].reshape(-1)
        total += cross_entropy_sum(hidden.reshape(-1, hidden.shape[-1]),
                                   model.get_output_embeddings(), shifted, chunk_rows).item()
        labels += int((shifted != -100).sum())
    return total / labels


def _trl_loss_trainer():
    """A Trainer on TRL's eager GKD loss: both models' full logits, then
    ``GKDTrainer.generalized_jsd_loss`` over the shifted labels, / num_items_in_batch."""
    from transformers import Trainer
    from trl.experimental.gkd import GKDTrainer

    class TRLLossTrainer(Trainer):
        loss_is_scaled_for_ga = True

        def __init__(self, *a, teacher_model, beta, temperature, **kw):
            super().__init__(*a, **kw)
            self.teacher, self.beta, self.temperature = teacher_model, beta, temperature

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            feed = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            student_logits = model(**feed).logits[:, :-1]
            with torch.no_grad():
                teacher_logits = self.teacher(**feed).logits[:, :-1]
            loss = GKDTrainer.generalized_jsd_loss(
                student_logits, teacher_logits, labels=inputs["labels"][:, 1:], beta=self.beta,
                temperature=self.temperature, num_items_in_batch=num_items_in_batch)
            return (loss, None) if return_outputs else loss

    return TRLLossTrainer


def _train(trainer) -> Dict[str, float]:
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"train_s": seconds}


def _loss_step_probe(mode: str, n: int, c: int, h: int, ht: int, chunk_rows: int) -> Dict:
    """Peak bytes and seconds of one loss step (head + loss, forward and backward) above its
    inputs: ``"fused"`` is :func:`fused_linear_kd_loss` with the teacher as hidden states +
    head, ``"trl"`` TRL's ``generalized_jsd_loss`` (β = 0) on both models' full logits."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    hidden = torch.randn(1, n, h, requires_grad=True)
    weight = (torch.randn(c, h) * h ** -0.5).requires_grad_()
    teacher_hidden = torch.randn(1, n, ht)
    teacher_weight = torch.randn(c, ht) * ht ** -0.5
    labels = torch.randint(0, c, (1, n))
    if mode == "trl":
        from trl.experimental.gkd import GKDTrainer
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark restarts at the current RSS (Linux >= 4.0)
    base = _proc_status_bytes("VmRSS")
    start = time.perf_counter()
    if mode == "fused":
        loss = fused_linear_kd_loss(hidden, weight, teacher_hidden=teacher_hidden,
                                    teacher_weight=teacher_weight, labels=labels,
                                    chunk_rows=chunk_rows, divergence="forward_kl",
                                    scale_by_t2=False)
    else:
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.t()
        loss = GKDTrainer.generalized_jsd_loss(hidden @ weight.t(), teacher_logits,
                                               labels=labels, beta=0.0)
    loss.backward()
    return {"peak_bytes": _proc_status_bytes("VmHWM") - base,
            "seconds": time.perf_counter() - start, "loss": loss.item()}


def _probe(mode: str, *shape) -> Dict:
    code = ("import json, distillkit.experiments.hf as m; "
            f"print(json.dumps(m._loss_step_probe({mode!r}, *{tuple(shape)!r})))")
    # A fresh process per measurement; glibc's pinned mmap threshold unmaps every large
    # freed block, so the RSS follows live memory.
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    from transformers import Trainer
    from distillkit.integrations.transformers import DistillationTrainer

    torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else "default"
    if args.quick:
        args.teacher_steps, args.student_steps = min(args.teacher_steps, 10), min(
            args.student_steps, 5)
        args.seq_len, args.batch_size, args.seeds = min(args.seq_len, 32), min(
            args.batch_size, 8), 1
    total_start = time.perf_counter()
    train_rows, held_rows = topic_splits(args.seq_len, fraction=0.1 if args.quick else 1.0)
    train, held = _hf_items(train_rows.tensors["tokens"]), _hf_items(held_rows.tensors["tokens"])
    if args.quick:
        held = held[:64]
    print(f"corpus: pydoc_data.topics, {len(train)} train / {len(held)} held-out sequences of "
          f"{args.seq_len + 1} bytes")
    out = os.path.join(args.out, "runs")

    teacher = _llama(TEACHER[preset], args.seq_len, seed=1000)
    print(f"teacher {TEACHER[preset]}: {args.teacher_steps} steps of cross entropy")
    timing = _train(Trainer(model=teacher, args=_arguments(args, out, args.teacher_steps, 0),
                            train_dataset=train))
    results = {"teacher": {"ce": held_out_cross_entropy(teacher, held, args.chunk_rows),
                           **timing}}
    teacher.eval().requires_grad_(False)
    steps = args.student_steps
    kd = dict(divergence="forward_kl", temperature=args.temperature, scale_by_t2=False)
    runs = []
    trl_loss_trainer = _trl_loss_trainer()
    for seed in range(args.seeds):
        # The three runs of a seed back to back: they share the machine's load of the moment.
        for name in ("cross entropy", "DistillationTrainer (fused)",
                     "TRL generalized_jsd_loss (eager)"):
            student = _llama(STUDENT[preset], args.seq_len, seed=seed)
            training = _arguments(args, out, steps, seed)
            if name == "cross entropy":
                trainer = Trainer(model=student, args=training, train_dataset=train)
            elif name.startswith("DistillationTrainer"):
                trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training,
                                              train_dataset=train, chunk_rows=args.chunk_rows,
                                              **kd)
            else:
                trainer = trl_loss_trainer(model=student, args=training, train_dataset=train,
                                           teacher_model=teacher, beta=0.0,
                                           temperature=args.temperature)
            record = {"loss": name, "seed": seed, **_train(trainer),
                      "ce": held_out_cross_entropy(student, held, args.chunk_rows)}
            print(f"  seed {seed}, {name}: held-out CE {record['ce']:.4f}")
            runs.append(record)
    step_tokens = args.batch_size * (args.seq_len + 1)
    for record in runs:
        # Positions (padding included) through both models per second of training.
        record["tokens_per_s"] = steps * step_tokens / record["train_s"]

    probes = []
    for c in PROBE_VOCABS[preset]:
        for mode in ("trl", "fused"):
            shape = (step_tokens, c, STUDENT[preset][0], TEACHER[preset][0], args.chunk_rows)
            probes.append({"mode": mode, "vocab": c, **_probe(mode, *shape)})
    table = _markdown_report(args, results, runs, probes, step_tokens, len(held),
                             time.perf_counter() - total_start)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"teacher": results["teacher"], "students": runs, "loss_step": probes}, f,
                  indent=1)
    print(f"wrote {os.path.join(args.out, 'results.md')}")
    return 0


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _markdown_report(args, results, runs, probes, step_tokens, held_sequences, total) -> str:
    import transformers
    import trl
    per_loss: Dict[str, List[dict]] = {}
    for record in runs:
        per_loss.setdefault(record["loss"], []).append(record)

    def spread(values, fmt):
        if len(values) == 1:
            return fmt.format(values[0])
        return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"

    teacher_ce = results["teacher"]["ce"]
    rows = [("teacher " + "x".join(map(str, TEACHER["quick" if args.quick else "default"])),
             "cross entropy", "1", f"{teacher_ce:.4f}", f"{math.exp(teacher_ce):.3f}",
             f"{results['teacher']['train_s']:.0f}", "")]
    for loss, records in per_loss.items():
        ces = [r["ce"] for r in records]
        rows.append(("student " + "x".join(map(str, STUDENT["quick" if args.quick else
                                                            "default"])),
                     loss, str(len(records)), spread(ces, "{:.4f}"),
                     spread([math.exp(x) for x in ces], "{:.3f}"),
                     spread([r["train_s"] for r in records], "{:.0f}"),
                     spread([r["tokens_per_s"] for r in records], "{:.0f}")))
    probe_rows = [(p["mode"].replace("trl", "TRL generalized_jsd_loss, full logits").replace(
        "fused", f"fused_linear_kd_loss, chunk_rows={args.chunk_rows}"), str(p["vocab"]),
        f"{p['peak_bytes'] / 2 ** 20:.1f}", f"{p['seconds']:.3f}", f"{p['loss']:.6f}")
        for p in probes]
    return "\n".join([
        f"{'**--quick run (CI smoke test, not a result)** ' if args.quick else ''}"
        f"transformers {transformers.__version__}, trl {trl.__version__}, torch "
        f"{torch.__version__}, {args.threads} threads, fp32. Teacher {args.teacher_steps} steps, "
        f"students {args.student_steps} steps, batch {args.batch_size} x {args.seq_len + 1} "
        f"bytes, AdamW lr {args.lr:g} cosine; distillation: forward KL, T = "
        f"{args.temperature:g}, no hard term. Held-out: {held_sequences} sequences (every "
        "10th pydoc topic); cross entropy in nats per byte, pooled over labels; mean ± std "
        "over seeds.",
        "",
        _table(("model", "loss", "seeds", "held-out CE", "perplexity", "train s", "tokens/s"),
               rows),
        "",
        f"One loss step, student hidden states to gradients (lm head + loss, forward and "
        f"backward), N = {step_tokens} tokens (one batch), student H = "
        f"{STUDENT['quick' if args.quick else 'default'][0]}, teacher H = "
        f"{TEACHER['quick' if args.quick else 'default'][0]}, fp32, 1 thread, fresh process "
        "each; peak RSS above the inputs:",
        "",
        _table(("loss", "vocab", "peak MiB", "seconds", "loss value"), probe_rows),
        "",
        f"Total {total:.0f} s.",
    ])
