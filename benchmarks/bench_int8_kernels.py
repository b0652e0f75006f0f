"""Which int8 GEMM kernel this CPU runs fast: what ``lowbit.choose_kernel`` measures, on the model's shapes.

``lowbit`` multiplies integer activation codes by integer weight codes with one of two exact kernels,
``torch._int_mm`` or oneDNN's quantized linear (``torch.ops.onednn.qlinear_pointwise`` with unit scales, weights
prepacked once by ``torch.ops.onednn.qlinear_prepack``), and applies one rescale to the exact accumulator
(``lowbit.rescale``), so both give the same bits; which one runs is measured per shape (``lowbit.choose_kernel``).
Their speeds differ by orders of magnitude between CPUs (``torch._int_mm`` has no fast kernel without int8
dot-product instructions; oneDNN may run a reference kernel). This benchmark times both, each with the rescale,
against ``F.linear`` in float32 and in bfloat16 (what a CPU user would run instead; issue 30) on the quantized
linears' shapes of one DiT-XL/2 block (1024 tokens = 4 images × 256) and of the embedded model (batch 64 × 64
tokens), one and two threads; checks that both kernels give identical outputs, exact against a float64
evaluation of the same codes (relative error ≤ 1e-5): codes in [-12, 12] (E2M1 × 2), per-row weight scales and
one activation scale; and prints the kernel ``lowbit.choose_kernel`` picks for the shape.

Ratios are against FP32 and BF16 ``F.linear`` on the same shapes in the same process; there is no target (the
whole path is timed by ``benchmarks/bench_lowbit.py``). A kernel that ``choose_kernel``'s small probe found more
than 8× slower than the other (a reference kernel: seconds per call) is not timed on the full shape.

    python benchmarks/bench_int8_kernels.py [--quick] [--threads-list 1,2] [--json out.json]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hqdit_utils.engine import lowbit
from hqdit_utils.timing import interleaved_medians

from ._report import check, cpu_line, finish, parser

#: (name, rows, in_features, out_features): DiT-XL/2's quantized block linears at 1024 tokens (q, k, v and the
#: attention output share one shape) and the embedded model's (width 144, MLP 576) at 64 × 64 tokens.
SHAPES = [("XL q/k/v/out", 1024, 1152, 1152), ("XL fc1", 1024, 1152, 4608), ("XL fc2", 1024, 4608, 1152),
          ("embedded q/k/v/out", 4096, 144, 144), ("embedded fc1", 4096, 144, 576),
          ("embedded fc2", 4096, 576, 144)]
CODE_MAX = 12  # E2M1 codes times 2
CHECK_ROWS = 64


def kernels(rows: int, k: int, n: int, gen: torch.Generator) -> tuple[dict, torch.Tensor, dict]:
    """The ways to compute ``(a_codes · s_a) @ (w_codes · s_w)ᵀ``: float32, bfloat16, ``_int_mm``, oneDNN (both
    integer kernels with ``lowbit.rescale``, as the integer path runs them).

    Returns the callables, the float64 reference [rows, n] and each integer kernel's output [rows, n]."""
    a = torch.randint(-CODE_MAX, CODE_MAX + 1, (rows, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-CODE_MAX, CODE_MAX + 1, (n, k), generator=gen, dtype=torch.int8)
    s_w = torch.rand(n, generator=gen) + 0.5  # per output row
    s_a = torch.tensor(0.37)  # one static activation scale
    x, wf = a.float() * s_a, w.float() * s_w[:, None]
    xb, wb = x.bfloat16(), wf.bfloat16()
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int64)

    def int_mm():
        return lowbit.rescale(lowbit.int_matmul(a, w), s_a, s_w, None)

    def onednn():
        return lowbit.rescale(lowbit._onednn_linear(a, 1.0, packed, ones, zeros, None), s_a, s_w, None)

    c = a[:CHECK_ROWS]  # the exactness check on the first rows (a reference kernel takes seconds on all)
    ref = (c.double() @ w.double().t()) * (s_a.double() * s_w.double())
    outs = {"torch._int_mm": lowbit.rescale(lowbit.int_matmul(c, w), s_a, s_w, None),
            "oneDNN qlinear": lowbit.rescale(lowbit._onednn_linear(c, 1.0, packed, ones, zeros, None), s_a, s_w, None)}
    fns = {"fp32 F.linear": lambda: F.linear(x, wf), "bf16 F.linear": lambda: F.linear(xb, wb),
           "torch._int_mm": int_mm, "oneDNN qlinear": onednn}
    return fns, ref, outs


def main(argv=None) -> list[dict]:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--threads-list", default="1,2", help="comma-separated thread counts (default 1,2)")
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else 7
    shapes = SHAPES[:1] + SHAPES[3:4] if args.quick else SHAPES
    print(cpu_line())
    gen = torch.Generator().manual_seed(0)
    checks, details = [], {}
    for name, rows, k, n in shapes:
        fns, ref, outs = kernels(rows, k, n, gen)
        if not torch.equal(outs["torch._int_mm"], outs["oneDNN qlinear"]):
            raise SystemExit(f"the kernels' outputs differ on {name}: lowbit.rescale is not applied alike")
        for kernel, out in outs.items():
            err = ((out.double() - ref).norm() / ref.norm()).item()
            if err > 1e-5:
                raise SystemExit(f"{kernel} is not exact on {name}: relative error {err:.2e} > 1e-5")
            details[f"{name} {kernel} relative error"] = err
        for nt in (int(t) for t in args.threads_list.split(",")):
            torch.set_num_threads(nt)
            choice = lowbit.choose_kernel(k, n)
            skipped = {kn for kn, lk in (("torch._int_mm", "torch._int_mm"), ("oneDNN qlinear", "onednn"))
                       if choice["ms"].get(lk, 0.0) is None}  # > 8x slower than the other on choose_kernel's probe
            t = interleaved_medians({kn: f for kn, f in fns.items() if kn not in skipped}, repeats)
            line = ", ".join(f"{kn} {t[kn] * 1e3:.2f} ms ({t[kn] / t['fp32 F.linear']:.2f}x FP32, "
                             f"{t[kn] / t['bf16 F.linear']:.2f}x BF16)" if kn in t else
                             f"{kn} not timed (probe {choice['probe_ms']})" for kn in fns)
            print(f"[{nt}t] {name} {rows}x{k} @ {k}x{n}: {line}; lowbit.choose_kernel: {choice['kernel']}")
            details[f"{name} {nt}t ms"] = {kn: sec * 1e3 for kn, sec in t.items()}
            details[f"{name} {nt}t choice"] = choice
            for kn in ("bf16 F.linear", "torch._int_mm", "oneDNN qlinear"):
                checks.append(check("int8_kernels", f"{name} {kn}, {nt}t", "fp32 F.linear",
                                    t[kn] / t["fp32 F.linear"] if kn in t else None, None, t.get(kn)))
            for kn in ("torch._int_mm", "oneDNN qlinear"):
                checks.append(check("int8_kernels", f"{name} {kn}, {nt}t", "bf16 F.linear",
                                    t[kn] / t["bf16 F.linear"] if kn in t else None, None, t.get(kn)))
    finish(args, "int8_kernels", checks, details)
    return checks


if __name__ == "__main__":
    main()
