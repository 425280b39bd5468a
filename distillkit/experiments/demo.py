"""Distill an MLP teacher into a small MLP student on scikit-learn's digits.

``python -m distillkit demo``: a teacher MLP (64→256→256→10) is trained on the
full training split; a student (64→32→10) is then trained on a small *transfer
set* (the first ``--transfer-size`` training examples) and on the full split,
with plain cross entropy (no teacher) and with forward-KL distillation (T²
scaled, no hard term) at several temperatures, every student for the same
number of optimizer steps. Each student configuration is run with several
seeds; the table reports test accuracy (mean ± std over seeds), the training
time per model and the parameter count. Soft labels carry the most extra
information when labelled data is scarce, so the gap is largest on the
transfer set; at T = 1 the teacher is nearly one-hot on its own training
examples, so distilling there is close to plain cross entropy.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import List, Optional, Tuple

import torch
from torch.utils.data import Dataset, Subset

from distillkit.data import count_parameters, load_digits_splits, mlp
from distillkit.trainers import KDConfig, KDTrainer

TEACHER_HIDDEN = (256, 256)
STUDENT_HIDDEN = (32,)
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=3, help="student runs per configuration")
    parser.add_argument("--transfer-size", type=int, default=100,
                        help="training examples the small-data students see")
    parser.add_argument("--teacher-epochs", type=int, default=40)
    parser.add_argument("--student-steps", type=int, default=800,
                        help="optimizer steps per student, whatever its training set size")
    parser.add_argument("--device", default="cpu")
    # Tiny MLPs gain nothing from intra-op threads, and OpenMP threads that wait
    # on a core busy with other work stall every step.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the train/val/test split")


BATCH_SIZE = 32


def _train(args, model, train: Dataset, val: Dataset, test: Dataset, epochs: int, lr: float,
           seed: int, teacher=None, loss: Optional[KDConfig] = None) -> Tuple[float, float]:
    """Train ``model``; return (test accuracy, training seconds)."""
    trainer = KDTrainer(model, train, teacher=teacher, eval_data=val, loss=loss,
                        optimizer=lambda p: torch.optim.Adam(p, lr=lr), epochs=epochs,
                        batch_size=BATCH_SIZE, device=args.device, seed=seed,
                        progress=args.progress)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    return trainer.evaluate(test)["accuracy"], seconds


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    total_start = time.perf_counter()
    splits = load_digits_splits(seed=args.split_seed)
    if not 1 <= args.transfer_size <= len(splits.train):
        raise SystemExit(
            f"--transfer-size must be in [1, {len(splits.train)}] (got {args.transfer_size})"
        )
    n, c = splits.num_features, splits.num_classes

    torch.manual_seed(args.split_seed)
    teacher = mlp(n, TEACHER_HIDDEN, c, dropout=0.2)
    print(f"teacher {n}-{'-'.join(map(str, TEACHER_HIDDEN))}-{c} on {len(splits.train)} examples")
    teacher_acc, teacher_s = _train(args, teacher, splits.train, splits.val, splits.test,
                                    args.teacher_epochs, 1e-3, seed=args.split_seed)
    rows: List[Tuple[str, int, str, List[float], List[float], int]] = [
        ("teacher", len(splits.train), "cross entropy", [teacher_acc], [teacher_s],
         count_parameters(teacher))
    ]

    transfer = Subset(splits.train, range(args.transfer_size))
    settings = [(transfer, None)] + [(transfer, KDConfig(temperature=t)) for t in TEMPERATURES]
    settings += [(splits.train, None), (splits.train, KDConfig(temperature=4.0))]
    for train, loss in settings:
        name = "cross entropy" if loss is None else f"KD T={loss.temperature:g}"
        # Equal step budgets, so small-set students are not undertrained (soft
        # targets at high T take longer to fit than one-hot labels).
        epochs = math.ceil(args.student_steps / math.ceil(len(train) / BATCH_SIZE))
        print(f"student {name} on {len(train)} examples, {epochs} epochs, {args.seeds} seeds")
        accs, secs = [], []
        for seed in range(args.seeds):
            torch.manual_seed(1000 + seed)
            student = mlp(n, STUDENT_HIDDEN, c)
            acc, s = _train(args, student, train, splits.val, splits.test, epochs,
                            3e-3, seed=seed, teacher=None if loss is None else teacher, loss=loss)
            accs.append(acc)
            secs.append(s)
        rows.append(("student", len(train), name, accs, secs, count_parameters(student)))

    print()
    print(_table(rows, len(splits.test)))
    print(f"\ntotal {time.perf_counter() - total_start:.1f} s "
          f"({args.threads} thread{'s' * (args.threads > 1)}, device {args.device})")
    return 0


def _table(rows, test_size: int) -> str:
    header = ("model", "train n", "loss", "params", f"test acc (n={test_size})", "train s/model")
    lines = []
    for model, size, loss, accs, secs, params in rows:
        spread = f" ± {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
        lines.append((model, str(size), loss, str(params),
                      f"{statistics.mean(accs):.3f}{spread}", f"{statistics.mean(secs):.2f}"))
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]

    def fmt(row) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()

    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in lines])
