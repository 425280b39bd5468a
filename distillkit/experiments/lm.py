"""Distil a byte-level transformer LM into a smaller one on Python's own documentation.

``python -m distillkit experiment lm``: the corpus is ``pydoc_data.topics.topics``,
the language reference topics that ship with every CPython (about 466 kB of
English and code; nothing is downloaded). Topics are split, not positions: every
10th topic (sorted by name, from the 6th) is held out. Texts are byte-tokenized
(:func:`distillkit.data.models.byte_sequences`, windows of ``--seq-len`` + 1 tokens, the
last window of each topic right-padded).

A teacher :class:`~distillkit.data.models.ByteTransformer` is trained with cross
entropy; then one student architecture, from the same initialisation and data
order, for the same number of steps, is trained (a) with plain next-token cross
entropy and (b) by fused linear KD from the teacher (forward KL at ``--temperature``
plus a hard-label term of weight ``--hard-weight``). The table reports held-out
cross entropy (nats/byte), perplexity and bits per byte, training time and
tokens/s. A second table measures the peak memory of one forward + backward of
the loss alone at a vocabulary-sized head (C = ``--mem-vocab``, H = ``--mem-hidden``,
N = ``--mem-rows`` rows, fp32, teacher given as hidden states + its own head):
``fused_linear_kd_loss`` at two chunk sizes against the unfused
``kd_loss(h Wᵀ, h_t W_tᵀ)``. On CPU each measurement runs in a fresh subprocess
and reports its peak resident set size (``VmHWM``, reset with ``/proc/self/clear_refs``
once the inputs exist) above the RSS at that point, with glibc's mmap threshold
pinned so that freed tensors leave the RSS (time from a second, unpinned run;
``--quick`` skips it); on CUDA, ``torch.cuda.max_memory_allocated`` above the inputs.
Results go to ``<out>/results.md`` and ``<out>/history.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import torch
from pydoc_data.topics import topics

from distillkit.data import DictDataset, count_parameters
from distillkit.losses.functional import kd_loss
from distillkit.losses.fused_linear import fused_linear_kd_loss
from distillkit.data.models import PAD, ByteTransformer, byte_sequences
from distillkit.trainers import KDConfig, LMDistillationTrainer

# (dim, layers, heads) per model and preset.
TEACHER = {"default": (128, 4, 4), "quick": (32, 1, 2)}
STUDENT = {"default": (64, 2, 2), "quick": (16, 1, 1)}
MEM_CHUNKS = (256, 1024)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, a few steps, a tenth of the corpus (seconds; for tests)")
    parser.add_argument("--out", default="runs/lm", help="output directory")
    parser.add_argument("--teacher-steps", type=int, default=500)
    parser.add_argument("--student-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--hard-weight", type=float, default=0.5)
    parser.add_argument("--amp", choices=("bf16", "none"), default="bf16",
                        help="autocast dtype of the model bodies (heads and loss stay fp32)")
    parser.add_argument("--mem-vocab", type=int, default=32000)
    parser.add_argument("--mem-hidden", type=int, default=256)
    parser.add_argument("--mem-rows", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars")


def topic_splits(seq_len: int, fraction: float = 1.0) -> Tuple[DictDataset, DictDataset]:
    """Train and held-out token sets: every 10th topic from the 6th (sorted) is held out.

    ``fraction`` < 1 keeps only the first that share of topics (quick runs).
    """
    names = sorted(topics)
    names = names[:max(20, int(len(names) * fraction))]
    held = [topics[n] for i, n in enumerate(names) if i % 10 == 5]
    train = [topics[n] for i, n in enumerate(names) if i % 10 != 5]
    return (DictDataset(tokens=byte_sequences(train, seq_len + 1)),
            DictDataset(tokens=byte_sequences(held, seq_len + 1)))


def _cosine_with_warmup(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _train(args, model, train, held, steps, teacher=None, loss=None):
    trainer = LMDistillationTrainer(
        model, train, teacher=teacher, eval_data=held, loss=loss,
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, weight_decay=0.01),
        scheduler=_cosine_with_warmup(steps, max(1, steps // 20)), steps=steps,
        batch_size=args.batch_size, max_grad_norm=1.0, pad_id=PAD,
        amp_dtype=torch.bfloat16 if args.amp == "bf16" else None,
        eval_every=max(1, steps // 5), device=args.device, seed=args.seed,
        progress=args.progress)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    return trainer, seconds


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _memory_probe(mode: str, chunk_rows: int, n: int, c: int, h: int, device: str) -> Dict:
    """Peak bytes of one forward + backward of the loss alone, above its inputs."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dev = torch.device(device)
    hidden = torch.randn(n, h, device=dev, requires_grad=True)
    weight = (torch.randn(c, h, device=dev) * h ** -0.5).requires_grad_()
    teacher_hidden = torch.randn(n, h, device=dev)
    teacher_weight = torch.randn(c, h, device=dev) * h ** -0.5
    labels = torch.randint(0, c, (n,), device=dev)
    options = dict(temperature=2.0, hard_weight=0.5, labels=labels)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        # Reset the high-water mark to the current RSS (Linux ≥ 4.0): importing
        # torch peaks above what the loss adds, and ru_maxrss cannot be reset.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_bytes("VmRSS")
    start = time.perf_counter()
    if mode == "fused":
        loss = fused_linear_kd_loss(hidden, weight, teacher_hidden=teacher_hidden,
                                    teacher_weight=teacher_weight, chunk_rows=chunk_rows,
                                    **options)
    else:
        loss = kd_loss(hidden @ weight.t(), teacher_hidden @ teacher_weight.t(), **options)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = _proc_status_bytes("VmHWM")
    return {"peak_bytes": peak - base, "seconds": time.perf_counter() - start,
            "loss": loss.item()}


