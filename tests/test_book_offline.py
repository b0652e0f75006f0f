"""The book's course kit works offline: formulas render with no network, and the run-time line of a chapter
comes from book/chapter_times.json, which book/_ext/chapter_times.py writes from the build's execution records.

One tiny book is built once for the module (≈ 15 s): the project's own `_config.yml` (so that removing the
offline-math extension from it fails this test), one page with inline, display and amsmath formulas and one
executed notebook page. Headless Chromium then opens the built page from disk with every host name
unresolvable, and a probe script on the page reports what MathJax rendered, which fonts it loaded and every
resource the page fetched.

Chromium is a Debian package (`apt-get install chromium`), installed by `make test` when run as root and
by `.ci/run`; without it the browser test is skipped (and fails instead when HQDIT_REQUIRE_CHROMIUM=1, as
in CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hqdit_utils import provenance

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "book" / "_ext"

pytestmark = pytest.mark.slow

MATH_PAGE = r"""# Formulas offline

Inline: the SQNR $10\log_{10}\left(\sum x^2 / \sum (x-\hat x)^2\right)$ and the crest factor
$c = \max_i |x_i| / \mathrm{RMS}(x)$.

$$
\lVert X w^\top - X q^\top \rVert^2 = (w - q)\, H \,(w - q)^\top, \qquad H = X^\top X
$$

\begin{align}
Q &= \tfrac{1}{\sqrt{n}}\, D\, H_n, & Q Q^\top &= I
\end{align}

```{raw} html
<script>
/* Offline probe: after MathJax's first typeset and the fonts, write what happened into the DOM. */
window.addEventListener("load", function () {
  function report(data) {
    var el = document.createElement("pre");
    el.id = "offline-probe";
    el.textContent = JSON.stringify(data);
    document.body.appendChild(el);
  }
  if (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
    report({error: "MathJax did not load"});
    return;
  }
  MathJax.startup.promise.then(function () {
    void document.body.offsetHeight;  /* lay out, so that the math fonts are requested */
    return document.fonts.ready;
  }).then(function () {
    report({
      sources: document.querySelectorAll(".math").length,
      rendered: document.querySelectorAll(".math mjx-container").length,
      errors: document.querySelectorAll("mjx-merror").length,
      raw_tex_left: /\\\(|\\\[|\\begin\{/.test(document.body.innerText),
      fonts_loaded: Array.from(document.fonts).filter(function (f) { return f.status === "loaded"; })
                         .map(function (f) { return f.family.replace(/"/g, ""); }),
      resources: performance.getEntriesByType("resource").map(function (r) { return r.name; })
    });
  }, function (err) { report({error: String(err)}); });
});
</script>
```
"""

NOTEBOOK_PAGE = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
kernelspec:
  display_name: Python 3
  language: python
  name: python3
---

# An executed page

```{chapter-runtime}
:table-seeds:
```

```{code-cell} ipython3
print(sum(range(10)))
```

```{exercise-start}
:label: ex-tiny
```
What is 1 + 1?
```{exercise-end}
```

```{code-cell} ipython3
:tags: [exercise-check]
print("CHECK-CELL-KEPT")
```

```{solution-start} ex-tiny
:class: dropdown
```
SOLUTION-TEXT-TWO
```{solution-end}
```
"""

KNOWN_SECONDS = 125.0  # written into the tiny book's chapter_times.json: "about 3 min"
KNOWN_CPU = "Some CPU, AVX2"  # ... and the CPU it was measured on
KNOWN_SEEDS = 7  # ... and chapter 7's seed count in that build (shown by `:table-seeds:`)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _build(book: Path, **env_extra) -> None:
    jb = Path(sys.executable).parent / "jupyter-book"
    env = dict(os.environ, OMP_NUM_THREADS="1", IPYTHONDIR=str(ROOT / "book" / "ipython_profile"), **env_extra)
    proc = subprocess.run([str(jb), "build", str(book), "-W", "-n", "--keep-going"], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def tiny_book(tmp_path_factory) -> Path:
    book = tmp_path_factory.mktemp("tinybook")
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    config["execute"]["execute_notebooks"] = "cache"
    config["bibtex_bibfiles"] = ["references.bib"]
    local = config["sphinx"].setdefault("local_extensions", {})
    for name in local:  # the project's own extensions, from the checkout
        local[name] = str(EXT)
    assert "notebook_downloads" in local, "the book offers no .ipynb downloads (notebook_downloads extension)"
    config["sphinx"].setdefault("config", {})["course_kit_times_file"] = "chapter_times.json"
    (book / "_config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (book / "_toc.yml").write_text(yaml.safe_dump({"format": "jb-book", "root": "index",
                                                   "chapters": [{"file": "nb"}]}), encoding="utf-8")
    shutil.copy(ROOT / "book" / "references.bib", book / "references.bib")
    (book / "index.md").write_text(MATH_PAGE, encoding="utf-8")
    (book / "nb.md").write_text(NOTEBOOK_PAGE, encoding="utf-8")
    (book / "chapter_times.json").write_text(json.dumps(
        {"measured": "2026-01-01", "cpu_cores": 2, "cpu": KNOWN_CPU, "table_seeds": KNOWN_SEEDS, "pages": {"nb": {"seconds": KNOWN_SECONDS}}}), encoding="utf-8")
    _build(book)
    return book


