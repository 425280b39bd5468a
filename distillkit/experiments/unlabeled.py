"""Distillation with unlabeled examples on digits: vanilla KD vs weighted distillation vs SLaM.

``python -m distillkit experiment unlabeled``: the protocol of the SLaM paper at
small scale, on scikit-learn's 8×8 digits. Per seed, the data are split into a
test set (25%), a labelled validation set V (about ``--val-size`` examples) and
the rest; the first n of the rest (n in ``--sizes``) are the labelled set the
teacher (an MLP 64→128→10) is trained on, and the others, labels removed, are the
unlabeled pool. The teacher labels the pool (soft labels at ``--temperature``)
and three students (MLP 64→32→10, same initialization) train on it:

* vanilla: forward KL to the teacher's soft labels (``KDTrainer``);
* weighted: a first student trained like vanilla, then a new one from the same
  initialization with per-example weights from ESTIMATEWEIGHTS on V
  (``WeightedDistillationTrainer``, ``retrain=True``), each for ``--student-epochs``;
* SLaM: student-label mixing with α(x), k(x) estimated on V (``SLaMTrainer``).

V is used only by the weighted and SLaM estimators, never as training data. The
smaller n, the weaker (noisier) the teacher. Results, written to ``--out``:
``results.md`` (mean ± std test accuracy over seeds per labelled-set size, the
per-seed paired difference of each method against vanilla, and a pool diagnostic:
each student's accuracy on the pool rows the teacher labels wrongly and rightly,
with the pool's true labels used for nothing else), ``results.csv`` (every run)
and ``unlabeled.png`` (test accuracy against labelled-set size).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from distillkit.data import DictDataset, load_digits_splits, mlp
from distillkit.trainers import KDConfig, KDTrainer, SLaMTrainer, WeightedDistillationTrainer
from distillkit.trainers.pool import predict_logits

TEACHER_HIDDEN = (128,)
STUDENT_HIDDEN = (32,)
TEACHER_BATCH = 32
STUDENT_BATCH = 64
# (column key, table / legend name); the teacher first, then the students.
METHODS = (("teacher", "teacher"), ("vanilla", "vanilla KD"), ("weighted", "weighted KD"),
           ("slam", "SLaM"))
DIGITS = 1797


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200],
                        help="labelled-set sizes the teacher is trained on")
    parser.add_argument("--seeds", type=int, default=5, help="runs per size (split and inits)")
    parser.add_argument("--val-size", type=int, default=200, help="labelled validation set V")
    parser.add_argument("--teacher-steps", type=int, default=300,
                        help="optimizer steps of the teacher, whatever its labelled-set size")
    parser.add_argument("--student-epochs", type=int, default=30,
                        help="epochs over the pool per student (the weighted method trains two)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="temperature of the teacher's soft labels (vanilla KD and SLaM)")
    parser.add_argument("--out", default=os.path.join("runs", "unlabeled"),
                        help="output directory for results.md, results.csv, unlabeled.png")
    parser.add_argument("--quick", action="store_true",
                        help="a seconds-long smoke run: one size, one seed, few steps")
    parser.add_argument("--device", default="cpu")
    # Tiny MLPs gain nothing from intra-op threads (see `demo`).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars")


def _run_one(args, seed: int, size: int) -> Dict[str, float]:
    """One (seed, labelled-set size): test accuracies and pool diagnostics.

    Keys: ``teacher``, ``vanilla``, ``weighted``, ``slam`` (test accuracy),
    ``teacher_pool`` (the teacher's accuracy on the pool) and ``<student>_fixed`` /
    ``<student>_kept`` (the student's pool accuracy where the teacher is wrong /
    right; NaN when there is no such row).
    """
    splits = load_digits_splits(seed=seed, val_fraction=args.val_size / DIGITS,
                                test_fraction=0.25)
    x, y = splits.train.tensors["input"], splits.train.tensors["label"]
    labelled = DictDataset(input=x[:size], label=y[:size])
    pool = DictDataset(input=x[size:])  # no labels: the students never see them
    pool_labels = y[size:]  # for the diagnostics only
    n, c = splits.num_features, splits.num_classes
    common = dict(device=args.device, seed=seed, progress=args.progress)

    torch.manual_seed(1000 + seed)
    teacher = mlp(n, TEACHER_HIDDEN, c)
    teacher_trainer = KDTrainer(
        teacher, labelled, epochs=math.ceil(args.teacher_steps / math.ceil(size / TEACHER_BATCH)),
        batch_size=TEACHER_BATCH, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), **common)
    teacher_trainer.fit()
    acc = {"teacher": teacher_trainer.evaluate(splits.test)["accuracy"]}
    teacher_right = predict_logits(teacher, pool, args.device).argmax(1) == pool_labels
    acc["teacher_pool"] = teacher_right.double().mean().item()

    epochs = args.student_epochs
    student_args = dict(batch_size=STUDENT_BATCH,
                        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3), **common)
    makers = {
        "vanilla": lambda s: KDTrainer(
            s, pool, teacher=teacher, loss=KDConfig(temperature=args.temperature,
                                                    scale_by_t2=False),
            epochs=epochs, **student_args),
        "weighted": lambda s: WeightedDistillationTrainer(
            s, pool, teacher=teacher, val_data=splits.val, epochs=2 * epochs,
            first_epochs=epochs, **student_args),
        "slam": lambda s: SLaMTrainer(
            s, pool, teacher=teacher, val_data=splits.val, temperature=args.temperature,
            epochs=epochs, **student_args),
    }
    for name, make in makers.items():
        torch.manual_seed(2000 + seed)  # the same student initialization for every method
        trainer = make(mlp(n, STUDENT_HIDDEN, c))
        trainer.fit()
        acc[name] = trainer.evaluate(splits.test)["accuracy"]
        right = predict_logits(trainer.student, pool, args.device).argmax(1) == pool_labels
        acc[f"{name}_fixed"] = right[~teacher_right].double().mean().item()
        acc[f"{name}_kept"] = right[teacher_right].double().mean().item()
    return acc


def _mean_std(values: Sequence[float]) -> str:
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"


def _markdown(results: Dict[int, List[Dict[str, float]]],
              columns: Sequence[Tuple[str, Callable[[Dict[str, float]], float]]]) -> str:
    """A markdown table: one row per labelled-set size, mean ± std over seeds of each column."""
    header = ["labelled n"] + [name for name, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size, runs in sorted(results.items()):
        cells = [str(size)] + [_mean_std([value(r) for r in runs]) for _, value in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _tables(results: Dict[int, List[Dict[str, float]]]) -> str:
    names = dict(METHODS)
    students = [key for key, _ in METHODS if key != "teacher"]
    accuracy = [(name, lambda r, key=key: r[key]) for key, name in METHODS]
    accuracy += [(f"{names[key]} − vanilla", lambda r, key=key: r[key] - r["vanilla"])
                 for key in students if key != "vanilla"]
    pool = [("teacher", lambda r: r["teacher_pool"])]
    pool += [(f"{names[key]} {part}", lambda r, key=key, part=part: r[f"{key}_{part}"])
             for part in ("fixed", "kept") for key in students]
    return ("Test accuracy; the last columns are per-seed paired differences.\n\n"
            + _markdown(results, accuracy)
            + "\n\nOn the pool (labels used only here): the teacher's accuracy; each student's "
            "accuracy on the rows the teacher gets wrong (fixed) and right (kept).\n\n"
            + _markdown(results, pool))


def _plot(results: Dict[int, List[Dict[str, float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (key, name) in enumerate(METHODS):
        runs = [[r[key] for r in results[s]] for s in sizes]
        means = [statistics.mean(v) for v in runs]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in runs]
        # Nudged sideways so that overlapping error bars stay readable.
        shift = 1 + 0.03 * (i - (len(METHODS) - 1) / 2)
        ax.errorbar([s * shift for s in sizes], means, yerr=stds, label=name, capsize=3,
                    marker="o", linestyle="--" if key == "teacher" else "-")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("labelled examples the teacher is trained on")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("Distillation with unlabeled examples (digits)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.sizes, args.seeds, args.teacher_steps, args.student_epochs = [50], 1, 30, 2
    if args.seeds < 1 or args.teacher_steps < 1 or args.student_epochs < 1:
        raise SystemExit("--seeds, --teacher-steps and --student-epochs must be >= 1")
    if not 1 <= args.val_size < DIGITS // 2:
        raise SystemExit(f"--val-size must be in [1, {DIGITS // 2}) (got {args.val_size})")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: Dict[int, List[Dict[str, float]]] = {size: [] for size in args.sizes}
    rows = []
    for seed in range(args.seeds):
        for size in args.sizes:
            acc = _run_one(args, seed, size)
            results[size].append(acc)
            rows.append({"seed": seed, "labelled": size, **acc})
            print(f"seed {seed} n={size}: test accuracy "
                  + ", ".join(f"{name} {acc[key]:.3f}" for key, name in METHODS), flush=True)
    seconds = time.perf_counter() - start

    os.makedirs(args.out, exist_ok=True)
    table = _tables(results)
    settings = (f"digits, |V| ≈ {args.val_size}, {args.seeds} seed(s), teacher MLP "
                f"64-{'-'.join(map(str, TEACHER_HIDDEN))}-10 ({args.teacher_steps} steps), "
                f"students MLP 64-{'-'.join(map(str, STUDENT_HIDDEN))}-10 "
                f"({args.student_epochs} epochs), T = {args.temperature:g}; "
                f"{seconds:.0f} s on {args.threads} thread(s), device {args.device}")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Mean ± std over seeds; {settings}.\n\n{table}\n")
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(results, os.path.join(args.out, "unlabeled.png"))
    print(f"\n{table}\n\n{settings}\nwrote {args.out}/results.md, results.csv, unlabeled.png")
    return 0