def _measure_memory(args) -> List[Tuple[str, Dict]]:
    n, c, h = args.mem_rows, args.mem_vocab, args.mem_hidden
    configs = [("unfused", n)] + [("fused", k) for k in MEM_CHUNKS if k < n]
    rows = []
    for mode, chunk in configs:
        code = ("import json, distillkit.experiments.lm as m; "
                f"print(json.dumps(m._memory_probe({mode!r}, {chunk}, {n}, {c}, {h}, "
                f"{args.device!r})))")

        def probe(env):
            # A fresh process each: the high-water mark only resets to the current RSS.
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                 text=True, env={**os.environ, **env}).stdout
            return json.loads(out.strip().splitlines()[-1])

        # glibc's adaptive mmap threshold keeps freed large blocks in the heap, so
        # RSS would count dead chunks; pinned, every large tensor is unmapped when
        # freed and RSS follows live memory. Timing runs unpinned (page faults).
        memory = probe({"MALLOC_MMAP_THRESHOLD_": "65536"})
        if not args.quick:
            memory["seconds"] = probe({})["seconds"]
        rows.append((mode if mode == "unfused" else f"fused, chunk_rows={chunk}", memory))
    return rows


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    preset = "quick" if args.quick else "default"
    if args.quick:
        args.teacher_steps, args.student_steps = min(args.teacher_steps, 30), min(
            args.student_steps, 20)
        args.seq_len, args.batch_size = min(args.seq_len, 32), min(args.batch_size, 8)
        args.mem_vocab, args.mem_rows, args.mem_hidden = 4096, 1024, 64
    total_start = time.perf_counter()
    train, held = topic_splits(args.seq_len, fraction=0.1 if args.quick else 1.0)
    tokens = int((train.tensors["tokens"][:, 1:] != PAD).sum())
    print(f"corpus: pydoc_data.topics, {len(train)} train / {len(held)} held-out sequences "
          f"of {args.seq_len + 1} tokens ({tokens} train tokens)")

    def model(shape):
        dim, layers, heads = shape
        return ByteTransformer(dim=dim, layers=layers, heads=heads, max_len=args.seq_len)

    torch.manual_seed(args.seed)
    teacher = model(TEACHER[preset])
    print(f"teacher {TEACHER[preset]} ({count_parameters(teacher)} parameters), "
          f"{args.teacher_steps} steps")
    teacher_trainer, teacher_s = _train(args, teacher, train, held, args.teacher_steps)
    results = [("teacher", teacher, "cross entropy", args.teacher_steps, teacher_trainer,
                teacher_s)]
    kd = KDConfig(temperature=args.temperature, hard_weight=args.hard_weight)
    for name, loss in [("cross entropy", None),
                       (f"fused linear KD (forward KL, T={kd.temperature:g}, "
                        f"hard weight {kd.hard_weight:g})", kd)]:
        torch.manual_seed(args.seed + 1)  # both students start from the same weights
        student = model(STUDENT[preset])
        print(f"student {STUDENT[preset]} ({count_parameters(student)} parameters), {name}")
        trainer, seconds = _train(args, student, train, held, args.student_steps,
                                  teacher=None if loss is None else teacher, loss=loss)
        results.append(("student", student, name, args.student_steps, trainer, seconds))

    print(f"memory: one loss step at C={args.mem_vocab}, H={args.mem_hidden}, "
          f"N={args.mem_rows}, fp32")
    memory = _measure_memory(args)
    total = time.perf_counter() - total_start

    setup = (f"{args.threads} thread{'s' * (args.threads > 1)}, device {args.device}, "
             f"amp {args.amp}, torch {torch.__version__}, seed {args.seed}")
    table = _tables(results, memory, args, len(held), total, setup)
    print("\n" + table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump({f"{r[0]} / {r[2]}": r[4].history for r in results}, f, indent=1)
    print(f"wrote {os.path.join(args.out, 'results.md')}")
    return 0


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _tables(results, memory, args, held_sequences: int, total: float, setup: str) -> str:
    header = ("model", "params", "loss", "steps", "held-out CE (nats/byte)", "perplexity",
              "bits/byte", "train s", "tokens/s")
    rows = []
    for model_name, model, loss, steps, trainer, seconds in results:
        final = trainer.history[-1]
        speed = sum(h["tokens_per_s"] for h in trainer.history) / len(trainer.history)
        rows.append((model_name, str(count_parameters(model)), loss, str(steps),
                     f"{final['eval_loss']:.4f}", f"{final['eval_perplexity']:.3f}",
                     f"{final['eval_loss'] / math.log(2):.3f}", f"{seconds:.1f}",
                     f"{speed:.0f}"))
    mem_header = ("loss", "peak memory above inputs (MiB)", "time (s)", "loss value")
    mem_rows = [(name, f"{m['peak_bytes'] / 2 ** 20:.1f}", f"{m['seconds']:.3f}",
                 f"{m['loss']:.6f}") for name, m in memory]
    return "\n".join([
        f"Held-out split: {held_sequences} sequences of {args.seq_len + 1} bytes "
        f"(every 10th pydoc topic); batch {args.batch_size}; {setup}.",
        "",
        _markdown(header, rows),
        "",
        f"One forward + backward of the loss alone, C = {args.mem_vocab}, "
        f"H = {args.mem_hidden}, N = {args.mem_rows} rows, fp32, teacher as hidden "
        "states + head, forward KL T = 2 with hard weight 0.5:",
        "",
        _markdown(mem_header, mem_rows),
        "",
        f"Total {total:.0f} s.",
    ])
