"""The `cm-diffusers` command. Each sub-command lives in `cm_diffusers/commands/<name>.py` and exposes
`register(subparsers)`, which adds its parser and sets `func` to the function that runs it."""

import argparse
import importlib
import pkgutil
import sys

from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cm-diffusers", description="Consistency models: one-step generation, zero-shot editing, evaluation."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{module_info.name}").register(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, OSError) as error:
        # Input errors are the user's to fix: print the message, not a stack trace.
        print(f"cm-diffusers {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
