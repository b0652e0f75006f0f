"""Throughput of ``fake_quantize`` for FP4 E2M1 against baselines measured in the same run.

Baselines: an inline INT4 round-and-clamp (the cheapest honest 4-bit quantizer) and ``x.clone()``
(the memory-bound floor). Tensor: 4096 × 4096 float32. Prints medians of 7 repeats and the ratios.
Target (issue 2/9): FP4 per-tensor ≤ 2× INT4, ≤ 6× clone.

    python benchmarks/bench_quantizer.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_seconds  # noqa: E402

from hqdit_utils.quantizer import fake_quantize  # noqa: E402


def int4_round_clamp(x: torch.Tensor) -> torch.Tensor:
    s = x.abs().amax() / 7
    return (x / s).round_().clamp_(-7, 7).mul_(s)


def main() -> dict:
    torch.manual_seed(0)
    x = torch.randn(4096, 4096)
    cases = {
        "clone (floor)": lambda: x.clone(),
        "int4 round+clamp (baseline)": lambda: int4_round_clamp(x),
        "fp4_e2m1 per-tensor": lambda: fake_quantize(x, "fp4_e2m1", check_finite=False),
        "fp4_e2m1 per-tensor, finite check": lambda: fake_quantize(x, "fp4_e2m1"),
        "fp4_e2m1 per-channel": lambda: fake_quantize(x, "fp4_e2m1", axis=0, check_finite=False),
        "MXFP4 (block 32, e8m0)": lambda: fake_quantize(x, "fp4_e2m1", block_size=32, scale_format="e8m0", check_finite=False),
        "NVFP4 (block 16, e4m3 + fp32)": lambda: fake_quantize(x, "fp4_e2m1", block_size=16, scale_format="fp8_e4m3fn", check_finite=False),
    }
    t = {name: median_seconds(fn) for name, fn in cases.items()}
    base, floor = t["int4 round+clamp (baseline)"], t["clone (floor)"]
    print(f"fake_quantize on a 4096x4096 float32 tensor, {torch.get_num_threads()} threads, median of 7")
    print(f"{'case':38s} {'ms':>8s} {'x INT4':>8s} {'x clone':>8s}")
    for name, sec in t.items():
        print(f"{name:38s} {sec * 1e3:8.1f} {sec / base:8.2f} {sec / floor:8.2f}")
    ratio = t["fp4_e2m1 per-tensor"] / base
    print(f"FP4 per-tensor / INT4 = {ratio:.2f} (target <= 2)")
    return {"seconds": t, "fp4_per_tensor_over_int4": ratio}


if __name__ == "__main__":
    result = main()
    out = Path(__file__).with_name("results_quantizer.json")
    out.write_text(json.dumps(result, indent=2))
