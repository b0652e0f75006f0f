"""Throughput of ``fake_quantize`` for FP4 E2M1 against baselines measured in the same run.

Baselines: an inline INT4 round-and-clamp (the cheapest honest 4-bit quantizer) and ``x.clone()``
(the memory-bound floor). Tensor: 4096 × 4096 float32 (``--quick``: 2048 × 2048, 3 repeats). Prints
medians of 21 repeats (one call takes tens of ms, and short timings on a shared machine are noisy), the
cases timed round-robin, and the ratios. Target (issue 9): FP4 per-tensor ≤ 2× INT4 and ≤ 6× clone; the
per-channel, MXFP4 and NVFP4 ratios are reported against the same baselines.

    python -m benchmarks.bench_quantizer [--quick] [--json out.json]
"""
from __future__ import annotations

import torch

from hqdit_utils.engine.quantizer import fake_quantize
from hqdit_utils.timing import interleaved_medians

from ._report import check, finish, parser, setup


def int4_round_clamp(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax() / 7
    return (x / s).round_().clamp_(-7, 7).mul_(s)


def main(argv=None) -> list[dict]:
    args = parser(__doc__.split("\n")[0]).parse_args(argv)
    setup(args)
    n, repeats = (2048, 3) if args.quick else (4096, 21)
    torch.manual_seed(0)
    x = torch.randn(n, n)
    cases = {
        "clone (floor)": lambda: x.clone(),
        "int4 round+clamp (baseline)": lambda: int4_round_clamp(x),
        "fp4_e2m1 per-tensor": lambda: fake_quantize(x, "fp4_e2m1", check_finite=False),
        "fp4_e2m1 per-tensor, finite check": lambda: fake_quantize(x, "fp4_e2m1"),
        "fp4_e2m1 per-channel": lambda: fake_quantize(x, "fp4_e2m1", axis=0, check_finite=False),
        "MXFP4 (block 32, e8m0)": lambda: fake_quantize(x, "fp4_e2m1", block_size=32, scale_format="e8m0",
                                                        check_finite=False),
        "NVFP4 (block 16, e4m3 + fp32)": lambda: fake_quantize(x, "fp4_e2m1", block_size=16,
                                                               scale_format="fp8_e4m3fn", check_finite=False),
    }
    t = interleaved_medians(cases, repeats=repeats)
    base, floor = t["int4 round+clamp (baseline)"], t["clone (floor)"]
    print(f"fake_quantize on a {n}x{n} float32 tensor, {torch.get_num_threads()} thread(s), median of {repeats} "
          "(cases timed round-robin)")
    print(f"{'case':38s} {'ms':>8s} {'x INT4':>8s} {'x clone':>8s}")
    for name, sec in t.items():
        print(f"{name:38s} {sec * 1e3:8.1f} {sec / base:8.2f} {sec / floor:8.2f}")
    checks = []
    for name in list(t)[2:]:
        per_tensor = name == "fp4_e2m1 per-tensor"
        checks.append(check("quantizer", f"{name} / INT4", "inline INT4 round+clamp", t[name] / base,
                            2.0 if per_tensor else None, t[name]))
        checks.append(check("quantizer", f"{name} / clone", "x.clone()", t[name] / floor,
                            6.0 if per_tensor else None, t[name]))
    finish(args, "quantizer", checks, {"shape": [n, n], "repeats": repeats, "seconds": t})
    return checks


if __name__ == "__main__":
    main()
