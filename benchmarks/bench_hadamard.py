"""Benchmark: online Hadamard rotation and GPTQ cost on DiT-XL/2 shapes (CPU).

1. Online rotation of ``tokens`` activations of width 1152 and 4608 (DiT-XL/2's hidden and MLP widths):
   :func:`hqdit_utils.engine.hadamard.fast_hadamard_transform` (dense order-36 factor + butterfly) against a
   dense ``x @ Q`` with the same ``Q``; median of ``--repeats`` runs; target ratio ≤ 0.5.
2. GPTQ of one [1152 out, 4608 in] and one [4608 out, 1152 in] layer on ``--calib-rows`` calibration
   rows, against one dense ``X Wᵀ`` over the same rows (ratio reported, no target).

Run::

    .venv/bin/python -m benchmarks.bench_hadamard                 # 1 thread (see below)
    .venv/bin/python -m benchmarks.bench_hadamard --threads 2 --calib-rows 2048
    .venv/bin/python -m benchmarks.bench_hadamard --quick          # 3 repeats, 256 GPTQ rows

Threads: the default is 1 thread. On a shared machine, multi-threaded small element-wise ops can wait a
whole scheduler slice for a busy core, which makes timings of short kernels meaningless; one thread
measures the arithmetic. Both sides of every ratio run with the same setting. Measured on the shared
2-core build machine (a training run on the other core, 2026-11-25): 1 thread — 1152: 0.10×, 4608: 0.06×
(target met); 2 threads — 1152: ≈4×, 4608: ≈0.7×, because each of the butterfly's ~12 small kernels then
waits for a descheduled worker thread (the dense matmul is one kernel). GPTQ, 512 rows, 1 thread:
≈85× one X·Wᵀ for 1152×4608 (mostly the Cholesky factorisation and triangular inverse of the
4608×4608 Hessian), ≈11× for 4608×1152.
"""
from __future__ import annotations

import time

import torch

from hqdit_utils.engine.gptq import GPTQ
from hqdit_utils.engine.hadamard import HadamardSpec, fast_hadamard_transform
from hqdit_utils.timing import median_seconds

from ._report import check, finish, parser, setup


def _median_time(fn, repeats: int) -> float:
    return median_seconds(fn, repeats=repeats, warmup=1)


def bench_rotation(widths, tokens: int, repeats: int, seed: int = 0) -> list[dict]:
    rows = []
    for n in widths:
        spec = HadamardSpec(n, seed=seed)
        q = spec.matrix(torch.float32)
        x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(1))
        err = float((fast_hadamard_transform(x, spec) - x @ q).abs().max())
        t_dense = _median_time(lambda: x @ q, repeats)
        t_fast = _median_time(lambda: fast_hadamard_transform(x, spec), repeats)
        rows.append({"n": n, "dense_ms": 1e3 * t_dense, "fast_ms": 1e3 * t_fast,
                     "ratio": t_fast / t_dense, "max_abs_diff": err})
    return rows


def bench_gptq(shapes, calib_rows: int, fmt: str = "fp4_e2m1") -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(2)
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
        # Correlated inputs (a low-rank component plus noise), like activations.
        x = torch.randn(calib_rows, 64, generator=g) @ torch.randn(64, in_f, generator=g) * 0.2 \
            + torch.randn(calib_rows, in_f, generator=g)
        t_dense = _median_time(lambda: x @ w.t(), 3)
        t0 = time.perf_counter()
        gq = GPTQ(w).add_batch(x)
        t_hess = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = gq.quantize(fmt)
        t_quant = time.perf_counter() - t0
        rows.append({"shape": f"{out_f}x{in_f}", "dense_ms": 1e3 * t_dense, "hessian_s": t_hess,
                     "quantize_s": t_quant, "ratio": (t_hess + t_quant) / t_dense, "retries": res.retries})
    return rows


def main(argv=None) -> list[dict]:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calib-rows", type=int, default=512)
    ap.add_argument("--skip-gptq", action="store_true")
    args = ap.parse_args(argv)
    setup(args)
    if args.quick:
        args.repeats, args.calib_rows = 3, 256
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, tokens {args.tokens}, "
          f"median of {args.repeats}")
    print("\nOnline Hadamard rotation (fast transform vs dense x @ Q, same Q):")
    print(f"{'n':>6} {'dense ms':>10} {'fast ms':>10} {'ratio':>7} {'max|diff|':>10}")
    checks, details = [], {}
    details["rotation"] = bench_rotation([1152, 4608], args.tokens, args.repeats)
    for r in details["rotation"]:
        print(f"{r['n']:>6} {r['dense_ms']:>10.2f} {r['fast_ms']:>10.2f} {r['ratio']:>7.3f} {r['max_abs_diff']:>10.2e}")
        checks.append(check("hadamard", f"online Hadamard {r['n']} wide, {args.tokens} tokens",
                            "dense x @ Q, same Q", r["ratio"], 0.5, r["fast_ms"] / 1e3))
    if not args.skip_gptq:
        print(f"\nGPTQ (fp4_e2m1, blocksize 128) vs one dense X·Wᵀ over {args.calib_rows} calibration rows:")
        print(f"{'out x in':>10} {'X·Wᵀ ms':>9} {'Hessian s':>10} {'GPTQ s':>8} {'ratio':>8} {'retries':>7}")
        details["gptq"] = bench_gptq([(1152, 4608), (4608, 1152)], args.calib_rows)
        for r in details["gptq"]:
            print(f"{r['shape']:>10} {r['dense_ms']:>9.1f} {r['hessian_s']:>10.2f} {r['quantize_s']:>8.2f} "
                  f"{r['ratio']:>8.0f} {r['retries']:>7}")
            checks.append(check("hadamard", f"GPTQ {r['shape']} ({args.calib_rows} rows)",
                                "one dense X·Wᵀ over the rows", r["ratio"], None,
                                r["hessian_s"] + r["quantize_s"], note="single run"))
    finish(args, "hadamard", checks, details)
    return checks


if __name__ == "__main__":
    main()
