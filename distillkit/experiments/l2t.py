"""L2T-DLN and the learned (L2L) optimizer on digits or MNIST-1D: a learned loss vs CE, an LSTM optimizer vs SGD/Adam.

``python -m distillkit experiment l2t``: both methods of docs/math.md §9.3–9.4 at small scale, on
scikit-learn's 8×8 digits (1077 train / 270 validation / 450 test, split seed 0), or with
``--dataset mnist1d`` on the MNIST-1D benchmark of ``experiment unlabeled`` (split seed 0:
the first ``--labelled`` labelled examples train, validation 500, test 3000), where (a)'s
student is an MLP 40→32→10 (``--cnn``: a CNN 2×16 channels,
:func:`distillkit.data.mnist1d.cnn1d`, about 10× the cost) and (b)'s tasks are MLPs
40→16→10. What follows says digits' sizes.

(a) **Learned loss.** A student MLP 64→32→10 trains for ``--iterations × --unroll``
    SGD steps (lr ``--student-lr``, batch ``--batch-size``) with
    * cross entropy,
    * a fixed DLN: the dynamic loss network fitted to the 1-vs-1 binary cross
      entropy −log s_y − log(1 − s_c) (:func:`distillkit.methods.dln.imitate`) and never
      changed — the learned loss's starting point,
    * L2T-DLN (:class:`distillkit.trainers.L2TDLNTrainer`): the same DLN, adjusted by
      the LSTM teacher from validation batches (K = ``--unroll`` steps per iteration).
    Per seed the three students share the initialization and the sequence of training
    batches; L2T-DLN alone also sees the validation split (as the teacher's signal).
    Scored on the test split.
(b) **Learned optimizer.** A :class:`distillkit.methods.learned_optimizer.CoordinateLSTM` (2 × 20,
    head, p = 10, output scale 0.1) is meta-trained with :func:`meta_train` (Adam 1e-3,
    unrolls of ``--opt-unroll``, ``--opt-steps`` steps per task) on tasks "MLP
    64→16→10 from a fresh init, CE on minibatches of 128 of the training split" (as
    L2L's MNIST task). It is then run as a :class:`distillkit.LearnedOptimizer` on
    held-out tasks (new inits, minibatches of the test split) for ``--eval-steps``
    steps, against SGD and Adam whose learning rates are picked from a grid by the mean held-out loss at step
    ``--opt-steps`` (picked on the held-out tasks themselves, which favours them).

Written to ``--out``: ``results.md`` (both tables), ``students.png`` (test accuracy
over student steps) and ``optimizer.png`` (meta-training curve; held-out loss curves).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.data import BatchCycler, DictDataset, load_digits_splits, mlp
from distillkit.data.mnist1d import cnn1d, mnist1d_splits
from distillkit.methods.dln import DynamicLossNetwork, imitate
from distillkit.methods.learned_optimizer import CoordinateLSTM, LearnedOptimizer, meta_train, module_task
from distillkit.trainers.l2t import L2TDLNTrainer

STUDENT_HIDDEN = (32,)
TASK_HIDDEN = (16,)
TASK_BATCH = 128
SGD_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
ADAM_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
METHODS = ("cross entropy", "fixed DLN", "L2T-DLN")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=("digits", "mnist1d"), default="digits")
    parser.add_argument("--labelled", type=int, default=1000,
                        help="mnist1d: labelled training examples")
    parser.add_argument("--cnn", action="store_true",
                        help="mnist1d: (a)'s student is a CNN 2×16 channels instead of an MLP")
    parser.add_argument("--seeds", type=int, default=3, help="students per method in (a)")
    parser.add_argument("--iterations", type=int, default=100,
                        help="L2T-DLN iterations; every student gets iterations × unroll steps")
    parser.add_argument("--unroll", type=int, default=15, help="K: student steps per iteration")
    parser.add_argument("--student-lr", type=float, default=0.1)
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--val-batch-size", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=10,
                        help="iterations between test evaluations (the curves)")
    parser.add_argument("--meta-steps", type=int, default=300,
                        help="Adam steps on the learned optimizer's LSTM in (b)")
    parser.add_argument("--opt-unroll", type=int, default=20, help="truncated-BPTT unroll in (b)")
    parser.add_argument("--opt-steps", type=int, default=100,
                        help="optimizee steps per meta-training task in (b)")
    parser.add_argument("--eval-steps", type=int, default=200,
                        help="steps of each held-out run in (b) (beyond --opt-steps: "
                             "generalization in time)")
    parser.add_argument("--held-out", type=int, default=5, help="held-out tasks in (b)")
    parser.add_argument("--opt-seeds", type=int, default=3,
                        help="LSTM optimizers meta-trained from different inits in (b)")
    parser.add_argument("--out", default=os.path.join("runs", "l2t"), help="output directory")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars")


def _mean_std(values: Sequence[float], digits: int = 3) -> str:
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def _accuracy(model: nn.Module, data: DictDataset) -> float:
    with torch.no_grad():
        logits = model(data.tensors["input"])
    return float((logits.argmax(1) == data.tensors["label"]).float().mean())


# ---- (a) learned loss ------------------------------------------------------------------

def _sgd_student(student: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 batches: BatchCycler, steps: int, lr: float, eval_every_steps: int,
                 test: DictDataset) -> List[float]:
    """Plain SGD on ``loss_fn(logits, labels)``; test accuracy every ``eval_every_steps``."""
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    curve = []
    for step in range(1, steps + 1):
        x, y = next(batches)
        loss = loss_fn(student(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every_steps == 0 or step == steps:
            curve.append(_accuracy(student, test))
    return curve


def _student(args, n: int, c: int) -> nn.Module:
    """(a)'s student: MLP n→32→c, or with ``--cnn`` on MNIST-1D a CNN 2×16 channels."""
    return cnn1d(16, 2, 32, c, n) if _cnn(args) else mlp(n, STUDENT_HIDDEN, c)


