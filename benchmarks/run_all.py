"""Run every benchmark (``benchmarks/bench_*.py``), one after the other, and write ``results-KIND.md`` + ``.json``.

    make bench                                   # or: python -m benchmarks.run_all
    python -m benchmarks.run_all --quick         # small sizes, few repeats (development; not for the record)

Each benchmark runs in its own process (so its peak memory is its own), measures its baseline in the same
process and reports ratios (medians of repeated timings), with the targets of issues 9 and 30 and PASS/FAIL;
every speed baseline is given in FP32 and in BF16 (what a CPU user would run instead), and the CPU is named
with its kind (AMX, VNNI or AVX2: the targets of issue 30 depend on it). The
numbers are comparable across machines only as ratios. ``make book`` is not run here: its cold time is the
sum of the page times in ``book/chapter_times.json`` (the one record of a cold build, ``make chapter-times``)
and its warm wall time is read from ``benchmarks/book_times.json`` (``{"warm_s": …, "measured": "…"}``).
``KIND`` is the CPU kind (``AMX``, ``VNNI``, ``AVX2``: ``provenance.cpu_kind``), so a run on one kind of machine
keeps the record of the others (the performance page quotes each). The report also records the machine, the torch
version, the malloc settings (:data:`MALLOC_ENV`) and the load average before and after the run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BOOK_TARGETS = {"cold_s": 25 * 60, "warm_s": 60}
#: glibc malloc settings for the benchmark processes: keep freed blocks below 256 MB in the heap instead of
#: returning them to the system, so that the many 1–40 MB temporaries of fake quantization reuse memory
#: instead of page-faulting fresh pages on every call (measured on the 2-core VM: FP32 forward of the
#: embedded model ~20 % faster, simulated W4A4 ~35 % faster). Both sides of every ratio run with them;
#: ``--default-malloc`` measures without.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def machine() -> dict:
    # torch (and the package, which imports it) load here, not at the top: the runner itself stays light, the
    # benchmarks run in subprocesses started with MALLOC_ENV
    from hqdit_utils.provenance import cpu_kind, machine_facts

    return {**machine_facts(), "kind": cpu_kind()}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def book_times() -> dict:
    """``{"cold_s": …, "warm_s": …}`` with a provenance line each: cold = the pages of book/chapter_times.json."""
    out = {}
    from hqdit_utils.provenance import load_chapter_times  # deferred like machine(): it imports torch

    c = load_chapter_times()
    if c["pages"]:
        secs = [e.get("seconds") for e in c["pages"].values()]
        if secs and None not in secs:
            seeds = f", chapter 7 at {c['table_seeds']} paired seeds" if c.get("table_seeds") else ""
            out["cold_s"] = (sum(secs), f"book/chapter_times.json: {c.get('measured', 'undated')}, commit "
                                        f"{c.get('commit', '?')}, {c.get('cpu', '?')}{seeds}")
    warm = HERE / "book_times.json"
    if warm.is_file():
        w = json.loads(warm.read_text())
        if "warm_s" in w:
            out["warm_s"] = (w["warm_s"], f"book_times.json: {w.get('measured', 'undated')}")
    return out


def book_checks() -> list[dict]:
    rows = []
    data = book_times()
    for key, label in (("cold_s", "make book, cold"), ("warm_s", "make book, warm")):
        target = BOOK_TARGETS[key]
        sec, source = data.get(key, (None, None))
        if sec is None:
            rows.append({"benchmark": "book", "case": label, "baseline": "—", "value": None, "unit": "s",
                         "ratio": None, "target": 1.0, "status": "not measured in this run",
                         "note": f"target <= {target / 60:g} min; not recorded (make chapter-times after a cold build)"})
        else:
            rows.append({"benchmark": "book", "case": label, "baseline": f"{target / 60:g} min", "value": sec,
                         "unit": "s", "ratio": sec / target, "target": 1.0,
                         "status": "PASS" if sec <= target else "FAIL",
                         "note": f"{sec / 60:.1f} min, from {source}"})
    return rows


def table(checks: list[dict]) -> str:
    lines = ["| benchmark | case | baseline (same run) | value | ratio | target | status |",
             "|---|---|---|---|---|---|---|"]
    for c in checks:
        v = c["value"]
        val = "—" if v is None else (f"{v / 1e9:.2f} GB" if c["unit"] == "GB" and v > 100 else
                                      f"{v:,.0f} B" if c["unit"] == "B" else
                                      f"{v:.2f} GB" if c["unit"] == "GB" else f"{v:.3g} s")
        r = "—" if c["ratio"] is None else f"{c['ratio']:.3f}"
        t = "—" if c["target"] is None else f"≤ {c['target']:g}"
        case = c["case"].strip() + (f" ({c['note']})" if c.get("note") else "")
        lines.append(f"| {c['benchmark']} | {case} | {c['baseline']} | {val} | {r} | {t} | {c['status']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names to run, e.g. forward xl")
    ap.add_argument("--xl-blocks", type=int, default=None,
                    help="blocks of the XL-shaped model of bench_xl and bench_lowbit (default 28)")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for results-KIND.md / results-KIND.json")
    ap.add_argument("--default-malloc", action="store_true", help=f"do not set {', '.join(MALLOC_ENV)}")
    args = ap.parse_args(argv)
    env = dict(os.environ) if args.default_malloc else {**os.environ, **MALLOC_ENV}
    info = machine()
    info["malloc_env"] = {} if args.default_malloc else MALLOC_ENV
    info["load_before"] = loadavg()
    t_start = time.perf_counter()
    checks, sections, failed, details = [], [], [], {}
    for script in sorted(HERE.glob("bench_*.py")):
        name = script.stem[len("bench_"):]
        if args.only and name not in args.only:
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{script.stem}"]
        if args.quick:
            cmd.append("--quick")
        if name in ("xl", "lowbit") and args.xl_blocks:
            cmd += ["--blocks", str(args.xl_blocks)]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "r.json"
            print(f"== {script.name}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd + ["--json", str(out)], capture_output=True, text=True, env=env, cwd=HERE.parent)
            sec = time.perf_counter() - t0
            print(proc.stdout, end="", flush=True)
            if proc.returncode or not out.is_file():
                failed.append(script.name)
                print(proc.stderr, file=sys.stderr)
            else:
                res = json.loads(out.read_text())
                checks += res["checks"]
                details[name] = res["details"]
        sections.append(f"### {script.name} ({sec:.0f} s)\n\n```\n{proc.stdout.strip()}\n```\n")
    checks += book_checks()
    info["load_after"] = loadavg()
    info["total_s"] = time.perf_counter() - t_start
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n_pass = sum(c["status"] == "PASS" for c in checks)
    n_fail = sum(c["status"] == "FAIL" for c in checks)
    head = (f"# Benchmark results ({stamp}{', QUICK run: not for the record' if args.quick else ''})\n\n"
            f"Machine: {info['cpu']} ({info['kind']}: int8 dot products {'yes' if info['kind'] in ('AMX', 'VNNI') else 'no'}, "
            f"torch CPU capability {info['capability']}), {info['cores']} cores; torch {info['torch']}, "
            f"Python {info['python']}; one "
            f"torch thread per benchmark; glibc malloc settings "
            f"{' '.join(f'{k}={v}' for k, v in info['malloc_env'].items()) or 'default'}. "
            f"Load average (1/5/15 min) before: {info['load_before']}, after: "
            f"{info['load_after']}. Whole run: {info['total_s'] / 60:.1f} min. {n_pass} PASS, {n_fail} FAIL"
            f"{', failed scripts: ' + ', '.join(failed) if failed else ''}.\n\n")
    md = head + table(checks) + "\n\n## Reports of the scripts\n\n" + "\n".join(sections)
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"results-{info['kind']}.md"
    report.write_text(md)
    from hqdit_utils.files import write_json_atomic  # deferred like machine()

    write_json_atomic(report.with_suffix(".json"), {"stamp": stamp, "quick": args.quick, "machine": info,
                                                  "checks": checks, "details": details, "failed": failed})
    print("\n" + table(checks))
    print(f"\nwhole run {info['total_s'] / 60:.1f} min; load average before {info['load_before']}, after "
          f"{info['load_after']}; wrote {report}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
