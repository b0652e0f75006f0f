"""The shipped-runs store (``data/book-runs/``) — its writer; its reader is ``experiments`` (``_adopt_shipped``).

:func:`ship` copies every finished run of a cache folder (``.hqdit_cache/runs/``: a ``result.json`` and its
``samples.npz``) without the machine-local path of its samples (``experiments`` sets that path again when it
reads an entry), and summarises in ``machine.json`` which machines made the runs. The run key records the model,
recipe, protocol and numerics version but not the CPU: quantized samples can differ between CPU kinds, so each
run's protocol records its machine (``result.protocol.machine``: CPU model, PyTorch CPU capability, kind) and a
store may hold runs of several machines — one table's runs should come from one (``make book-results``)::

    python -m hqdit_utils.runs.run_store .hqdit_cache/runs data/book-runs          # replace the store
    python -m hqdit_utils.runs.run_store --add .hqdit_cache/runs data/book-runs    # add runs it lacks
"""
from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from ..files import write_json_atomic

__all__ = ["ship", "machines", "run_machine", "main"]

_UNKNOWN = {"cpu": "unknown", "torch cpu capability": "unknown", "kind": "unknown"}


def run_machine(entry: dict) -> dict:
    """The machine a run's ``result.json`` entry says made it (``{"cpu", "torch cpu capability", "kind"}``)."""
    return entry["result"].get("protocol", {}).get("machine") or dict(_UNKNOWN)


def machines(store: "str | Path") -> list[dict]:
    """The machines that made a store's runs, most runs first: ``{"cpu", "torch cpu capability", "kind", "runs",
    "recipes"}`` (``runs`` a count, ``recipes`` the sorted recipe names), read from the runs themselves."""
    made: dict[tuple, list[str]] = {}
    for result in sorted(Path(store).glob("*/result.json")):
        entry = json.loads(result.read_text())
        m = run_machine(entry)
        made.setdefault(tuple(sorted(m.items())), []).append(entry["result"]["recipe"])
    rows = [{**dict(k), "runs": len(v), "recipes": sorted(Counter(v))} for k, v in made.items()]
    return sorted(rows, key=lambda r: -r["runs"])


def ship(runs: Path, out: Path, *, add: bool = False) -> int:
    """Copy the finished runs of the folder ``runs`` into the store ``out`` — replacing it, or with ``add`` keeping
    its runs and adding those it lacks — and rewrite ``out/machine.json``; the number of runs copied."""
    runs, out = Path(runs), Path(out)
    if not add:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        result, samples = folder / "result.json", folder / "samples.npz"
        if not (result.is_file() and samples.is_file()) or (out / folder.name / "result.json").is_file():
            continue  # unfinished, or already in the store
        entry = json.loads(result.read_text())
        entry["result"].pop("samples", None)
        (out / folder.name).mkdir()
        shutil.copyfile(samples, out / folder.name / "samples.npz")
        write_json_atomic(out / folder.name / "result.json", entry)
        count += 1
    write_json_atomic(out / "machine.json", {"written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                             "machines": machines(out)})
    return count


def main(argv: list[str] | None = None) -> int:
    """``python -m hqdit_utils.runs.run_store [--add] CACHE_RUNS_DIR OUT_DIR``; a wrong call is one usage line,
    exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    add = argv[:1] == ["--add"]
    argv = argv[1:] if add else argv
    if len(argv) != 2 or not Path(argv[0]).is_dir():
        print("usage: python -m hqdit_utils.runs.run_store [--add] CACHE_RUNS_DIR OUT_DIR (CACHE_RUNS_DIR: the folder "
              "of finished runs, e.g. .hqdit_cache/runs after make book; --add keeps OUT_DIR's runs)", file=sys.stderr)
        return 2
    n = ship(Path(argv[0]), Path(argv[1]), add=add)
    made = "; ".join(f"{m['runs']} on {m['cpu']} ({m['kind']})" for m in machines(argv[1]))
    print(f"{argv[1]}: {n} runs {'added' if add else 'shipped'}; the store: {made}")
    return 0
