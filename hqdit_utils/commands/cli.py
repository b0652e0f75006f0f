"""The ``hqdit`` command line.

Each module that owns a job registers its own sub-command through an ``add_parser(subparsers)``
function, so the code that runs a job and the flags that drive it live side by side. Only the module of the
sub-command being run is imported: ``hqdit --help`` lists the sub-commands from :data:`COMMANDS` alone
(``tests/test_package_layout.py`` checks that each module registers its name with the same one-line help).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .cli_common import EXIT_ERROR, CommandParser, run_command

#: sub-command -> (module that defines ``add_parser(subparsers)`` registering it, its one-line help).
COMMANDS = {
    "train-embedded": ("hqdit_utils.runs.train_embedded", "train the embedded DiT and its proxy classifier (resumable)"),
    "quantize": ("hqdit_utils.commands.quantize_cli", "calibrate and quantize a DiT with a named recipe; save state + plan"),
    "sample": ("hqdit_utils.commands.sample_cli", "write class-conditional samples to an ADM .npz (resumable, torchrun-aware)"),
    "evaluate": ("hqdit_utils.commands.evaluate",
                 "FID, sFID, IS, precision/recall of a sample .npz against a reference .npz"),
    "reproduce": ("hqdit_utils.commands.reproduce",
                  "full-scale tables on DiT-XL/2: print the plan, then run it resumably (torchrun-aware)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``hqdit`` parser: with ``command`` (a key of :data:`COMMANDS`) that sub-command's full parser, its
    module imported; otherwise every sub-command by name and help only (nothing imported)."""
    parser = CommandParser(
        prog="hqdit",
        description=(
            "FP4 post-training quantization of Diffusion Transformers (HQ-DiT, reproduced). "
            "Every command runs on the embedded model by default; pass --model PATH for DiT-XL/2 weights."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).add_parser(sub)
    else:
        for name, (_, help_line) in COMMANDS.items():
            sub.add_parser(name, help=help_line)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``hqdit`` with ``argv`` (default: the process's); returns the exit code (2: an expected error,
    printed as one line on stderr)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
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
