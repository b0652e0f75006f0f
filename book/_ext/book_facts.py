"""Sphinx extension of the book: statements about the book computed from the chapters' own text at build time.

What one page says about another (which recipes a chapter runs, which chapter builds on which) is read from the
chapters' MyST sources when the book is built, so it cannot go stale when a chapter changes.

Directive::

    ```{measured-in} hqdit-w4a4-dyn fp4-hybrid-dyn
    ```

renders one sentence: which chapters run the named recipes (a recipe counts when its registered name is a string
literal in a code cell, when the cell calls ``bit_recipe("<method>", "<setting>")`` with literal arguments, or when
it uses the package's ablation lists ``ADD_ONE``/``REMOVE_ONE``), or that no chapter runs them yet.

The chapter dependency graph (``book/figures/chapter-graph.svg``) is drawn at the start of every build from
:func:`chapter_edges`: B depends on A when B's text refers back to A (a ``{doc}`` link, a ``{ref}`` to a label
defined in A, or the words "chapter N").
"""

from __future__ import annotations

import re
from pathlib import Path

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from course_kit import doc_link

__version__ = "1.0"

#: The pages of the dependency graph, in reading order: docname → short key used by the figure.
GRAPH_PAGES = {
    "book/fp-primer": "primer", "book/embedded-model": "model",
    "notebooks/01_activations": "c1", "notebooks/02_clipping": "c2", "notebooks/03_format_selection": "c3",
    "notebooks/04_outlier_rotation": "c4", "notebooks/05_gptq_fp_grids": "c5",
    "notebooks/06_end_to_end_sampling": "c6", "notebooks/07_sfid_tables": "c7",
    "notebooks/08_beyond_the_paper": "c8", "book/reproduction": "full",
}
CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
STRING = re.compile(r"""["']([\w.+-]+)["']""")
BIT_RECIPE = re.compile(r"""bit_recipe\(\s*["']([^"']+)["']\s*,\s*["'](\w+)["']\s*\)""")
DOC_REF = re.compile(r"\{doc\}`(?:[^`<]*<)?(?P<target>[^`>]+)>?`")
REF = re.compile(r"\{(?:ref|numref)\}`(?:[^`<]*<)?(?P<target>[\w-]+)>?`")
LABEL = re.compile(r"^\((?P<a>[\w-]+)\)=\s*$|^:(?:label|name):\s*(?P<b>[\w-]+)\s*$", re.M)
CHAPTER_WORD = re.compile(r"\b[Cc]hapters? (\d)\b")


def code_of(text: str) -> str:
    """The code cells of a MyST notebook, joined."""
    return "\n".join(m.group("body") for m in CODE_CELL.finditer(text))


def recipes_run(text: str) -> set[str]:
    """The registered recipe names a chapter's code cells run (see the module docstring for what counts)."""
    from hqdit_utils.engine import recipes
    from hqdit_utils.chapters.tables import bit_recipe

    code = code_of(text)
    names = {s for s in STRING.findall(code) if s in recipes.RECIPES}
    names |= {bit_recipe(method, setting).name for method, setting in BIT_RECIPE.findall(code)}
    for listing in ("ADD_ONE", "REMOVE_ONE"):
        if re.search(rf"\b{listing}\b", code):
            names |= set(getattr(recipes, listing).values())
    return names


def chapters_running(root: Path, names: list[str]) -> dict[str, list[str]]:
    """For each recipe name, the chapter docnames (``notebooks/…``) whose code runs it, in chapter order."""
    found: dict[str, list[str]] = {n: [] for n in names}
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.md")):
        ran = recipes_run(path.read_text(encoding="utf-8"))
        for n in names:
            if n in ran:
                found[n].append(f"notebooks/{path.stem}")
    return found


def _resolve_doc(source: str, target: str) -> str:
    """A ``{doc}`` target as a docname relative to the book root (``../notebooks/02_clipping`` from ``book/x``)."""
    if target.startswith("/"):
        return target.lstrip("/")
    parts = list(Path(source).parent.parts)
    for piece in target.split("/"):
        if piece == "..":
            parts = parts[:-1]
        elif piece not in ("", "."):
            parts.append(piece)
    return "/".join(parts)


