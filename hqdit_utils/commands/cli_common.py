"""What every ``hqdit`` sub-command shares: expected errors as one line, the model and device checks.

An *expected* error — a missing or damaged file, a device this machine lacks, an output folder that would
be overwritten, a bad flag — is printed as one line ``hqdit <cmd>: error: <what happened> (<what to do>)``
on stderr, with exit code 2 and no traceback (:func:`run_command`; argparse's own errors take the same
form through :class:`CommandParser`). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ..config import ProfileError
from ..errors import QuantizationError, SamplingError, WeightsError
from ..dit.models import ENV_WEIGHTS, check_device, load_dit

__all__ = ["CliError", "EXIT_ERROR", "CommandParser", "one_line", "with_fix", "run_command", "require_device",
           "weights_source", "load_model"]

#: Exit code of every expected error (argparse's own code for usage errors).
EXIT_ERROR = 2

#: Where to get DiT-XL/2 weights, in one line.
_DOWNLOAD = ("download: huggingface-cli download facebook/DiT-XL-2-256 --local-dir DiT-XL-2-256, "
             "or wget https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt")


class CliError(Exception):
    """An expected error of a sub-command; its message says what happened and, in parentheses, what to do."""


#: The exceptions a sub-command reports as one line: its own, and the package's typed file/model errors.
EXPECTED_ERRORS = (CliError, WeightsError, QuantizationError, SamplingError, FileNotFoundError, ProfileError)


def one_line(err: BaseException | str) -> str:
    """The message of ``err`` on one line (line breaks and indentation collapsed to single spaces)."""
    return " ".join(str(err).split())


def with_fix(err: BaseException | str, fix: str) -> CliError:
    """A :class:`CliError` of ``err``'s one-line message, ``(fix)`` appended unless it already ends with one."""
    msg = one_line(err)
    return CliError(msg if msg.endswith(")") else f"{msg} ({fix})")


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line naming the command and ``--help``."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def run_command(prog: str, func, args: argparse.Namespace) -> int:
    """Run a sub-command's function; an expected error becomes one line on stderr and exit code 2."""
    try:
        return int(func(args) or 0)
    except EXPECTED_ERRORS as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_ERROR


def require_device(device: str) -> torch.device:
    """``device`` if this machine has it, else :class:`CliError` naming the flag to change."""
    try:
        return check_device(device)
    except RuntimeError as err:
        raise CliError(f"{one_line(err).split('. ')[0]} (pass --device cpu)") from None


def weights_source(value: str | None, flag: str, default: str | None = "embedded") -> tuple[str, str]:
    """The model source of a command and where it came from: ``flag``'s value, else ``$HQDIT_DIT_WEIGHTS``,
    else ``default`` (``None``: no default — :class:`CliError` naming ``flag`` and the variable)."""
    if value:
        return str(value), flag
    env = os.environ.get(ENV_WEIGHTS)
    if env:
        return env, f"${ENV_WEIGHTS}"
    if default is None:
        raise CliError(f"no DiT weights given (pass {flag} PATH or set ${ENV_WEIGHTS}; {_DOWNLOAD})")
    return default, "default"


def load_model(value: str | None, flag: str, *, default: str | None = "embedded", **kwargs):
    """``(bundle, source)``: :func:`~hqdit_utils.dit.models.load_dit` on :func:`weights_source`, a missing path
    reported with the flag (or variable) it came from; ``source`` is ``"embedded"`` or an absolute path."""
    source, origin = weights_source(value, flag, default)
    if source != "embedded" and not Path(source).expanduser().exists():
        raise CliError(f"DiT weights not found: {source} (from {origin}) does not exist (pass {flag} PATH or set "
                       f"${ENV_WEIGHTS} to a diffusers folder or an original DiT .pt; {_DOWNLOAD})")
    if source != "embedded":
        source = str(Path(source).expanduser().resolve())
        if (Path(source) / "quant_config.json").is_file():
            raise CliError(f"{source} (from {origin}) is a quantized-model folder, not FP32 weights (use hqdit sample "
                           f"--quantized {source}; {flag} names the FP32 model, e.g. the one it was quantized from)")
    return load_dit(source, **kwargs), source
