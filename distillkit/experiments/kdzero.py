"""KD-Zero on digits or MNIST-1D: search a distiller for a teacher–student pair; compare with vanilla KD and plain CE.

``python -m distillkit experiment kdzero``: the KD-Zero protocol at small scale
(docs/math.md §9.5), with the loss ``CE + distiller`` on a small labelled set.

* ``--dataset digits`` (default): scikit-learn's 8×8 digits. A teacher MLP
  (64→256→256→10) is trained on the full training split; the student (MLP 64→32→10)
  trains on a small labelled transfer set (the first ``--transfer-size`` training
  examples), where soft labels matter most (see ``demo``).
* ``--dataset mnist1d``: the MNIST-1D benchmark of ``experiment unlabeled`` (split seed
  ``--split-seed``, test 3000, validation 500): the teacher (CNN 3×32 channels, the same
  training as there, hence the same teacher for the same seed and size) and the student
  (CNN 2×16 channels) both train on the first ``--labelled`` labelled examples.

1. Search: :func:`distillkit.methods.kdzero.search` evolves distillers of the student's
   logits (``--feature``: also of its hidden layer, through a linear connector to the
   teacher's width). A candidate's fitness is the mean validation accuracy of
   ``--proxy-seeds`` students trained ``--proxy-steps`` steps with it (the seeds,
   hence weights and batch orders, are the same for every candidate).
2. Retrain: the ``--top`` best distillers, the best of the random first population
   (what random search alone finds), vanilla KD (T = 4, ``CE + T²·KL``) and no
   distillation (``CE``) each train ``--seeds`` students for ``--final-steps`` steps
   (new seeds, shared across methods, so differences are paired) and are scored on
   the test split, which the search never saw.

Written to ``--out``: ``results.md`` (the table, the best formula, search counts),
``fitness.png`` (fitness over rounds), ``best_distiller.json``, ``search.jsonl``
(every candidate) and ``checkpoint.json`` (``--resume`` continues an interrupted
search).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from distillkit.data import DictDataset, load_digits_splits, mlp
from distillkit.data.mnist1d import cnn1d, mnist1d_splits
from distillkit.experiments.unlabeled import train_teacher
from distillkit.methods.kdzero import Distiller, ProxyTask, SearchResult, SearchSpace, search
from distillkit.methods.kdzero.proxy import Diverged
from distillkit.trainers import KDTrainer

TEACHER_HIDDEN = (256, 256)
STUDENT_HIDDEN = (32,)
BATCH_SIZE = 32
VANILLA_KD = Distiller((), "kl_t4", 1.0)
CE_NAME, KD_NAME = "no distillation (CE)", "vanilla KD (T = 4)"
# Final students use seeds apart from the proxy's, so the search's own runs are not reused.
FINAL_SEED = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=("digits", "mnist1d"), default="digits")
    parser.add_argument("--labelled", type=int, default=1000,
                        help="mnist1d: labelled examples of teacher and student")
    parser.add_argument("--teacher-steps", type=int, default=1000,
                        help="mnist1d: the teacher's AdamW steps (as in experiment unlabeled)")
    parser.add_argument("--population", type=int, default=20, help="search population (>= 10)")
    parser.add_argument("--rounds", type=int, default=60, help="search rounds after the first")
    parser.add_argument("--children", type=int, default=3,
                        help="offspring per round (plus one fresh random member)")
    parser.add_argument("--max-transforms", type=int, default=3, help="longest transform chain")
    parser.add_argument("--feature", action="store_true",
                        help="let distillers use the hidden feature as well as the logits")
    parser.add_argument("--transfer-size", type=int, default=100,
                        help="labelled training examples the student sees")
    parser.add_argument("--proxy-steps", type=int, default=200,
                        help="optimizer steps of a candidate's proxy training")
    parser.add_argument("--proxy-seeds", type=int, default=2,
                        help="proxy runs per candidate (fitness: their mean accuracy)")
    parser.add_argument("--final-steps", type=int, default=800,
                        help="optimizer steps of each retrained student")
    parser.add_argument("--seeds", type=int, default=5, help="retrained students per method")
    parser.add_argument("--top", type=int, default=3, help="best distillers to retrain")
    parser.add_argument("--teacher-epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0,
                        help="search seed (its choices; proxy students use seeds "
                             "seed … seed + proxy-seeds − 1)")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the train/val/test split and of the teacher")
    parser.add_argument("--out", default=os.path.join("runs", "kdzero"),
                        help="output directory")
    parser.add_argument("--resume", action="store_true",
                        help="continue the search from --out/checkpoint.json")
    parser.add_argument("--quick", action="store_true",
                        help="a seconds-long smoke run: a short search and few, short retrains")
    # Tiny MLPs gain nothing from intra-op threads (see `demo`).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bar")


def _epochs(steps: int, n: int) -> int:
    return math.ceil(steps / math.ceil(n / BATCH_SIZE))


def _retrain(task: ProxyTask, distiller: Optional[Distiller], seeds: int, epochs: int,
             test) -> Tuple[List[Optional[float]], float]:
    """Test accuracies (None: diverged) of ``seeds`` students, and seconds per student."""
    accs: List[Optional[float]] = []
    start = time.perf_counter()
    for seed in range(FINAL_SEED, FINAL_SEED + seeds):
        trainer = task.trainer(distiller, seed=seed, epochs=epochs)
        try:
            trainer.fit()
        except Diverged:
            accs.append(None)
            continue
        accs.append(trainer.evaluate(test)["accuracy"])
    return accs, (time.perf_counter() - start) / seeds


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "—"
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread}"


def _markdown(rows, teacher_acc: float, test_size: int) -> str:
    header = ["student loss", "formula", "proxy val acc", f"test acc (n={test_size})",
              "Δ vs vanilla KD (paired)", "s / student"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|--:|--:|--:|--:|",
             f"| teacher (CE) | — | — | "
             f"{teacher_acc:.3f} | — | — |"]
    vanilla = next(accs for name, _, _, accs, _ in rows if name == KD_NAME)
    for name, formula, proxy, accs, seconds in rows:
        done = [a for a in accs if a is not None]
        diverged = f" ({len(accs) - len(done)} diverged)" if len(done) < len(accs) else ""
        deltas = [a - b for a, b in zip(accs, vanilla) if a is not None and b is not None]
        lines.append(f"| {name} | `{formula}` | {proxy} | {_mean_std(done)}{diverged} | "
                     f"{_mean_std(deltas)} | {seconds:.2f} |")
    return "\n".join(lines)


def _plot(result: SearchResult, baselines: Dict[str, float], path: str, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    # Broken candidates score near chance (0.1); the axis shows the contest near the
    # top, with the candidates below it counted in the legend.
    low = min([h["mean"] for h in result.history] + list(baselines.values())) - 0.05
    fits = [(h["round"], f) for h in result.history for f in h["fitnesses"]]
    below = sum(f < low for _, f in fits)
    ax.scatter([r for r, _ in fits], [max(f, low) for _, f in fits], s=9, color="0.6", alpha=0.6,
               label=f"new candidate ({below} below the axis, drawn at its foot)")
    rounds = [h["round"] for h in result.history]
    ax.plot(rounds, [h["best"] for h in result.history], marker=".", label="population best")
    ax.plot(rounds, [h["mean"] for h in result.history], label="population mean")
    for (name, value), style in zip(baselines.items(), ("--", ":")):
        ax.axhline(value, color="k", linestyle=style, linewidth=1, label=name)
    ax.set_xlabel("round (0 = random initial population)")
    ax.set_ylabel("fitness: proxy validation accuracy")
    ax.set_ylim(low, None)
    ax.set_title(f"KD-Zero search on {dataset}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.population, args.rounds, args.children = 10, 2, 2
        args.proxy_steps, args.proxy_seeds, args.final_steps, args.seeds, args.top = 8, 1, 16, 2, 1
        args.teacher_epochs, args.teacher_steps, args.labelled = 2, 20, min(args.labelled, 200)
    if min(args.seeds, args.top, args.proxy_steps, args.proxy_seeds, args.final_steps,
           args.teacher_epochs) < 1:
        raise SystemExit("--seeds, --top, --proxy-steps, --proxy-seeds, --final-steps and "
                         "--teacher-epochs must be >= 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    if args.dataset == "digits":
        splits = load_digits_splits(seed=args.split_seed)
        if not 1 <= args.transfer_size <= len(splits.train):
            raise SystemExit(f"--transfer-size must be in [1, {len(splits.train)}] "
                             f"(got {args.transfer_size})")
        n, c = splits.num_features, splits.num_classes
        torch.manual_seed(args.split_seed)
        teacher = mlp(n, TEACHER_HIDDEN, c, dropout=0.2)
        teacher_trainer = KDTrainer(teacher, splits.train, epochs=args.teacher_epochs,
                                    batch_size=BATCH_SIZE, seed=args.split_seed, progress=False,
                                    optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
        teacher_trainer.fit()
        transfer = DictDataset(**{k: v[:args.transfer_size]
                                  for k, v in splits.train.tensors.items()})
        make_student = functools.partial(mlp, n, STUDENT_HIDDEN, c)
        models = (f"teacher MLP 64-{'-'.join(map(str, TEACHER_HIDDEN))}-10 on "
                  f"{len(splits.train)} examples ({args.teacher_epochs} epochs); student MLP "
                  f"64-{'-'.join(map(str, STUDENT_HIDDEN))}-10")
    else:
        splits, _, _ = mnist1d_splits(args.split_seed, args.labelled, 0)
        teacher, teacher_trainer = train_teacher(lambda: cnn1d(32, 3, 128), splits.train,
                                                 args.split_seed, args.teacher_steps, 2e-3)
        transfer = splits.train
        make_student = functools.partial(cnn1d, 16, 2, 32)
        models = (f"teacher CNN 3×32 ch on the {len(transfer)} labelled examples "
                  f"({args.teacher_steps} AdamW steps, as experiment unlabeled); student CNN "
                  f"2×16 ch")
    teacher_acc = teacher_trainer.evaluate(splits.test)["accuracy"]
    print(f"teacher: test accuracy {teacher_acc:.3f}", flush=True)

    task = ProxyTask(teacher, make_student, transfer, splits.val,
                     epochs=_epochs(args.proxy_steps, len(transfer)), batch_size=BATCH_SIZE,
                     seeds=range(args.seed, args.seed + args.proxy_seeds))
    inputs = (("logits", 2),) + ((("feature", 2),) if args.feature else ())
    space = SearchSpace(inputs=inputs, max_transforms=args.max_transforms)
    search_start = time.perf_counter()
    result = search(task, space, population=args.population, rounds=args.rounds,
                    children=args.children, seed=args.seed,
                    log=os.path.join(args.out, "search.jsonl"),
                    checkpoint=os.path.join(args.out, "checkpoint.json"),
                    resume=args.resume, progress=args.progress)
    search_s = time.perf_counter() - search_start
    counts = result.counts
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(result.reasons.items())) or "none"
    search_line = (f"{counts['candidates']} candidates, {counts['evaluated']} distinct "
                   f"evaluated, {counts['rejected']} rejected before training and "
                   f"{counts['diverged']} diverged in training ({reasons}), "
                   f"{counts['synonyms']} synonyms of a member not added")
    best = result.best
    print(f"search ({search_s:.0f} s): {search_line}; best {result.best_evaluation.fitness:.4f}: "
          f"{best.formula()}", flush=True)

    baselines = {CE_NAME: task(None).fitness, KD_NAME: task(VANILLA_KD).fitness}
    methods = [(CE_NAME, None, baselines[CE_NAME]), (KD_NAME, VANILLA_KD, baselines[KD_NAME])]
    # The best of the random first population: what random search alone would give.
    first = result.history[0]
    methods.append((f"best of round 0 (random, {args.population} members)",
                    Distiller.from_dict(first["best_distiller"]), first["best"]))
    methods += [(f"searched #{i + 1}", d, e.fitness)
                for i, (d, e) in enumerate(result.population[:args.top])]
    final_epochs = _epochs(args.final_steps, len(transfer))
    rows = []
    for name, distiller, proxy in methods:
        accs, seconds = _retrain(task, distiller, args.seeds, final_epochs, splits.test)
        formula = "CE(z_s, y)" if distiller is None else f"CE(z_s, y) + {distiller.formula()}"
        rows.append((name, formula, f"{proxy:.3f}", accs, seconds))
        print(f"{name}: test accuracy {_mean_std([a for a in accs if a is not None])}",
              flush=True)
    seconds = time.perf_counter() - start

    table = _markdown(rows, teacher_acc, len(splits.test))
    settings = (
        f"{args.dataset} (split seed {args.split_seed}); {models} on {len(transfer)} "
        f"labelled examples; "
        f"search: population {args.population}, {args.rounds} rounds × ({args.children} "
        f"offspring + 1 random), chains ≤ {args.max_transforms}, outputs "
        f"{', '.join(o for o, _ in inputs)}, proxy {args.proxy_steps} steps × "
        f"{args.proxy_seeds} seed(s), fitness = mean accuracy on {len(splits.val)} validation "
        f"examples; retrain: {args.seeds} seeds × "
        f"{args.final_steps} steps; {seconds:.0f} s in all ({search_s:.0f} s search) on "
        f"{args.threads} thread(s)")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Best distiller: `{best.formula()}` (proxy validation accuracy "
                f"{result.best_evaluation.fitness:.4f})\n\n`{best.to_json()}`\n\n"
                f"Search: {search_line}.\n\n{table}\n\nSettings: {settings}.\n")
    with open(os.path.join(args.out, "best_distiller.json"), "w") as f:
        f.write(best.to_json() + "\n")
    _plot(result, baselines, os.path.join(args.out, "fitness.png"), args.dataset)
    print(f"\n{table}\n\n{settings}\n"
          f"wrote {args.out}/results.md, fitness.png, best_distiller.json, search.jsonl")
    return 0
