"""Real 4-bit execution on the CPU (issue 16): the exact integer path against FP32, one and two threads.

All ratios are against the FP32 forward measured in the same process with the same thread count; the cases
are timed round-robin (``_timing.interleaved_medians``). ``int8`` = weight codes held as int8 [out, in];
``packed`` = two 4-bit codes per byte, unpacked per call; ``sim`` = the same quantized model on the simulated
(fake-quantized float) path; ``int8 free act`` = the integer path with rotation and rounding free (each layer
reuses its first call's activation codes): the floor a perfect activation path would leave; ``… compiled`` (XL
block) = the block under ``torch.compile``.

1. DiT-XL/2-shaped block (width 1152, MLP 4608, 1024 tokens = 4 images × 256), ``hqdit-w4a4`` (online
   Hadamard rotation, static FP4 activations, per-layer FP4 formats, GPTQ) — quantized by ``quantize_`` on a
   one-block XL-shaped model with a small calibration (2 trajectories × 2 timesteps; 10-point γ grid: the
   forward computes the same operations whatever the calibration). Targets (issue 30): ≤ 0.30× FP32 and ≤ 1.0×
   BF16 on a CPU with AMX or VNNI, ≤ 0.6× FP32 on an AVX2-only CPU. BF16 = the FP32 model under CPU bfloat16
   autocast, timed beside every FP32 baseline of this script.
2. Whole XL-shaped transformer forward, batch 2, same recipe and calibration protocol but round-to-nearest
   weights instead of GPTQ (GPTQ takes ~1 min per XL block here and changes weight values, not the forward's
   operations) (``--blocks``, default 28; ``--quick`` 2). Target ≤ 0.6×.
3. Embedded model, batch 64, ``hqdit-w4a4`` (``ci``-profile calibration). Target ≤ 0.8×. Also ``fp4-hybrid``
   on the integer path: no rotation, but not a measure of what the rotation costs, since its per-layer formats
   differ from hqdit-w4a4's (E3M0 activations, chosen for fc1/fc2 of most blocks, round by the general path,
   several times slower than E2M1's); ``int8 free act`` is that measure.
4. Breakdown of the XL block's quantized linears (1024 rows): online rotation, activation rounding to codes,
   unpacking (packed only), int8 GEMM with its float rescale + bias (``lowbit.rescale``, the same for every
   kernel), against FP32 and BF16 ``F.linear`` of the same shapes.
5. Memory, in fresh subprocesses (one thread): peak RSS of a full 28-block XL-shaped model doing one forward
   at batch 2, FP32 against the same model whose quantized linears hold only packed 4-bit codes + row scales
   (built layer by layer from a meta-device skeleton, so no FP32 copy of those layers ever exists; the values
   are random, the shapes and the run-time structure are hqdit-w4a4's). Both processes: glibc returns freed
   blocks ≥ 64 KiB to the system (:data:`MEMORY_ENV`). Two layer selections: the recipe's
   block linears, and every FC layer incl. adaLN (``*-all-fc``). Targets: peak ≤ 0.4× FP32 (block linears),
   weight bytes of the quantized layers ≤ 0.135× FP32.

    python -m benchmarks.bench_lowbit [--quick] [--threads-list 1,2] [--blocks N] [--json out.json]
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from hqdit_utils.engine import lowbit
from hqdit_utils.engine.calibration import calibrate
from hqdit_utils.dit_configs import DiT_XL_2
from hqdit_utils.engine.layers import ALL_FC_LAYERS, DEFAULT_LAYERS, select_linears
from hqdit_utils.dit.models import dit_xl2_shaped_random, load_dit
from hqdit_utils.engine.qlinear import QuantLinear
from hqdit_utils.engine.recipes import get_recipe
from hqdit_utils.timing import interleaved_medians

from ._dit import Bf16Autocast, calibration_protocol, denoiser_inputs, forward_medians, quantized_copy
from hqdit_utils.provenance import cpu_kind

from ._report import check, cpu_line, finish, parser, peak_rss_gb

RECIPE = "hqdit-w4a4"
#: Issue 30's targets for the XL-shaped block's integer path (× FP32, × BF16) by CPU kind (``provenance.cpu_kind``).
BLOCK_TARGETS = {"AMX": (0.30, 1.0), "VNNI": (0.30, 1.0), "AVX2": (0.6, None), "unknown": (0.6, None)}
#: The XL block's reported ratios: (case label, timed variant, baseline variant).
BLOCK_REPORTS = [("BF16 autocast", "bf16", "fp32"), (f"{RECIPE} packed codes", "packed", "fp32"),
                 (f"{RECIPE} simulated", "sim", "fp32"),
                 ("floor (activation path free: FP32 remainder + int8 GEMMs)", "int8 free act", "fp32"),
                 ("floor (activation path free: FP32 remainder + int8 GEMMs)", "int8 free act", "bf16"),
                 (f"{RECIPE} int8 torch.compile", "int8 compiled", "fp32"),
                 (f"{RECIPE} int8 torch.compile", "int8 compiled", "bf16"),
                 (f"{RECIPE} int8 torch.compile", "int8 compiled", "fp32 compiled")]
BLOCK_BASELINES = {"fp32": "FP32 block", "bf16": "BF16 block", "fp32 compiled": "FP32 block compiled"}
#: The memory subprocesses return every freed block of 64 KiB or more to the system (a fixed mmap threshold), so
#: that peak RSS counts live tensors, not the allocator's kept free blocks (run_all.py's settings keep up to
#: 1 GB of them for speed, which would count in whichever process frees most temporaries).
MEMORY_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16), "MALLOC_TRIM_THRESHOLD_": str(1 << 16)}


def _variants(q, free: bool = True) -> dict:
    """The quantized model ``q`` (integer path, int8 codes) plus a packed-codes copy (float weights dropped), a
    simulated-path copy, and (``free``) a copy whose activation path is free (:func:`_free_activation_path`; one
    more full copy, left out for the 28-block XL model, whose copies would not fit in 24 GB)."""
    packed = copy.deepcopy(q)
    lowbit.set_execution(packed, "auto", weights="packed")
    lowbit.drop_float_weights_(packed)
    sim = copy.deepcopy(q)
    lowbit.set_execution(sim, "sim")
    return {"int8": q, "packed": packed, "sim": sim, **({"int8 free act": _free_activation_path(q)} if free else {})}


def _free_activation_path(q):
    """A copy of ``q`` whose integer-path layers pay nothing for rotation and rounding: each returns the activation
    codes of its first call at that input shape (the timed inputs do not change), so a forward takes the model's
    float remainder plus the int8 GEMMs and rescales — the floor a free activation path would leave."""
    free = copy.deepcopy(q)
    for m in free.modules():
        if isinstance(m, QuantLinear) and m.lowbit is not None and m.lowbit.enabled:
            def act_codes(layer, x, _compute=m.lowbit.act_codes, _memo={}):
                if x.shape not in _memo:
                    _memo[x.shape] = _compute(layer, x)
                return _memo[x.shape]
            m.lowbit.act_codes = act_codes
    return free


def _kernels(model) -> str:
    """The int8 GEMM kernel(s) the integer-path layers of ``model`` run (measured: ``lowbit.choose_kernel``)."""
    return ", ".join(sorted({m.lowbit.kernel for m in model.modules()
                             if isinstance(m, QuantLinear) and m.lowbit is not None and m.lowbit.enabled}))


def _xl_quantized(blocks: int, gptq: bool = True):
    """A ``blocks``-block XL-shaped random model and its hqdit-w4a4 copy (small calibration, 10-point γ grid;
    ``gptq=False`` rounds to nearest: other weight values, the same forward operations)."""
    bundle = dit_xl2_shaped_random(seed=0, num_layers=blocks)
    calib = calibrate(bundle, seed=0, **calibration_protocol(2, 2, 2, 2))
    recipe = get_recipe(RECIPE).replace(clip_grid=(10, 0.3, 1.0), gptq=gptq)
    q, t_q = quantized_copy(bundle.transformer, recipe, calib)
    return bundle, q, t_q


def _block_call(model, inputs):
    """(block, args, kwargs) of the first transformer block's call inside ``model(*inputs)``."""
    seen = {}

    def hook(mod, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
    h = model.transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    x, t, y = inputs
    with torch.no_grad():
        model(x, timestep=t, class_labels=y)
    h.remove()
    return seen["args"], seen["kwargs"]


def _compiled_blocks(models: dict, args, kwargs) -> dict:
    """``{name + " compiled": holder}``: block 0 of each model under ``torch.compile``, compiled by one call here
    (its seconds printed), held where :func:`_timed_blocks` looks for a block."""
    out = {}
    for name, m in models.items():
        blk = torch.compile(m.transformer_blocks[0], dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            blk(*args, **kwargs)
        print(f"  torch.compile of the {name} block: first call {time.perf_counter() - t0:.1f} s")
        out[f"{name} compiled"] = types.SimpleNamespace(transformer_blocks=[blk])
    return out


def _timed_blocks(models: dict, args, kwargs, repeats: int) -> dict:
    def call(m):
        bf16 = isinstance(m, Bf16Autocast)
        blk = (m.model if bf16 else m).transformer_blocks[0]

        @torch.no_grad()
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return blk(*args, **kwargs)
        return run
    return interleaved_medians({n: call(m) for n, m in models.items()}, repeats=repeats, warmup=1)


def _breakdown(fp32_model, q, packed, n_rows: int, repeats: int) -> list[dict]:
    """Milliseconds of each stage of block 0's quantized linears, on random inputs of ``n_rows`` rows (tokens × batch;
    the values do not change the cost): one row per layer."""
    rows = []
    names = [n for n, m in q.named_modules() if isinstance(m, QuantLinear) and n.startswith("transformer_blocks.0.")]
    g = torch.Generator().manual_seed(0)
    for name in names:
        layer, player = q.get_submodule(name), packed.get_submodule(name)
        lin = fp32_model.get_submodule(name)
        st, pst = layer.lowbit, player.lowbit
        x = torch.randn(n_rows, layer.in_features, generator=g)
        xr = layer.transform_input(x)
        a, s, _ = st.act_codes(layer, x)
        b = layer.bias.to(torch.float32)
        xb, wb, bb = x.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()
        fns = {"fp32 linear": lambda: F.linear(x, lin.weight, lin.bias),
               "bf16 linear": lambda: F.linear(xb, wb, bb),
               "rotate": lambda: layer.transform_input(x),
               "quantize": lambda: lowbit.quantize_to_codes(xr, s, layer.act_quantizer().fmt),
               "unpack": lambda: pst.int8_codes(),
               "gemm+rescale": lambda: st.matmul(a, s, b),
               "int8 layer": lambda: layer(x),
               "packed layer": lambda: player(x)}
        with torch.no_grad():
            t = interleaved_medians(fns, repeats=repeats, warmup=1)
        rows.append({"layer": name.split("transformer_blocks.0.")[1], "shape": f"{layer.in_features}->{layer.out_features}",
                     "format": f"W {layer.weight_format} / A {layer.act_format}",
                     **{k: v * 1e3 for k, v in t.items()}})
    return rows


def _print_breakdown(rows: list[dict], rows_label: str = "1024 rows") -> None:
    keys = ["fp32 linear", "bf16 linear", "rotate", "quantize", "unpack", "gemm+rescale", "int8 layer",
            "packed layer"]
    print(f"  {'layer (' + rows_label + ')':18s} {'shape':>10s} " + " ".join(f"{k:>12s}" for k in keys) + "   (ms)")
    tot = {k: 0.0 for k in keys}
    for r in rows:
        print(f"  {r['layer']:18s} {r['shape']:>10s} " + " ".join(f"{r[k]:12.2f}" for k in keys))
        for k in keys:
            tot[k] += r[k]
    print(f"  {'sum':18s} {'':>10s} " + " ".join(f"{tot[k]:12.2f}" for k in keys))
    share = tot["rotate"] + tot["quantize"] + tot["gemm+rescale"]
    print(f"  int8 path = rotate {tot['rotate'] / share:.0%} + quantize {tot['quantize'] / share:.0%} + GEMM and "
          f"rescale {tot['gemm+rescale'] / share:.0%} (of the stages' sum {share:.1f} ms; "
          f"q/k/v share one rotation and quantization in the model, here each layer does its own)")


# --------------------------------------------------------------------------------------------------
# Memory (subprocesses)
# --------------------------------------------------------------------------------------------------
def _memory_child(kind: str, layers: str, blocks: int) -> dict:
    """Build an XL-shaped model from a meta skeleton (FP32, or with packed 4-bit quantized linears), run one
    forward at batch 2, return peak RSS and weight bytes."""
    from diffusers import DiTTransformer2DModel
    from torch import nn

    from hqdit_utils.engine.export import PackedWeight
    from hqdit_utils.engine.hadamard import HadamardSpec

    torch.set_num_threads(1)
    rss0 = peak_rss_gb()
    with torch.device("meta"):
        model = DiTTransformer2DModel(**DiT_XL_2(depth=blocks)).eval()
    g = torch.Generator().manual_seed(0)
    q_bytes = fp32_bytes = 0
    if kind == "packed":
        patterns = DEFAULT_LAYERS if layers == "block" else ALL_FC_LAYERS
        for name, lin in select_linears(model, patterns).items():
            # random codes (every byte is two valid FP4 patterns) and row scales, straight into a codes-only
            # layer, as load_quantized does with a packed file: no float weight of the layer ever exists
            n_in, n_out = lin.in_features, lin.out_features
            codes = torch.randint(0, 256, (n_out, n_in // 2), dtype=torch.uint8, generator=g)
            p = PackedWeight(codes, torch.rand(n_out, 1, generator=g) * 0.01, "fp4_e2m1", (n_out, n_in))
            ql = QuantLinear(n_in, n_out, weight=lowbit.placeholder_weight(n_out, n_in), bias=torch.zeros(n_out),
                             weight_format="fp4_e2m1", act_format="fp4_e2m1", act_mode="static",
                             act_scale=torch.tensor([0.5]), rotation=HadamardSpec(n_in, seed=0), name=name)
            lowbit.install_packed(ql, p)
            lowbit.set_execution(ql, "int")
            q_bytes += ql.lowbit.nbytes
            fp32_bytes += 4 * n_in * n_out
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ql)
    for mod in model.modules():  # everything still on the meta device: random FP32 values, one tensor at a time
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(mod, pname, nn.Parameter(torch.randn(p.shape, generator=g) * 0.02, requires_grad=False))
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                setattr(mod, bname, torch.randn(buf.shape, generator=g) * 0.02)
    rss_built = peak_rss_gb()
    x = torch.randn(2, 4, 32, 32, generator=g)
    with torch.no_grad():
        out = model(x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 2])).sample
    assert torch.isfinite(out).all()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"kind": kind, "layers": layers, "rss_import_gb": rss0, "rss_built_gb": rss_built,
            "peak_rss_gb": peak_rss_gb(), "quantized_bytes": q_bytes, "quantized_fp32_bytes": fp32_bytes,
            "float_param_bytes": params}


