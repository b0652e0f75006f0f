"""What one page of the book promises about another is true of the build: the recipes a page says a chapter
measures are run by that chapter, no page says "not measured" of a recipe a chapter runs, and the chapter
dependency graph is computed from the pages' references (book/_ext/book_facts.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from hqdit_utils.engine.recipes import RECIPES

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import book_facts  # noqa: E402

sys.path.remove(str(ROOT / "book" / "_ext"))

PAGES = sorted((ROOT / "book").glob("*.md")) + sorted((ROOT / "notebooks").glob("*.md"))
#: Phrases that say a recipe is not measured anywhere in the book.
NOT_MEASURED = re.compile(r"no chapter (?:tabulates|runs|measures)|not measured in the book", re.I)


def test_recipes_run_reads_literals_bit_recipe_calls_and_ablation_lists():
    text = ('```{code-cell} ipython3\nrows = ["hqdit-w4a4-dyn", bit_recipe("HQ-DiT", "w8a8").name]\n'
            'rows += list(REMOVE_ONE.values())\n```\n\nProse naming "fp4-hybrid-dyn" is not code.\n')
    ran = book_facts.recipes_run(text)
    assert "hqdit-w4a4-dyn" in ran and "hqdit-no-select" in ran and "fp4-hybrid-dyn" not in ran
    assert any(name.startswith("hqdit") and "w8a8" in name for name in ran), ran


def test_a_page_promises_only_what_the_chapters_run():
    """Every `recipe` named beside a link to a chapter on the choices page is run by that chapter."""
    text = (ROOT / "book" / "choices.md").read_text(encoding="utf-8")
    promised = re.findall(r"\{doc\}`\.\./(notebooks/[\w-]+)` \([^)]*?`([\w.+-]+)`\)", text)
    assert promised, "the choices page names no recipe beside a chapter link"
    wrong = [(doc, name) for doc, name in promised if name in RECIPES
             and name not in book_facts.recipes_run((ROOT / f"{doc}.md").read_text(encoding="utf-8"))]
    assert not wrong, f"promised but not run by the chapter: {wrong}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_no_page_calls_a_measured_recipe_unmeasured(page):
    text = page.read_text(encoding="utf-8")
    ran = set().union(*(book_facts.recipes_run(p.read_text(encoding="utf-8"))
                        for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.md")))
    for paragraph in re.split(r"\n\s*\n", text):
        if NOT_MEASURED.search(paragraph):
            named = set(re.findall(r"`([\w.+-]+)`", paragraph)) & ran
            assert not named, f"{page.name} says {sorted(named)} are not measured; a chapter runs them"


def test_measured_in_directives_name_registered_recipes():
    text = (ROOT / "book" / "choices.md").read_text(encoding="utf-8")
    names = [n for args in re.findall(r"```\{measured-in\}\s+([^\n]+)", text) for n in args.split()]
    assert {"hqdit-w4a4-dyn", "hqdit-w4a4-all-fc", "hqdit-w4a4-attn"} <= set(names)
    assert set(names) <= set(RECIPES), set(names) - set(RECIPES)
    found = book_facts.chapters_running(ROOT, names)
    assert found["hqdit-w4a4-attn"], "chapter 7 runs hqdit-w4a4-attn: the directive must say so"


def test_chapter_edges_follow_references(tmp_path):
    for doc, body in {
        "book/fp-primer": "# Primer\n\n(primer-label)=\n## Grids\n",
        "notebooks/01_activations": "# One\n\nUses {ref}`primer-label`; chapter 3 comes later.\n",
        "notebooks/02_clipping": "# Two\n\nBuilds on {doc}`01_activations`.\n",
        "notebooks/03_format_selection": "# Three\n\nAs chapter 2 showed, and {doc}`../book/fp-primer`.\n",
    }.items():
        (tmp_path / f"{doc}.md").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f"{doc}.md").write_text(body, encoding="utf-8")
    back, ahead = book_facts.chapter_edges(tmp_path)
    assert back == {("book/fp-primer", "notebooks/01_activations"),
                    ("notebooks/01_activations", "notebooks/02_clipping"),
                    ("notebooks/02_clipping", "notebooks/03_format_selection"),
                    ("book/fp-primer", "notebooks/03_format_selection")}
    assert ahead == {("notebooks/01_activations", "notebooks/03_format_selection")}
    assert book_facts.transitive_reduction(back) == back - {("book/fp-primer", "notebooks/03_format_selection")}



def test_rotation_chapter_builds_on_format_selection():
    """Chapter 4 teaches the formats after rotation, building on chapter 3's format choice: the graph has that edge."""
    back, _ = book_facts.chapter_edges(ROOT)
    assert ("notebooks/03_format_selection", "notebooks/04_outlier_rotation") in back


def test_prerequisites_name_only_earlier_pages():
    """No chapter lists a later page among its prerequisites (the order of the book is the order of the graph)."""
    order = list(book_facts.GRAPH_PAGES)
    late = []
    for doc in order:
        text = (ROOT / f"{doc}.md").read_text(encoding="utf-8")
        line = next((ln for ln in text.splitlines() if ln.startswith("**Prerequisites:**")), "")
        for m in book_facts.DOC_REF.finditer(line):
            target = book_facts._resolve_doc(doc, m.group("target"))
            if target in order and order.index(target) >= order.index(doc):
                late.append((doc, target))
    assert not late, late
