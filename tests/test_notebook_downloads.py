"""The .ipynb downloads and the student edition (book/_ext/notebook_downloads.py), on the book's own chapters
without building anything: the conversion keeps every code cell, and the student transform removes every
solution and nothing else (answer and check cells stay)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))
import notebook_downloads as nd  # noqa: E402

sys.path.remove(str(ROOT / "book" / "_ext"))

CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.md"))
CODE_CELL = re.compile(r"^```\{code-cell\}", re.M)


def _cells(text: str, tag: str) -> list[str]:
    notebook = json.loads(nd.to_ipynb(text))
    return ["".join(c["source"]) for c in notebook["cells"]
            if c["cell_type"] == "code" and tag in c.get("metadata", {}).get("tags", [])]


def test_every_chapter_is_a_notebook_and_the_primers_are_not():
    assert all(nd.is_notebook(p.read_text(encoding="utf-8")) for p in CHAPTERS)
    assert not nd.is_notebook((ROOT / "book" / "course.md").read_text(encoding="utf-8"))


def test_conversion_keeps_every_code_cell_in_order():
    text = (ROOT / "notebooks" / "01_activations.md").read_text(encoding="utf-8")
    notebook = json.loads(nd.to_ipynb(text))
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(code) == len(CODE_CELL.findall(text))
    assert all(not c.get("outputs") for c in code)
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_student_edition_drops_solutions_and_keeps_checks(path):
    text = path.read_text(encoding="utf-8")
    student = nd.strip_solutions(text)
    assert "{solution-start}" not in student and "{solution-end}" not in student
    assert student.count("{exercise-start}") == text.count("{exercise-start}")
    for tag in ("exercise-answer", "exercise-check"):
        assert _cells(student, tag) == _cells(text, tag)
    # nothing but the solution blocks is removed
    removed = len(text) - len(student)
    blocks = sum(len(m.group(0)) for m in nd.SOLUTION.finditer(text))
    assert removed == blocks > 0 or "{solution-start}" not in text


def test_student_transform_fails_when_it_keeps_a_solution_or_drops_a_check():
    """The assertions above catch a wrong transform: one that leaves a solution, one that eats a check cell."""
    text = (ROOT / "notebooks" / "02_clipping.md").read_text(encoding="utf-8")
    keeps_one = nd.SOLUTION.sub(lambda m: m.group(0) if "ex-clip-1" in m.group(0) else "", text)
    assert "{solution-start}" in keeps_one
    greedy = re.sub(r"^```\{solution-start\}.*^```\{solution-end\}\n```\n", "", text, flags=re.S | re.M)
    assert _cells(greedy, "exercise-check") != _cells(text, "exercise-check")
