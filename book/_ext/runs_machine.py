"""Write the machine facts of the build whose runs are shipped (``make book-results``) to a JSON file.

The run key (``hqdit_utils.experiments``) records the package versions and thread count but not the CPU; float
results can differ in their last bits between CPUs, so the shipped runs are the numbers of the machine named here.
Usage: ``python book/_ext/runs_machine.py data/book-runs/machine.json``.
"""
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from chapter_times import cpu_model  # same folder (book/_ext), which is on sys.path when run as a script
from hqdit_utils.lowbit import INT8_DOT_FLAGS, int_mm_fast


def main(out: str) -> None:
    facts = {
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "torch cpu capability": torch.backends.cpu.get_cpu_capability(),
        "int8 dot-product instructions": int_mm_fast(),
        "instructions looked for": list(INT8_DOT_FLAGS),
        "torch": torch.__version__,
    }
    Path(out).write_text(json.dumps(facts, indent=1) + "\n")
    print(f"{out}: {facts['cpu']}, {facts['torch cpu capability']}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python book/_ext/runs_machine.py OUT.json")
    main(sys.argv[1])