def chapter_edges(root: Path) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """The references between the graph's pages: ``(back, ahead)``, two sets of ``(a, b)`` docname pairs.

    ``back`` holds (A, B) when page B refers to an earlier page A (B builds on A); ``ahead`` holds (B, A) when
    B points forward to a later page A (a pointer, not a dependency). Pages are those of :data:`GRAPH_PAGES`.
    """
    order = list(GRAPH_PAGES)
    texts = {d: (root / f"{d}.md").read_text(encoding="utf-8") for d in order if (root / f"{d}.md").exists()}
    owner = {}
    for d, text in texts.items():
        for m in LABEL.finditer(text):
            owner[m.group("a") or m.group("b")] = d
    chapter_doc = {d.split("/")[1][:2].lstrip("0"): d for d in order if d.startswith("notebooks/")}
    back, ahead = set(), set()
    for d, text in texts.items():
        cited = {_resolve_doc(d, m.group("target")) for m in DOC_REF.finditer(text)}
        cited |= {owner[m.group("target")] for m in REF.finditer(text) if m.group("target") in owner}
        cited |= {chapter_doc[n] for n in CHAPTER_WORD.findall(text) if n in chapter_doc}
        for c in cited & set(texts) - {d}:
            if order.index(c) < order.index(d):
                back.add((c, d))
            else:
                ahead.add((d, c))
    return back, ahead


def transitive_reduction(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """The edges (a, b) of a DAG that are not implied by a longer path from a to b."""
    succ: dict[str, set[str]] = {}
    for a, b in edges:
        succ.setdefault(a, set()).add(b)

    def reachable(a: str, skip: tuple[str, str]) -> set[str]:
        seen, todo = set(), [a]
        while todo:
            x = todo.pop()
            for y in succ.get(x, ()):
                if (x, y) != skip and y not in seen:
                    seen.add(y)
                    todo.append(y)
        return seen

    return {(a, b) for a, b in edges if b not in reachable(a, (a, b))}


class MeasuredIn(SphinxDirective):
    """One sentence: which chapters run the named recipes (read from the chapters when the page is built)."""

    required_arguments = 1
    final_argument_whitespace = True
    has_content = False

    def run(self):
        names = self.arguments[0].split()
        root = Path(self.env.srcdir)
        for path in (root / "notebooks").glob("[0-9][0-9]_*.md"):
            self.env.note_dependency(str(path))
        found = chapters_running(root, names)
        para = nodes.paragraph(classes=["measured-in"])
        ran = [n for n in names if found[n]]
        missing = [n for n in names if not found[n]]
        if ran:
            for i, n in enumerate(ran):
                para += nodes.Text("; " if i else "")
                para += nodes.literal(text=n)
                para += nodes.Text(" is run in ")
                for j, doc in enumerate(found[n]):
                    para += nodes.Text(", " if j else "")
                    para += doc_link(self.env, doc)
        if missing:
            para += nodes.Text("; " if ran else "")
            for i, n in enumerate(missing):
                para += nodes.Text(", " if i else "")
                para += nodes.literal(text=n)
            para += nodes.Text((" is" if len(missing) == 1 else " are") + " available in the package, but no chapter"
                               " runs " + ("it" if len(missing) == 1 else "them") + " yet")
        para += nodes.Text(" (read from the chapters' code when this page was built).")
        return [para]


def draw_chapter_graph(app: Sphinx) -> None:
    """Redraw book/figures/chapter-graph.svg from the chapters' references (when the book has that figure)."""
    root = Path(app.srcdir)
    script = root / "book" / "figures" / "chapter_graph.py"
    if not script.exists():
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("chapter_graph", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(root)


def setup(app: Sphinx):
    app.add_directive("measured-in", MeasuredIn)
    app.connect("builder-inited", draw_chapter_graph)
    return {"version": __version__, "parallel_read_safe": True, "parallel_write_safe": True}