def _memory(blocks: int) -> dict:
    out = {}
    for kind, layers in (("fp32", "-"), ("packed", "block"), ("packed", "all-fc")):
        cmd = [sys.executable, "-m", "benchmarks.bench_lowbit", "--memory-child", kind, "--memory-layers", layers, "--blocks", str(blocks)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=MEMORY_ENV,
                              cwd=Path(__file__).resolve().parents[1])
        out[f"{kind} {layers}".strip(" -")] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> list[dict]:
    ap = parser(__doc__.split("\n")[0])
    ap.add_argument("--threads-list", default="1,2", help="thread counts to measure (comma-separated)")
    ap.add_argument("--blocks", type=int, default=None, help="blocks of the whole XL-shaped model (default 28)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["block", "xl", "embedded", "breakdown", "memory"])
    ap.add_argument("--memory-child", choices=["fp32", "packed"], help=argparse_hidden())
    ap.add_argument("--memory-layers", default="block", help=argparse_hidden())
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(_memory_child(args.memory_child, args.memory_layers, args.blocks or 28)))
        return []
    threads = [int(t) for t in args.threads_list.split(",")]
    repeats = 3 if args.quick else 7
    blocks = args.blocks or (2 if args.quick else 28)
    checks, details = [], {"threads": threads, "repeats": repeats, "blocks": blocks, "cpu": cpu_line()}
    print(cpu_line())
    fp32_target, bf16_target = BLOCK_TARGETS[cpu_kind()]
    if not lowbit.int_mm_available():
        print("torch._int_mm is not available: nothing to measure")
        finish(args, "lowbit", [check("lowbit", "integer path", "—", None, note="torch._int_mm unavailable")])
        return []

    # 1 + 4: one XL block, 1024 tokens
    if "block" not in args.skip or "breakdown" not in args.skip:
        t0 = time.perf_counter()
        bundle1, q1, t_q1 = _xl_quantized(1)
        paths = lowbit.execution_paths(q1)
        print(f"XL-shaped block: {RECIPE} quantized in {t_q1:.0f} s (setup {time.perf_counter() - t0:.0f} s); "
              f"paths {sorted(set(paths.values()))}; int8 kernel {_kernels(q1)}")
        inputs = denoiser_inputs(bundle1, 4)
        bargs, bkw = _block_call(bundle1.transformer, inputs)
        models = {"fp32": bundle1.transformer, "bf16": Bf16Autocast(bundle1.transformer), **_variants(q1)}
        if "block" not in args.skip:  # torch.compile of the block, FP32 and integer path (compiled on first call)
            models.update(_compiled_blocks({"fp32": bundle1.transformer, "int8": q1}, bargs, bkw))
        for nt in threads:
            torch.set_num_threads(nt)
            if "block" not in args.skip:
                t = _timed_blocks(models, bargs, bkw, repeats)
                print(f"\n[{nt} thread(s)] XL block, 1024 tokens, median of {repeats}:")
                for n, sec in t.items():
                    print(f"  {n:8s} {sec * 1e3:8.1f} ms  {sec / t['fp32']:6.3f}x FP32  {sec / t['bf16']:6.3f}x BF16")
                details[f"block_s_{nt}t"] = t
                checks += [check("lowbit", f"XL block 1024 tok {RECIPE} int8 codes, {nt}t", "FP32 block",
                                 t["int8"] / t["fp32"], fp32_target, t["int8"],
                                 note=f"target for a {cpu_kind()} CPU (issue 30)"),
                           check("lowbit", f"XL block 1024 tok {RECIPE} int8 codes, {nt}t", "BF16 block",
                                 t["int8"] / t["bf16"], bf16_target, t["int8"],
                                 note=f"target for a {cpu_kind()} CPU (issue 30)")]
                checks += [check("lowbit", f"XL block 1024 tok {label}, {nt}t", BLOCK_BASELINES[base],
                                 t[key] / t[base], None, t[key]) for label, key, base in BLOCK_REPORTS]
            if "breakdown" not in args.skip:
                print(f"\n[{nt} thread(s)] where the time goes, block 0's quantized linears, 1024 rows:")
                rows = _breakdown(bundle1.transformer, q1, models["packed"], bargs[0].reshape(-1, 1152).shape[0], repeats)
                _print_breakdown(rows)
                details[f"breakdown_ms_{nt}t"] = rows
        del models, q1, bundle1

    # 2: whole XL-shaped transformer, batch 2
    if "xl" not in args.skip:
        t0 = time.perf_counter()
        bundle, q, t_q = _xl_quantized(blocks, gptq=False)
        print(f"\nXL-shaped model, {blocks} blocks: {RECIPE} quantized in {t_q:.0f} s "
              f"(setup {time.perf_counter() - t0:.0f} s)")
        models = {"fp32": bundle.transformer, "bf16": Bf16Autocast(bundle.transformer), **_variants(q, free=False)}
        inputs = denoiser_inputs(bundle, 2)
        for nt in threads:
            torch.set_num_threads(nt)
            t = forward_medians(models, inputs, max(2, repeats - 4), warmup=1)
            print(f"[{nt} thread(s)] whole forward, batch 2:")
            for n, sec in t.items():
                print(f"  {n:8s} {sec:8.3f} s  {sec / t['fp32']:6.3f}x FP32  {sec / t['bf16']:6.3f}x BF16")
            details[f"xl_forward_s_{nt}t"] = t
            checks.append(check("lowbit", f"XL ({blocks} blocks) forward b2 int8 codes, {nt}t", "BF16 forward",
                                t["int8"] / t["bf16"], None, t["int8"]))
            checks += [check("lowbit", f"XL ({blocks} blocks) forward b2 int8 codes, {nt}t", "FP32 forward",
                             t["int8"] / t["fp32"], 0.6, t["int8"]),
                       check("lowbit", f"XL ({blocks} blocks) forward b2 packed codes, {nt}t", "FP32 forward",
                             t["packed"] / t["fp32"], None, t["packed"]),
                       check("lowbit", f"XL ({blocks} blocks) forward b2 simulated, {nt}t", "FP32 forward",
                             t["sim"] / t["fp32"], None, t["sim"])]
        del models, q, bundle

    # 3: embedded model, batch 64
    if "embedded" not in args.skip:
        bundle = load_dit("embedded")
        calib = calibrate(bundle, profile="ci")
        q, _ = quantized_copy(bundle.transformer, RECIPE, calib)
        norot, _ = quantized_copy(bundle.transformer, "fp4-hybrid", calib)
        models = {"fp32": bundle.transformer, "bf16": Bf16Autocast(bundle.transformer), **_variants(q),
                  "fp4-hybrid int8": norot}
        inputs = denoiser_inputs(bundle, 64)
        for nt in threads:
            torch.set_num_threads(nt)
            t = forward_medians(models, inputs, repeats)
            print(f"\n[{nt} thread(s)] embedded model forward, batch 64 (int8 kernel {_kernels(q)}):")
            for n, sec in t.items():
                print(f"  {n:16s} {sec * 1e3:8.1f} ms  {sec / t['fp32']:6.3f}x FP32  {sec / t['bf16']:6.3f}x BF16")
            details[f"embedded_forward_s_{nt}t"] = t
            checks.append(check("lowbit", f"embedded forward b64 {RECIPE} int8 codes, {nt}t", "BF16 forward",
                                t["int8"] / t["bf16"], None, t["int8"]))
            checks += [check("lowbit", f"embedded forward b64 {RECIPE} int8 codes, {nt}t", "FP32 forward",
                             t["int8"] / t["fp32"], 0.8, t["int8"]),
                       check("lowbit", f"embedded forward b64 {RECIPE} simulated, {nt}t", "FP32 forward",
                             t["sim"] / t["fp32"], None, t["sim"]),
                       check("lowbit", f"embedded forward b64 fp4-hybrid (no rotation) int8, {nt}t", "FP32 forward",
                             t["fp4-hybrid int8"] / t["fp32"], None, t["fp4-hybrid int8"]),
                       check("lowbit", f"embedded forward b64 floor (activation path free), {nt}t", "FP32 forward",
                             t["int8 free act"] / t["fp32"], None, t["int8 free act"])]
            if "breakdown" not in args.skip:  # where the embedded model's time goes (width 144, 64 × 64 rows)
                print(f"\n[{nt} thread(s)] where the time goes, embedded block 0's quantized linears, 4096 rows:")
                rows = _breakdown(bundle.transformer, q, models["packed"], 64 * 64, repeats)
                _print_breakdown(rows, rows_label="4096 rows")
                details[f"embedded_breakdown_ms_{nt}t"] = rows

    # 5: memory
    if "memory" not in args.skip:
        mem = _memory(28)
        details["memory"] = mem
        base = mem["fp32"]["peak_rss_gb"]
        print("\nMemory, full 28-block XL-shaped model, one forward at batch 2 (fresh processes, 1 thread):")
        for key, r in mem.items():
            qb = f", quantized layers {r['quantized_bytes'] / 1e9:.3f} GB = " \
                 f"{r['quantized_bytes'] / r['quantized_fp32_bytes']:.4f}x their FP32" if r["quantized_bytes"] else ""
            print(f"  {key:14s} peak RSS {r['peak_rss_gb']:.2f} GB ({r['peak_rss_gb'] / base:.3f}x), after build "
                  f"{r['rss_built_gb']:.2f} GB, after imports {r['rss_import_gb']:.2f} GB{qb}")
        for key, target in (("packed block", 0.4), ("packed all-fc", None)):
            r = mem[key]
            checks += [check("memory", f"XL {key} 4-bit: peak RSS b2", "FP32 process", r["peak_rss_gb"] / base,
                             target, r["peak_rss_gb"] * 1e9, "GB"),
                       check("memory", f"XL {key} 4-bit: weight bytes of quantized layers", "their FP32 bytes",
                             r["quantized_bytes"] / r["quantized_fp32_bytes"], 0.135, r["quantized_bytes"], "B")]
    finish(args, "lowbit", checks, details)
    return checks


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