@pytest.fixture(scope="module")
def student_book(tiny_book, tmp_path_factory) -> Path:
    """The tiny book built again as the student edition (HQDIT_STUDENT=1, what make book-student sets)."""
    book = tmp_path_factory.mktemp("studentbook")
    for path in tiny_book.iterdir():
        if path.is_file():
            shutil.copy(path, book / path.name)
    _build(book, HQDIT_STUDENT="1")
    return book


def test_no_remote_scripts_or_styles(tiny_book):
    html = (tiny_book / "_build" / "html" / "index.html").read_text(encoding="utf-8")
    remote = re.findall(r'<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)="((?:https?:)?//[^"]+)"', html)
    assert remote == [], remote
    mathjax = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', html, flags=re.I)
    assert mathjax, "no MathJax script on a page with formulas"
    for src in mathjax:
        assert (tiny_book / "_build" / "html" / src.split("?")[0]).is_file(), src


def test_formulas_render_without_network(tiny_book):
    browser = _chromium()
    if browser is None:
        if os.environ.get("HQDIT_REQUIRE_CHROMIUM") == "1":
            pytest.fail("HQDIT_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH: `apt-get install chromium` (make test does it when run as root)")
    page = (tiny_book / "_build" / "html" / "index.html").as_uri()
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--host-resolver-rules=MAP * ~NOTFOUND",  # no host name resolves: nothing can be fetched
         f"--user-data-dir={tiny_book / 'chromium-profile'}", "--virtual-time-budget=20000", "--dump-dom", page],
        capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="offline-probe">(.*?)</pre>', proc.stdout, flags=re.S)
    assert match, "the probe did not report:\n" + proc.stdout[-2000:] + proc.stderr[-2000:]
    probe = json.loads(match.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                       .replace("&amp;", "&"))
    assert "error" not in probe, probe
    assert probe["sources"] == 4, probe  # 2 inline, 1 display, 1 amsmath environment
    assert probe["rendered"] == 4 and probe["errors"] == 0 and not probe["raw_tex_left"], probe
    assert any(f.startswith("MJX") for f in probe["fonts_loaded"]), probe  # MathJax's own fonts, from disk
    remote = [r for r in probe["resources"] if not r.startswith("file://")]
    assert remote == [], remote


def test_runtime_line_reads_chapter_times(tiny_book):
    html = (tiny_book / "_build" / "html" / "nb.html").read_text(encoding="utf-8")
    assert f"about 3 min on 2 CPU cores ({KNOWN_CPU})" in html
    assert f"comparison at {KNOWN_SEEDS} paired seeds per row" in html


def test_notebook_page_is_offered_as_ipynb(tiny_book):
    """The course page promises each chapter's .ipynb: the build writes it next to the page and links it."""
    notebook = json.loads((tiny_book / "_build" / "html" / "nb.ipynb").read_text(encoding="utf-8"))
    code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code == ["print(sum(range(10)))", 'print("CHECK-CELL-KEPT")']
    html = (tiny_book / "_build" / "html" / "nb.html").read_text(encoding="utf-8")
    assert re.search(r'href="nb\.ipynb"', html), "no .ipynb link in the download menu"
    assert not (tiny_book / "_build" / "html" / "index.ipynb").exists()  # not a notebook page


def test_student_edition_removes_solutions_everywhere_and_keeps_checks(tiny_book, student_book):
    html = tiny_book / "_build" / "html"
    assert "SOLUTION-TEXT-TWO" in (html / "nb.html").read_text(encoding="utf-8")  # the normal build shows it
    student = student_book / "_build" / "html"
    for name in ("nb.html", "nb.ipynb", "_sources/nb.md"):
        text = (student / name).read_text(encoding="utf-8")
        assert "SOLUTION-TEXT-TWO" not in text, name
        assert "CHECK-CELL-KEPT" in text, name


def test_chapter_times_script_reads_the_execution_records(tiny_book, monkeypatch):
    monkeypatch.setenv("HQDIT_TABLE_SEEDS", "3")  # the measured build's seed count, recorded with its times
    sys.path.insert(0, str(EXT))
    try:
        import chapter_times
    finally:
        sys.path.remove(str(EXT))
    out = tiny_book / "measured.json"
    assert chapter_times.main(["--root", str(tiny_book), "--out", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert list(data["pages"]) == ["nb"]  # index.md is not a notebook
    assert data["pages"]["nb"]["title"] == "An executed page"
    assert data["table_seeds"] == 3
    assert 0 < data["pages"]["nb"]["seconds"] < 300
    assert data["cpu"] == provenance.cpu_description() and data["cpu"].endswith(
        torch.backends.cpu.get_cpu_capability())
    assert chapter_times.main(["--root", str(tiny_book), "--out", str(out), "--check"]) == 0


def test_every_chapter_shows_its_runtime_and_the_file_names_only_toc_pages():
    sys.path.insert(0, str(EXT))
    try:
        import chapter_times
    finally:
        sys.path.remove(str(EXT))
    toc = chapter_times.toc_files(ROOT / "_toc.yml")
    chapters = [d for d in toc if d.startswith("notebooks/")]
    assert chapters, toc
    for docname in chapters:
        text = (ROOT / f"{docname}.md").read_text(encoding="utf-8")
        assert "```{chapter-runtime}" in text, docname
    data = json.loads((ROOT / "book" / "chapter_times.json").read_text(encoding="utf-8"))
    assert set(data["pages"]) <= set(toc), set(data["pages"]) - set(toc)
