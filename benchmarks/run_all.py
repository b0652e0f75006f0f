"""Run every benchmark (``benchmarks/bench_*.py``) and collect their printed reports in ``results.md``.

    make bench        # or: python benchmarks/run_all.py

Each benchmark measures its own baseline in the same run and prints ratios against it (medians of
repeated timings), so the numbers are comparable across machines only as ratios.
"""
from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    sections, failed = [], []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        print(proc.stdout, end="")
        if proc.returncode:
            failed.append(script.name)
            print(proc.stderr, file=sys.stderr)
        sections.append(f"## {script.name}\n\n```\n{proc.stdout.strip()}\n```\n")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (HERE / "results.md").write_text(f"# Benchmark results ({stamp})\n\n" + "\n".join(sections))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
