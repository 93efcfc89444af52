"""The ``transferbench`` command line: one thin subcommand per pipeline stage.

Each subcommand parses its arguments, loads ``params.yaml`` through
``transferbench.config`` and calls one typed function that holds the logic. Stage
modules are imported lazily so ``transferbench --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from transferbench.config import load_settings
from transferbench.errors import TransferbenchError

# name -> (one-line help, function that adds arguments, function that runs it)
Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register a subcommand; the decorated function runs it and returns an exit code."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, arguments, run)
        return run

    return register


def _check_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")


@command("check-params", "validate params.yaml and print the resolved settings", _check_params_arguments)
def _check_params(args: argparse.Namespace) -> int:
    settings = load_settings(args.params)
    if not args.quiet:
        print(f"{args.params}: ok (study {settings.study.name!r}: "
              f"{len(settings.study.tasks)} tasks x {len(settings.study.backbones)} backbones x "
              f"{len(settings.study.seeds)} seeds)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transferbench",
        description="Reproducible ConvNets-vs-Transformers transfer study (DVC, Ray Train, MLflow, Optuna).")
    parser.add_argument("--params", default="params.yaml", help="path to params.yaml (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for name, (help_text, arguments, run) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        arguments(child)
        child.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except TransferbenchError as exc:
        print(f"transferbench {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
