"""Ship the finished runs of the last build in ``data/book-runs/`` (``make book-results``).

Copies every finished run of ``.hqdit_cache/runs/`` (a ``result.json`` and its ``samples.npz``) without the
machine-local path of its samples (``experiments`` sets that path again when it reads an entry), and writes the
machine facts of the build to ``machine.json``: the run key records the package versions and thread count but not
the CPU, and float results can differ in their last bits between CPUs, so the shipped runs are the numbers of the
machine named there.

    python book/_ext/ship_runs.py .hqdit_cache/runs data/book-runs
"""
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from hqdit_utils.lowbit import INT8_DOT_FLAGS, int_mm_fast, onednn_available
from hqdit_utils.provenance import cpu_model


def ship(runs: Path, out: Path) -> int:
    """Replace ``out`` by the finished runs of ``runs``; the number of runs shipped."""
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
        (out / folder.name / "result.json").write_text(json.dumps(entry, indent=1) + "\n")
        count += 1
    facts = {
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "torch cpu capability": torch.backends.cpu.get_cpu_capability(),
        "int8 dot-product instructions": int_mm_fast(),
        "instructions looked for": list(INT8_DOT_FLAGS),
        "oneDNN int8 kernel": onednn_available(),
        "torch": torch.__version__,
    }
    (out / "machine.json").write_text(json.dumps(facts, indent=1) + "\n")
    return count


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python book/_ext/ship_runs.py CACHE_RUNS_DIR OUT_DIR")
    n = ship(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{sys.argv[2]}: {n} runs, made on {cpu_model()}, {torch.backends.cpu.get_cpu_capability()}")