def _cnn(args) -> bool:
    return args.dataset == "mnist1d" and args.cnn


def _student_name(args, n: int, c: int) -> str:
    return ("CNN 2×16 ch" if _cnn(args) else
            f"MLP {n}-{'-'.join(map(str, STUDENT_HIDDEN))}-{c}")


def _learned_loss_runs(args, splits) -> Tuple[Dict[str, List[List[float]]], Dict[str, float]]:
    """Per method, one test-accuracy curve per seed; per method, seconds per student."""
    n, c = splits.num_features, splits.num_classes
    steps = args.iterations * args.unroll
    every = args.eval_every * args.unroll
    curves: Dict[str, List[List[float]]] = {m: [] for m in METHODS}
    seconds = {m: 0.0 for m in METHODS}
    train = splits.train.tensors
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        init = _student(args, n, c).state_dict()
        dln = DynamicLossNetwork()
        imitate(dln, generator=torch.Generator().manual_seed(seed))
        for method in METHODS:
            start = time.perf_counter()
            student = _student(args, n, c)
            student.load_state_dict(init)
            if method == "L2T-DLN":
                trainer = L2TDLNTrainer(
                    student, splits.train, splits.val, dln=dln, eval_data=splits.test,
                    unroll=args.unroll, student_lr=args.student_lr, teacher_lr=args.teacher_lr,
                    batch_size=args.batch_size, val_batch_size=args.val_batch_size,
                    iterations=args.iterations, eval_every=args.eval_every, seed=seed,
                    progress=args.progress)
                curve = [r["eval_accuracy"] for r in trainer.fit() if "eval_accuracy" in r]
            else:
                fixed = dln.flat_weights()
                loss_fn = F.cross_entropy if method == "cross entropy" else (
                    lambda z, y, phi=fixed: dln.functional_loss(phi, z, y))
                batches = BatchCycler(train["input"], train["label"], args.batch_size, seed)
                curve = _sgd_student(student, loss_fn, batches, steps, args.student_lr, every,
                                     splits.test)
            seconds[method] += (time.perf_counter() - start) / args.seeds
            curves[method].append(curve)
            print(f"seed {seed} {method}: test accuracy {curve[-1]:.3f}", flush=True)
    return curves, seconds


def _students_table(curves, seconds, test_size: int) -> str:
    lines = [f"| student loss | test acc (n={test_size}) | Δ vs cross entropy (paired) | "
             "s / student |", "|---|--:|--:|--:|"]
    ce = [c[-1] for c in curves["cross entropy"]]
    for method in METHODS:
        final = [c[-1] for c in curves[method]]
        delta = [a - b for a, b in zip(final, ce)]
        lines.append(f"| {method} | {_mean_std(final)} | {_mean_std(delta)} | "
                     f"{seconds[method]:.1f} |")
    return "\n".join(lines)


# ---- (b) learned optimizer -----------------------------------------------------------------

def _task_model(seed: int, n: int, c: int) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(n, TASK_HIDDEN, c)


