"""Sphinx extension of the book: the "runs in N min" line of each chapter and the table of chapter times.

Both read one file, ``book/chapter_times.json``, which ``book/_ext/chapter_times.py`` writes from the
execution records (jupyter-cache) of a cold ``make book``. The figures are read when the page is
*built*, not when its notebook is executed, so a rebuilt page shows the file's current content even when
its notebook comes from the cache, and a change of the file makes Sphinx re-read the pages that show it.

Directives::

    ```{chapter-runtime}
    ```                      (the current page's time; an argument names another page, e.g. notebooks/05_gptq_fp_grids)

    ```{chapter-times-table}
    ```                      (every page of the file, with the total and how it was measured)

Role::

    {chapter-runtime-inline}`notebooks/01_activations`   → "about 2 min" (for tables such as the course page's)
"""

from __future__ import annotations

import math
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from hqdit_utils.provenance import load_chapter_times

__version__ = "1.0"

CORES_DEFAULT = 2


def minutes_text(seconds: float | None) -> str | None:
    """How a time is said at the top of a chapter: whole minutes, rounded up; 'under a minute' below 60 s."""
    if seconds is None:
        return None
    if seconds < 60:
        return "under a minute"
    return f"about {math.ceil(seconds / 60)} min"


def doc_link(env, docname: str) -> nodes.Node:
    """A link to the page ``docname`` (e.g. ``notebooks/02_clipping``) from the page being read, titled by its name."""
    ref = addnodes.pending_xref("", refdomain="std", reftype="doc", reftarget="/" + docname,
                                refexplicit=False, refwarn=True, refdoc=env.docname)
    ref += nodes.inline(text=docname)
    return ref


class _TimesDirective(SphinxDirective):
    def times(self) -> dict:
        path = Path(self.env.srcdir) / self.config.course_kit_times_file
        self.env.note_dependency(str(path))
        return load_chapter_times(path)


class ChapterRuntime(_TimesDirective):
    """One sentence: how long the page's notebook takes to execute in a cold build."""

    optional_arguments = 1
    has_content = False
    #: ``:table-seeds:`` adds how many paired seeds chapter 7's comparison ran in the measured build.
    option_spec = {"table-seeds": directives.flag}

    def run(self):
        data = self.times()
        docname = self.arguments[0] if self.arguments else self.env.docname
        entry = data["pages"].get(docname) or {}
        when = minutes_text(entry.get("seconds"))
        cores = data.get("cpu_cores") or CORES_DEFAULT
        para = nodes.paragraph(classes=["chapter-runtime"])
        para += nodes.strong(text="Run time: ")
        if when is None:
            para += nodes.Text("not measured yet for this version of the chapter.")
        else:
            cpu = f" ({data['cpu']})" if data.get("cpu") else ""
            seeds = (f", chapter 7's comparison at {data['table_seeds']} paired seeds per row"
                     if "table-seeds" in self.options and data.get("table_seeds") else "")
            para += nodes.Text(f"{when} on {cores} CPU cores{cpu}, executed from scratch"
                               f" (measured {data.get('measured', 'on an unknown date')}{seeds}).")
        return [para]


def chapter_runtime_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """Inline ``{chapter-runtime-inline}`notebooks/01_activations``` → "about 2 min" (or "not measured yet")."""
    env = inliner.document.settings.env
    path = Path(env.srcdir) / env.config.course_kit_times_file
    env.note_dependency(str(path))
    entry = load_chapter_times(path)["pages"].get(text.strip()) or {}
    return [nodes.Text(minutes_text(entry.get("seconds")) or "not measured yet")], []


class ChapterTimesTable(_TimesDirective):
    """The table of every page's execution time, with the total and the provenance of the figures."""

    has_content = False

    def run(self):
        data = self.times()
        pages = data["pages"]
        if not any((entry or {}).get("seconds") is not None for entry in pages.values()):
            return [nodes.paragraph(text="No execution times have been recorded yet.")]
        table = nodes.table(classes=["chapter-times"])
        group = nodes.tgroup(cols=3)
        table += group
        for width in (60, 20, 20):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        head += self._row(["page", "seconds", "run time"])
        body = nodes.tbody()
        group += body
        total = 0.0
        for docname, entry in pages.items():
            seconds = entry.get("seconds")
            total += seconds or 0.0
            body += self._row([self._doc_link(docname),
                               "—" if seconds is None else f"{seconds:.0f}",
                               minutes_text(seconds) or "not measured"])
        body += self._row(["all pages", f"{total:.0f}", f"{total / 60:.1f} min"])
        note = nodes.paragraph(text=(
            f"Measured {data.get('measured', 'on an unknown date')} on {data.get('cpu_cores', '?')} CPU cores"
            + (f" ({data['cpu']})" if data.get("cpu") else "") +
            f", commit {data.get('commit', 'unknown')}, profile {data.get('profile', 'book')!r}"
            + (f" with {data['table_seeds']} paired seeds per row of chapter 7" if data.get("table_seeds") else "")
            + ":"
            f" {data.get('how', 'execution records of the build')}"))
        return [table, note]

    def _doc_link(self, docname: str) -> nodes.Node:
        return doc_link(self.env, docname)

    @staticmethod
    def _row(cells):
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            para = nodes.paragraph()
            para += cell if isinstance(cell, nodes.Node) else nodes.Text(str(cell))
            entry += para
            row += entry
        return row


def setup(app: Sphinx):
    app.add_config_value("course_kit_times_file", "book/chapter_times.json", "env")
    app.add_directive("chapter-runtime", ChapterRuntime)
    app.add_directive("chapter-times-table", ChapterTimesTable)
    app.add_role("chapter-runtime-inline", chapter_runtime_role)
    return {"version": __version__, "parallel_read_safe": True, "parallel_write_safe": True}
