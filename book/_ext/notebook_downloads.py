"""Sphinx extension of the book: every executable page downloadable as ``.ipynb``, and the student edition.

**Downloads.** Each page written as a MyST notebook (a ``.md`` file whose front matter has a ``kernelspec``) is
converted with jupytext when the book is built, and the notebook is written next to the page in the HTML output
(``notebooks/02_clipping.md`` → ``_build/html/notebooks/02_clipping.ipynb``). The theme's download menu gains an
``.ipynb`` entry for it. The notebook holds the page's cells without outputs: a student runs it from the top.

**Student edition.** With ``HQDIT_STUDENT=1`` in the environment (``make book-student``), or ``student_edition =
True`` in the Sphinx configuration, every exercise's solution (a ``{solution-start}`` … ``{solution-end}`` block)
is removed from the pages, from the ``.ipynb`` downloads and from the ``.md`` sources the book offers; the answer
and check cells stay, so a filled-in answer is still checked when the notebook runs. The student edition reuses
the notebook execution cache of ``make book`` (``_build/.jupyter_cache``): after a normal build it executes nothing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.util import logging

__version__ = "1.0"

STUDENT_ENV = "HQDIT_STUDENT"
#: One solution block of sphinx-exercise's gated form, closing fence included.
SOLUTION = re.compile(r"^```\{solution-start\}.*?^```\{solution-end\}[^\n]*\n```[ \t]*(?:\n|\Z)", re.S | re.M)
FRONT_MATTER = re.compile(r"\A---\n(?P<head>.*?)\n---\n", re.S)

LOGGER = logging.getLogger(__name__)


def is_notebook(text: str) -> bool:
    """True for a MyST notebook: front matter that names a kernel."""
    m = FRONT_MATTER.match(text)
    return bool(m and "kernelspec" in m.group("head"))


def strip_solutions(text: str) -> str:
    """The page without its exercises' solution blocks (everything else, check cells included, unchanged)."""
    return SOLUTION.sub("", text)


def to_ipynb(text: str) -> str:
    """The MyST notebook ``text`` as the JSON of an .ipynb (no outputs), converted by jupytext."""
    import jupytext

    return jupytext.writes(jupytext.reads(text, fmt="md:myst"), fmt="ipynb")


def _page_text(app: Sphinx, docname: str) -> str | None:
    path = Path(app.env.doc2path(docname))
    if path.suffix != ".md" or not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    return strip_solutions(text) if app.config.student_edition else text


def _config_inited(app: Sphinx, config) -> None:
    if os.environ.get(STUDENT_ENV) == "1":
        config.student_edition = True
    if config.student_edition and not getattr(config, "nb_execution_cache_path", None):
        config.nb_execution_cache_path = str(Path(app.srcdir) / "_build" / ".jupyter_cache")


def _source_read(app: Sphinx, docname: str, source: list[str]) -> None:
    if app.config.student_edition:
        source[0] = strip_solutions(source[0])


def _page_context(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Write the page's .ipynb next to its HTML and add it to the theme's download menu."""
    if doctree is None or pagename not in app.env.all_docs:
        return
    text = _page_text(app, pagename)
    if text is None or not is_notebook(text):
        return
    out = Path(app.outdir) / f"{pagename}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_ipynb(text), encoding="utf-8")
    button = {"type": "link", "url": context["pathto"](f"{pagename}.ipynb", 1), "text": ".ipynb",
              "icon": "fas fa-code", "tooltip": "Download this page as a Jupyter notebook",
              "label": "download-ipynb-button"}
    for group in context.get("header_buttons", []):
        if group.get("label") == "download-buttons":
            group["buttons"].insert(0, button)
            return
    LOGGER.warning(f"{pagename}: no download menu to add the .ipynb to (theme option use_download_button?)")


def _build_finished(app: Sphinx, exception) -> None:
    """Student edition: the .md sources the book offers for download lose their solutions too."""
    if exception is not None or not app.config.student_edition:
        return
    for path in (Path(app.outdir) / "_sources").rglob("*.md*"):
        text = path.read_text(encoding="utf-8")
        stripped = strip_solutions(text)
        if stripped != text:
            path.write_text(stripped, encoding="utf-8")


def setup(app: Sphinx):
    app.add_config_value("student_edition", False, "env")
    app.connect("config-inited", _config_inited)
    app.connect("source-read", _source_read)
    app.connect("html-page-context", _page_context, priority=502)  # after the theme builds its menu (501)
    app.connect("build-finished", _build_finished)
    return {"version": __version__, "parallel_read_safe": True, "parallel_write_safe": True}