def _loss_curve(model: nn.Module, optimizer: torch.optim.Optimizer, data: DictDataset,
                steps: int, seed: int) -> List[float]:
    """Minibatch training; the full-data loss before each step and after the last
    (``steps + 1`` values), inf from the first non-finite one on."""
    x, y = data.tensors["input"], data.tensors["label"]
    batches = BatchCycler(x, y, TASK_BATCH, seed)
    curve = []
    for _ in range(steps):
        with torch.no_grad():
            curve.append(float(F.cross_entropy(model(x), y)))
        if not math.isfinite(curve[-1]):
            return curve + [math.inf] * (steps + 1 - len(curve))
        xb, yb = next(batches)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    with torch.no_grad():
        curve.append(float(F.cross_entropy(model(x), y)))
    return curve


def _optimizer_runs(args, splits):
    n, c = splits.num_features, splits.num_classes
    train = splits.train.tensors

    def make_task(i: int):
        return module_task(_task_model(i, n, c), train["input"], train["label"],
                           batch_size=TASK_BATCH, seed=i)

    # Meta-training is chaotic: Adam's normalized steps turn rounding-level differences
    # in near-zero meta-gradient components into whole steps, so one LSTM is not a
    # result; several are meta-trained from different inits and all are reported.
    lstms, histories = [], []
    start = time.perf_counter()
    for seed in range(args.opt_seeds):
        torch.manual_seed(seed)
        lstm = CoordinateLSTM((20, 20), head=True, preprocess_p=10.0, output_scale=0.1)
        histories.append(meta_train(lstm, make_task, unroll=args.opt_unroll,
                                    steps_per_task=args.opt_steps, meta_steps=args.meta_steps,
                                    lr=1e-3, progress=args.progress))
        lstms.append(lstm)
    meta_seconds = time.perf_counter() - start
    history = histories[0]
    held_out = [10_000 + i for i in range(args.held_out)]

    def run(factory) -> List[List[float]]:
        out = []
        for seed in held_out:
            model = _task_model(seed, n, c)
            out.append(_loss_curve(model, factory(model.parameters()), splits.test,
                                   args.eval_steps, seed))
        return out

    def at_horizon(curves):
        return statistics.mean(cv[min(args.opt_steps, args.eval_steps)] for cv in curves)

    results = {f"learned (L2L), meta-seed {seed}":
               (None, run(lambda p, m=m: LearnedOptimizer(p, m))) for seed, m in enumerate(lstms)}
    for name, cls, grid in (("SGD", torch.optim.SGD, SGD_GRID), ("Adam", torch.optim.Adam,
                                                                 ADAM_GRID)):
        tried = {lr: run(lambda p, lr=lr: cls(p, lr=lr)) for lr in grid}
        best = min(grid, key=lambda lr: at_horizon(tried[lr]))
        results[name] = (best, tried[best])
    print(f"meta-training: {args.opt_seeds} LSTMs x {len(history)} meta-steps over "
          f"{history[-1]['task'] + 1} tasks ({meta_seconds:.0f} s)", flush=True)
    return history, results, meta_seconds


def _optimizer_table(results, args) -> str:
    """Mean ± std over the held-out tasks of the full-data loss at a few steps (3 digits)."""
    steps = sorted({t for t in (10, 25, 50, args.opt_steps, args.eval_steps)
                    if t <= args.eval_steps})
    lines = ["| optimizer | " + " | ".join(f"loss at step {t}" for t in steps) + " |",
             "|---|" + "--:|" * len(steps)]
    for name, (lr, curves) in results.items():
        label = f"{name} (lr {lr:g})" if lr is not None else name
        cells = []
        for t in steps:
            values = [cv[t] for cv in curves]
            spread = f" ± {statistics.stdev(values):.2g}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3g}{spread}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- plots -------------------------------------------------------------------------------

