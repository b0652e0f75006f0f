"""The ``hqdit`` command line.

Each module that owns a job registers its own sub-command through an ``add_parser(subparsers)``
function, so the code that runs a job and the flags that drive it live side by side.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .cli_common import EXIT_ERROR, CommandParser, run_command
#: module name -> it defines ``add_parser(subparsers)`` that registers one or more sub-commands.
COMMAND_MODULES = [
    "hqdit_utils.train_embedded",
    "hqdit_utils.quantize_cli",
    "hqdit_utils.sample_cli",
    "hqdit_utils.metrics.evaluate",
    "hqdit_utils.reproduce",
]


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="hqdit",
        description=(
            "FP4 post-training quantization of Diffusion Transformers (HQ-DiT, reproduced). "
            "Every command runs on the embedded model by default; pass --model PATH for DiT-XL/2 weights."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``hqdit`` with ``argv`` (default: the process's); returns the exit code (2: an expected error,
    printed as one line on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error, already printed as one line (2)
        return int(stop.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    return run_command(f"hqdit {args.command}", args.func, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
