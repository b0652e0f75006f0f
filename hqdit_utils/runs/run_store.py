"""The shipped-runs store (``data/book-runs/``) — its writer; its reader is ``experiments`` (``_adopt_shipped``).

:func:`ship` copies every finished run of a cache folder (``.hqdit_cache/runs/``: a ``result.json`` and its
``samples.npz``) without the machine-local path of its samples (``experiments`` sets that path again when it
reads an entry), and writes the machine facts of the build to ``machine.json``: the run key records the package
versions and thread count but not the CPU, and float results can differ in their last bits between CPUs, so the
shipped runs are the numbers of the machine named there (``make book-results``)::

    python -m hqdit_utils.runs.run_store .hqdit_cache/runs data/book-runs
"""
from __future__ import annotations

import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..files import write_json_atomic
from ..engine.lowbit import INT8_DOT_FLAGS, int_mm_fast, onednn_available
from ..provenance import machine_facts

__all__ = ["ship", "main"]


def ship(runs: Path, out: Path) -> int:
    """Replace the folder ``out`` by the finished runs of the folder ``runs``; the number of runs shipped."""
    runs, out = Path(runs), Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    count = 0
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        result, samples = folder / "result.json", folder / "samples.npz"
        if not (result.is_file() and samples.is_file()):
            continue  # unfinished
        entry = json.loads(result.read_text())
        entry["result"].pop("samples", None)
        (out / folder.name).mkdir()
        shutil.copyfile(samples, out / folder.name / "samples.npz")
        write_json_atomic(out / folder.name / "result.json", entry)
        count += 1
    facts = {"written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **machine_facts(),
             "int8 dot-product instructions": int_mm_fast(), "instructions looked for": list(INT8_DOT_FLAGS),
             "oneDNN int8 kernel": onednn_available()}
    write_json_atomic(out / "machine.json", facts)
    return count


def main(argv: list[str] | None = None) -> int:
    """``python -m hqdit_utils.runs.run_store CACHE_RUNS_DIR OUT_DIR``; a wrong call is one usage line, exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not Path(argv[0]).is_dir():
        print("usage: python -m hqdit_utils.runs.run_store CACHE_RUNS_DIR OUT_DIR (CACHE_RUNS_DIR: the folder of "
              "finished runs, e.g. .hqdit_cache/runs after make book)", file=sys.stderr)
        return 2
    n = ship(Path(argv[0]), Path(argv[1]))
    facts = machine_facts()
    print(f"{argv[1]}: {n} runs, made on {facts['cpu']}, {facts['torch cpu capability']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
