"""End to end (issue 15): one optimizer step of ``LMDistillationTrainer`` against the same
step written with TRL's eager loss, bf16 autocast, at V = 32000 and 128256.

The step, for both: a batch of B sequences of S + 1 tokens from tiny random Llama models
built from configs (nothing downloaded), the teacher's forward pass (no grad) and the
student's forward pass under ``torch.autocast(bfloat16)``, the JSD (β = 0.5, T = 1,
TRL's conventions: no T², mean over the tokens), backward, an AdamW step.

- ``distillkit``: ``LMDistillationTrainer.train_step`` — the backbones under autocast, the
  lm heads fused into ``fused_linear_kd_loss`` (fp32 heads, logits never materialised);
- ``trl``: the models' own forward passes (full (B, S, V) logits of both, the heads under
  autocast too, as a Trainer with ``bf16=True`` runs them), then
  ``GKDTrainer.generalized_jsd_loss(student[:, :-1], teacher[:, :-1], labels, beta=0.5)``.

Each (V, provider) runs in a fresh process: tokens/s is the predicted tokens of a step
over the median step time (after a warm-up step), peak memory the process's peak RSS over
the timed steps (reset through ``/proc/self/clear_refs`` before them) less the RSS before
(models, optimizer state and the batch). Both providers train the same student from the
same batch; the first step's losses are printed beside TRL's loss on the same logits cast
to fp32: TRL's step forms its loss from bf16 logits in bf16 (a Trainer with ``bf16=True``
runs the heads under autocast), whose log-probabilities near log V carry errors of the
size of a small JSD; ours runs fp32 heads.

    python benchmarks/bench_lm_step.py [--quick] [--threads 2] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch

from harness import CpuMeter, cpu_flags

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
FULL = dict(vocabs=[32000, 128256], batch=4, seq=256, teacher_hidden=512, student_hidden=256,
            layers=2, steps=3)
QUICK = dict(vocabs=[500], batch=2, seq=16, teacher_hidden=32, student_hidden=16, layers=1,
             steps=2)
PROVIDERS = ["distillkit", "trl"]


def _models(vocab: int, cfg: Dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(hidden: int, seed: int):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=cfg["layers"], num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=cfg["seq"] + 1))

    return llama(cfg["teacher_hidden"], 0), llama(cfg["student_hidden"], 1)


def worker(job: Dict) -> Dict:
    """One (vocab, provider): step times, peak memory and the first step's loss."""
    torch.set_num_threads(job["threads"])
    cfg, vocab = job["cfg"], job["vocab"]
    teacher, student = _models(vocab, cfg)
    teacher.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, vocab, (cfg["batch"], cfg["seq"] + 1), generator=gen)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    predicted = cfg["batch"] * cfg["seq"]
    from trl.experimental.gkd.gkd_trainer import GKDTrainer
    labels = tokens[:, 1:]
    # The loss of the first step in fp32: TRL's loss on the autocast models' logits cast to
    # fp32 (TRL's own step forms it from the bf16 logits, in bf16).
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        s_logits, t_logits = (m(input_ids=tokens).logits[:, :-1] for m in (student, teacher))
    fp32_loss = float(GKDTrainer.generalized_jsd_loss(s_logits.float(), t_logits.float(),
                                                      labels=labels, beta=0.5))
    del s_logits, t_logits

    if job["provider"] == "distillkit":
        from distillkit.data import DictDataset
        from distillkit.trainers import KDConfig, LMDistillationTrainer
        # Every step reads the same batch (one global batch in the data set).
        data = DictDataset(tokens=tokens, labels=tokens)
        trainer = LMDistillationTrainer(
            student, data, teacher=teacher, optimizer=optimizer,
            loss=KDConfig(divergence="jsd", beta=0.5, temperature=1.0, scale_by_t2=False),
            steps=cfg["steps"] + 1, batch_size=cfg["batch"], chunk_rows=256,
            amp_dtype=torch.bfloat16, progress=False)
        step = trainer.train_step
    else:
        def step() -> float:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.no_grad():
                    t_logits = teacher(input_ids=tokens).logits
                s_logits = student(input_ids=tokens).logits
            loss = GKDTrainer.generalized_jsd_loss(s_logits[:, :-1], t_logits[:, :-1],
                                                   labels=labels, beta=0.5)
            loss.backward()
            optimizer.step()
            return float(loss.detach())

    first_loss = step()  # warm-up (allocator, oneDNN primitives), and the loss to compare
    times = []

    def timed_steps():
        for _ in range(cfg["steps"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)

    peak, extra = CpuMeter().peak_bytes(timed_steps)
    median = statistics.median(times)
    return dict(provider=job["provider"], vocab=vocab, first_loss=first_loss, fp32_loss=fp32_loss,
                median_s=median, min_s=min(times), tokens_per_s=predicted / median,
                extra_MB=extra / 1e6, peak_MB=peak / 1e6, steps=len(times))


def _cpu() -> str:
    flags = cpu_flags(("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))
    return f"{CpuMeter().machine()}; flags: {' '.join(flags)}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=None, help="markdown file to write the table to")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    cfg = QUICK if args.quick else FULL
    rows = []
    for vocab in cfg["vocabs"]:
        for provider in PROVIDERS:
            job = dict(provider=provider, vocab=vocab, cfg=cfg, threads=args.threads)
            out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)],
                                 stdout=subprocess.PIPE, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"V={vocab} {provider}: {rows[-1]['tokens_per_s']:.0f} tokens/s, "
                  f"{rows[-1]['extra_MB']:.0f} MB extra", flush=True)
    import transformers
    import trl
    load = os.getloadavg()
    lines = [f"## LM distillation step, bf16 autocast: {_cpu()}, {args.threads} threads, torch "
             f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}",
             "",
             f"Llama teacher H = {cfg['teacher_hidden']}, student H = {cfg['student_hidden']}, "
             f"{cfg['layers']} layers each, batch {cfg['batch']} x {cfg['seq']} predicted tokens, "
             f"JSD beta = 0.5, AdamW; median of {cfg['steps']} steps after a warm-up step.",
             "",
             "| V | provider | tokens/s | median s/step | min s/step | extra MB (peak) | "
             "first-step loss | same, TRL's loss on fp32 logits | distillkit speed-up | memory ratio |",
             "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for vocab in cfg["vocabs"]:
        mine = next(r for r in rows if r["vocab"] == vocab and r["provider"] == "distillkit")
        for r in (x for x in rows if x["vocab"] == vocab):
            speed = r["median_s"] / mine["median_s"]
            mem = mine["extra_MB"] / max(r["extra_MB"], 1e-9)
            lines.append(f"| {vocab} | {r['provider']} | {r['tokens_per_s']:.0f} | "
                         f"{r['median_s']:.3f} | {r['min_s']:.3f} | {r['extra_MB']:.0f} | "
                         f"{r['first_loss']:.5f} | {r['fp32_loss']:.5f} | {speed:.2f} | {mem:.3f} |")
    lines += ["", "distillkit speed-up: the row's median step time over distillkit's; memory "
              "ratio: distillkit's extra peak memory over the row's.",
              f"Load average when the run ended: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
              "(1 / 5 / 15 min); 2-core machine."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
