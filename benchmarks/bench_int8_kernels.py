"""Which int8 GEMM kernel this CPU runs fast: the question behind ``lowbit``'s choice of the integer path.

``lowbit`` multiplies integer activation codes by integer weight codes with ``torch._int_mm`` on CPUs with
int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX); without them that kernel is slow, and ``lowbit`` uses
oneDNN's quantized linear instead (``torch.ops.onednn.qlinear_pointwise``, weights prepacked once by
``torch.ops.onednn.qlinear_prepack``; ``lowbit.int_kernel``), another exact int8 GEMM with int32 accumulation
and a float32 output for 4-bit codes. This benchmark times the three on the quantized linears' shapes of one
DiT-XL/2 block (1024 tokens = 4 images × 256) and of the embedded model (batch 64 × 64 tokens), one and two
threads, and checks that both integer kernels are exact: codes in [-12, 12] (E2M1 × 2), per-row weight scales
and one activation scale, compared with a float64 evaluation of the same codes (relative error ≤ 1e-5, the
integer path's own exactness bound).

Ratios are against ``F.linear`` in float32 on the same shapes in the same process; there is no target (it
measures the choice ``lowbit.int_kernel`` makes; ``benchmarks/bench_lowbit.py`` times the whole path).

    python benchmarks/bench_int8_kernels.py [--quick] [--threads-list 1,2] [--json out.json]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hqdit_utils.engine.lowbit import int_mm_fast
from hqdit_utils.timing import interleaved_medians

from ._report import check, finish, parser

#: (name, rows, in_features, out_features): DiT-XL/2's quantized block linears at 1024 tokens (q, k, v and the
#: attention output share one shape) and the embedded model's (width 144, MLP 576) at 64 × 64 tokens.
SHAPES = [("XL q/k/v/out", 1024, 1152, 1152), ("XL fc1", 1024, 1152, 4608), ("XL fc2", 1024, 4608, 1152),
          ("embedded q/k/v/out", 4096, 144, 144), ("embedded fc1", 4096, 144, 576),
          ("embedded fc2", 4096, 576, 144)]
CODE_MAX = 12  # E2M1 codes times 2


def kernels(rows: int, k: int, n: int, gen: torch.Generator) -> tuple[dict, torch.Tensor, dict]:
    """The three ways to compute ``(a_codes · s_a) @ (w_codes · s_w)ᵀ``: float32, ``_int_mm``, oneDNN.

    Returns the callables, the float64 reference [rows, n] and each integer kernel's output [rows, n]."""
    a = torch.randint(-CODE_MAX, CODE_MAX + 1, (rows, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-CODE_MAX, CODE_MAX + 1, (n, k), generator=gen, dtype=torch.int8)
    s_w = torch.rand(n, generator=gen) + 0.5  # per output row
    s_a = 0.37  # one static activation scale
    x, wf = a.float() * s_a, w.float() * s_w[:, None]
    w_t = w.t().contiguous()
    packed = torch.ops.onednn.qlinear_prepack(w, [rows, k])
    zeros = torch.zeros(n, dtype=torch.int64)

    def int_mm():
        return torch._int_mm(a, w_t).float() * (s_a * s_w)

    def onednn():
        return torch.ops.onednn.qlinear_pointwise(a, s_a, 0, packed, s_w, zeros, None, 1.0, 0, torch.float32,
                                                  "none", [], "")

    ref = (a.double() @ w.double().t()) * (s_a * s_w.double())
    fns = {"fp32 F.linear": lambda: F.linear(x, wf), "torch._int_mm": int_mm, "oneDNN qlinear": onednn}
    return fns, ref, {"torch._int_mm": int_mm(), "oneDNN qlinear": onednn()}


def main(argv=None) -> list[dict]:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--threads-list", default="1,2", help="comma-separated thread counts (default 1,2)")
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else 7
    shapes = SHAPES[:1] + SHAPES[3:4] if args.quick else SHAPES
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; int8 dot-product instructions: "
          f"{'yes' if int_mm_fast() else 'no'} (lowbit.int_mm_fast)")
    gen = torch.Generator().manual_seed(0)
    checks, details = [], {}
    for name, rows, k, n in shapes:
        fns, ref, outs = kernels(rows, k, n, gen)
        for kernel, out in outs.items():
            err = ((out.double() - ref).norm() / ref.norm()).item()
            if err > 1e-5:
                raise SystemExit(f"{kernel} is not exact on {name}: relative error {err:.2e} > 1e-5")
            details[f"{name} {kernel} relative error"] = err
        for nt in (int(t) for t in args.threads_list.split(",")):
            torch.set_num_threads(nt)
            t = interleaved_medians(fns, repeats)
            line = ", ".join(f"{kn} {sec * 1e3:.2f} ms ({sec / t['fp32 F.linear']:.2f}x)" for kn, sec in t.items())
            print(f"[{nt}t] {name} {rows}x{k} @ {k}x{n}: {line}")
            details[f"{name} {nt}t ms"] = {kn: sec * 1e3 for kn, sec in t.items()}
            for kn in ("torch._int_mm", "oneDNN qlinear"):
                checks.append(check("int8_kernels", f"{name} {kn}, {nt}t", "fp32 F.linear",
                                    t[kn] / t["fp32 F.linear"], None, t[kn]))
    finish(args, "int8_kernels", checks, details)
    return checks


if __name__ == "__main__":
    main()
