"""Write book/chapter_times.json from the execution records of a built book.

    python book/_ext/chapter_times.py                      # after a cold `make book` (`make chapter-times`)
    python book/_ext/chapter_times.py --check              # say whether the file matches the records

Every executable page of the table of contents (a MyST-Markdown notebook: a page with a `kernelspec` in
its front matter) is read the way myst-nb reads it, and looked up in the build's jupyter-cache
(`_build/.jupyter_cache`) by the same hash that myst-nb uses: the record of *this version* of the page
gives its execution time (`execution_seconds`, written by myst-nb when it executed the page). A page
without a record (changed since the build, or never executed) is an error unless `--allow-missing`,
which writes `null` for it.

The figures are only meaningful from a *cold* build: a fresh clone, no `.hqdit_cache/` (the experiment
cache that lets a re-executed chapter skip its end-to-end runs), nothing else running on the machine —
that is what `bash .ci/run` does on a fresh clone. Run this script right after such a build, with the build's
`$HQDIT_TABLE_SEEDS` (`make chapter-times` sets the same default as `make book`), and commit
the file. The book reads the file when it is built (`book/_ext/course_kit.py`): the line at the top of
each chapter and the table of the status page.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import subprocess
import sys
from pathlib import Path

import yaml

from hqdit_utils.config import profile
from hqdit_utils.files import write_json_atomic
from hqdit_utils.provenance import cpu_description, load_chapter_times

ROOT = Path(__file__).resolve().parents[2]
HOW = ("seconds to execute each page's notebook in a cold `make book` (fresh clone, empty experiment cache),"
       " read from the build's jupyter-cache records by `book/_ext/chapter_times.py`")


def toc_files(toc_path: Path) -> list[str]:
    """Every `file:` of the table of contents, in order (the root first)."""
    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return files


def page_source(root: Path, docname: str) -> Path | None:
    for suffix in (".md", ".ipynb"):
        path = root / f"{docname}{suffix}"
        if path.exists():
            return path
    return None


def read_notebook(path: Path):
    """The page as myst-nb sees it, or None when it is not a notebook (no kernelspec)."""
    import nbformat
    from myst_nb.core.read import read_myst_markdown_notebook

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".ipynb":
        return nbformat.reads(text, as_version=4)
    if not text.startswith("---") or "kernelspec" not in text.split("---", 2)[1]:
        return None
    return read_myst_markdown_notebook(text, path=str(path))


def page_title(path: Path) -> str | None:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return None


def collect(root: Path, cache_path: Path) -> dict[str, dict]:
    """docname → {"title", "seconds" (None when no record matches the page as it is now)}."""
    from jupyter_cache import get_cache

    if not cache_path.exists():
        raise SystemExit(f"no jupyter-cache at {cache_path}: build the book first (make book)")
    cache = get_cache(str(cache_path))
    pages = {}
    for docname in toc_files(root / "_toc.yml"):
        path = page_source(root, docname)
        if path is None:
            continue
        nb = read_notebook(path)
        if nb is None:
            continue
        seconds = None
        try:
            record = cache.match_cache_notebook(nb)
        except KeyError:
            record = None
        if record is not None and record.data.get("execution_seconds") is not None:
            seconds = round(float(record.data["execution_seconds"]), 1)
        pages[docname] = {"title": page_title(path), "seconds": seconds}
    return pages


def git_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the book's root (where _toc.yml is)")
    parser.add_argument("--cache", type=Path, default=None, help="default: ROOT/_build/.jupyter_cache")
    parser.add_argument("--out", type=Path, default=None, help="default: ROOT/book/chapter_times.json")
    parser.add_argument("--allow-missing", action="store_true", help="write null for pages without a record")
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    cache_path = args.cache or root / "_build" / ".jupyter_cache"
    out = args.out or root / "book" / "chapter_times.json"

    pages = collect(root, cache_path)
    missing = [d for d, e in pages.items() if e["seconds"] is None]
    if args.check:
        old = load_chapter_times(out)["pages"]
        stale = [d for d in pages if (old.get(d) or {}).get("seconds") != pages[d]["seconds"]]
        for d in stale:
            print(f"{d}: file {(old.get(d) or {}).get('seconds')} s, build records {pages[d]['seconds']} s")
        return 1 if stale else 0
    if missing and not args.allow_missing:
        print("no execution record matches these pages as they are now (rebuild, or --allow-missing):\n  "
              + "\n  ".join(missing), file=sys.stderr)
        return 1
    data = {
        "measured": _dt.date.today().isoformat(),
        "commit": git_commit(root),
        "cpu_cores": os.cpu_count(),
        "cpu": cpu_description(),
        "profile": os.environ.get("HQDIT_PROFILE", "book"),
        "table_seeds": profile().table_seeds,
        "how": HOW,
        "pages": pages,
    }
    write_json_atomic(out, data)
    total = sum(e["seconds"] or 0 for e in pages.values())
    print(f"wrote {out.relative_to(root) if out.is_relative_to(root) else out}: {len(pages)} pages, "
          f"{total / 60:.1f} min in all" + (f"; no record for {', '.join(missing)}" if missing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
