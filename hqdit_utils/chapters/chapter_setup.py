"""The chapters' shared setup: one call opens a chapter (book style, profile, embedded model, optionally the
shared calibration) and :func:`say` glues a sentence chosen by the data.

Every chapter starts with ``prof, bundle, calib = open_chapter(...)`` and writes each interpreting sentence
through ``say(name, text)`` (shown with ``{glue:md}`name``` in the prose), so the sentence is computed from the
executed cell, never typed in.
"""
from __future__ import annotations

import pandas as pd

from ..config import profile
from ..runs.experiments import cached_calibrate
from ..dit.models import load_dit
from .plotting import use_book_style


def say(name: str, text: str) -> None:
    """Glue the Markdown sentence ``text`` under ``name``, for use as ``{glue:md}`name``` in the prose."""
    from IPython.display import Markdown  # deferred: the book's dependencies, not the package's
    from myst_nb import glue

    glue(name, Markdown(text), display=False)


def open_chapter(*, calibration: bool = False, wide_tables: bool = False) -> tuple:
    """The book's figure style, the active profile and the embedded model, for the first cell of a chapter.

    Args:
        calibration: also return the calibration the chapters share (``cached_calibrate`` with the profile's
            sizes and seed 0: one run for the whole book).
        wide_tables: show table cells in full (``display.max_colwidth`` unlimited).

    Returns:
        ``(profile, bundle, calibration or None)``.
    """
    use_book_style()
    if wide_tables:
        pd.set_option("display.max_colwidth", None)
    prof = profile()
    bundle = load_dit("embedded")
    calib = cached_calibrate(bundle, profile=prof.name, seed=0) if calibration else None
    return prof, bundle, calib
