"""Shared plumbing of the benchmarks: command-line options, checks against targets, the JSON each script writes.

Every benchmark script accepts ``--quick`` (small sizes, few repeats: for development, not for the
record), ``--threads`` (default 1, see below) and ``--json PATH`` (where ``run_all.py`` collects the
results). A *check* is one ratio against a baseline measured in the same process, with its target:

    {"benchmark": "forward", "case": "embedded fp4-hybrid", "baseline": "FP32 forward",
     "value": 0.31, "unit": "s", "ratio": 1.21, "target": 1.3, "status": "PASS"}

``status`` is PASS/FAIL when there is a target, "report" when there is none.

Threads: one intra-op thread by default. On the shared 2-core build machine a second thread waits for a
core that another process holds, which makes short kernels' timings meaningless; one thread measures the
arithmetic. Both sides of every ratio run with the same setting.
"""
from __future__ import annotations

import argparse
import resource
from pathlib import Path

import torch

from hqdit_utils.files import write_json_atomic


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (development runs)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--json", type=Path, default=None, help="write the checks and details to this file")
    return ap


def cpu_line() -> str:
    """One line naming the CPU the numbers come from: model, kind, PyTorch's CPU capability, cores."""
    import os

    from hqdit_utils.provenance import cpu_kind, cpu_model

    return (f"CPU: {cpu_model()} ({cpu_kind()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
            f"{os.cpu_count()} cores)")


def setup(args) -> None:
    torch.set_num_threads(args.threads)


def check(benchmark: str, case: str, baseline: str, ratio: float | None, target: float | None = None,
          value: float | None = None, unit: str = "s", note: str = "") -> dict:
    """One result line; ``ratio <= target`` passes."""
    if ratio is None:
        status = "not measured"
    elif target is None:
        status = "report"
    else:
        status = "PASS" if ratio <= target else "FAIL"
    return {"benchmark": benchmark, "case": case, "baseline": baseline, "value": value, "unit": unit,
            "ratio": ratio, "target": target, "status": status, "note": note}


def print_checks(checks: list[dict]) -> None:
    print(f"{'case':46s} {'ratio':>8s} {'target':>8s}  status   (baseline)")
    for c in checks:
        r = "-" if c["ratio"] is None else f"{c['ratio']:.3f}"
        t = "-" if c["target"] is None else f"<= {c['target']:g}"
        print(f"{c['case']:46s} {r:>8s} {t:>8s}  {c['status']:7s}  ({c['baseline']})")


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (GB = 1e9 bytes), from ``VmHWM`` in /proc/self/status.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries the parent's high-water mark into a child across fork +
    exec, so a benchmark subprocess started by a large process reported the parent's peak (measured: a child of a
    1.5 GB process read ru_maxrss 1.51 GB, VmHWM 0.014 GB). ``ru_maxrss`` only where /proc is missing.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def finish(args, name: str, checks: list[dict], details: dict | None = None) -> None:
    print()
    print_checks(checks)
    if args.json is not None:
        payload = {"benchmark": name, "quick": bool(args.quick), "threads": torch.get_num_threads(),
                   "checks": checks, "details": details or {}}
        write_json_atomic(args.json, payload)
