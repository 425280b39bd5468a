"""Experiments that reproduce a paper's protocol at small scale: ``python -m distillkit experiment <name>``.

Each experiment is a module with a docstring (its first line is the help text),
``add_arguments(parser)`` and ``run(args) -> int``, listed in :data:`EXPERIMENTS`.
"""
from __future__ import annotations

import argparse

from distillkit.experiments import hf, kdzero, l2t, lm, unlabeled

EXPERIMENTS = {"unlabeled": unlabeled, "kdzero": kdzero, "lm": lm, "l2t": l2t, "hf": hf}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment", required=True, metavar="experiment")
    for name, module in EXPERIMENTS.items():
        module.add_arguments(sub.add_parser(
            name, help=module.__doc__.strip().splitlines()[0], description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter))


def run(args: argparse.Namespace) -> int:
    return EXPERIMENTS[args.experiment].run(args)