def _plot_students(curves, args, path: str, student: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    every = args.eval_every * args.unroll
    for method in METHODS:
        points = min(len(cv) for cv in curves[method])
        mean = [statistics.mean(cv[i] for cv in curves[method]) for i in range(points)]
        steps = [min((i + 1) * every, args.iterations * args.unroll) for i in range(points)]
        ax.plot(steps, mean, marker=".", label=method)
    ax.set_xlabel("student SGD steps")
    ax.set_ylabel(f"test accuracy (mean of {args.seeds} seeds)")
    ax.set_title(f"{args.dataset}, {student}: learned loss vs cross entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_optimizer(history, results, args, path: str, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    losses = [h["meta_loss"] for h in history]
    window = max(1, len(losses) // 20)
    smooth = [statistics.mean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
    left.plot(range(1, len(losses) + 1), losses, color="0.75", linewidth=0.8, label="per unroll")
    left.plot(range(1, len(losses) + 1), smooth, label=f"running mean ({window})")
    left.set_xlabel("meta-step (one unroll)")
    left.set_ylabel("meta-loss Σ f(θ_t) / K")
    left.set_title("meta-training the LSTM optimizer")
    left.grid(alpha=0.3)
    left.legend()
    for name, (lr, curves) in results.items():
        mean = [statistics.mean(cv[t] for cv in curves) for t in range(len(curves[0]))]
        right.plot(mean, label=name if lr is None else f"{name} (lr {lr:g})")
    right.axvline(args.opt_steps, color="k", linestyle=":", linewidth=1,
                  label="meta-training horizon")
    right.set_yscale("log")
    right.set_xlabel("optimizee step")
    right.set_ylabel(f"full-data loss (mean of {args.held_out} held-out tasks)")
    right.set_title(f"held-out tasks: {task}, batch {TASK_BATCH}")
    right.grid(alpha=0.3)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.seeds, args.iterations, args.unroll, args.eval_every = 2, 2, 3, 1
        args.meta_steps, args.opt_unroll, args.opt_steps, args.eval_steps = 4, 5, 10, 12
        args.held_out, args.opt_seeds = 2, 2
    if min(args.seeds, args.iterations, args.unroll, args.eval_every, args.meta_steps,
           args.opt_unroll, args.opt_steps, args.eval_steps, args.held_out, args.opt_seeds) < 1:
        raise SystemExit("counts and steps must be >= 1")
    if args.opt_steps % args.opt_unroll:
        raise SystemExit("--opt-steps must be a multiple of --opt-unroll")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    splits = (load_digits_splits(seed=0) if args.dataset == "digits"
              else mnist1d_splits(0, args.labelled, 0)[0])
    n, c = splits.num_features, splits.num_classes
    task = f"MLP {n}-{'-'.join(map(str, TASK_HIDDEN))}-{c}"

    curves, seconds = _learned_loss_runs(args, splits)
    students = _students_table(curves, seconds, len(splits.test))
    print(f"\n{students}\n", flush=True)
    history, results, meta_seconds = _optimizer_runs(args, splits)
    optimizer = _optimizer_table(results, args)
    print(f"\n{optimizer}\n", flush=True)
    total = time.perf_counter() - start

    settings_a = (
        f"{args.dataset} (split seed 0: {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test); student {_student_name(args, n, c)}, "
        f"{args.iterations * args.unroll} SGD steps (lr {args.student_lr}, batch "
        f"{args.batch_size}), {args.seeds} seeds (init, batch order, DLN fit); L2T-DLN: "
        f"{args.iterations} iterations × K = {args.unroll}, validation batch "
        f"{args.val_batch_size}, teacher LSTM 2-64-64-64-1 (s = −1e-3, Adam "
        f"{args.teacher_lr})")
    settings_b = (
        f"tasks: {task} from a fresh init, CE on "
        f"minibatches of {TASK_BATCH} (meta-training: the train split; held-out: "
        f"{args.held_out} tasks on the test split, new inits; curves: the full split's "
        f"loss); {args.opt_seeds} LSTMs 2×20 + head (init seeds 0..{args.opt_seeds - 1}), "
        f"p = 10, s = 0.1, each {args.meta_steps} meta-steps (Adam 1e-3), unroll {args.opt_unroll}, "
        f"{args.opt_steps} steps per task ({meta_seconds:.0f} s); SGD grid {SGD_GRID}, "
        f"Adam grid {ADAM_GRID}, picked by held-out loss at step "
        f"{min(args.opt_steps, args.eval_steps)}")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"## (a) Learned loss (L2T-DLN) vs cross entropy\n\n{students}\n\n"
                f"Settings: {settings_a}.\n\n"
                f"## (b) Learned optimizer (L2L) vs SGD and Adam\n\n{optimizer}\n\n"
                f"Settings: {settings_b}.\n\n{total:.0f} s in all on {args.threads} "
                f"thread(s).\n")
    _plot_students(curves, args, os.path.join(args.out, "students.png"), _student_name(args, n, c))
    _plot_optimizer(history, results, args, os.path.join(args.out, "optimizer.png"), task)
    print(f"{total:.0f} s; wrote {args.out}/results.md, students.png, optimizer.png")
    return 0
