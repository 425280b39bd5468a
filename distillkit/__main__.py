"""Command line: ``python -m distillkit <command> [options]``.

Each command is a module with a docstring (its first line is the help text),
``add_arguments(parser)`` and ``run(args) -> int``; adding a command is adding
its module to :data:`COMMANDS`. ``python -m distillkit <command> --help`` lists
its options.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from distillkit import experiments, info
from distillkit.experiments import demo

COMMANDS = {"demo": demo, "experiment": experiments, "info": info}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillkit",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, module in COMMANDS.items():
        summary = module.__doc__.strip().splitlines()[0]
        command = sub.add_parser(name, help=summary, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
