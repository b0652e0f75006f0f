"""Tests of the integer execution path (lowbit.py): codes, packing, exactness per layer, the switch."""
import copy
import os
import warnings

import pytest
import torch

from hqdit_utils.engine import lowbit
from hqdit_utils.engine.calibration import calibrate
from hqdit_utils.engine.layers import WHOLE_MODEL_LAYERS
from hqdit_utils.engine.export import decode, unpack_nibbles
from hqdit_utils.engine.formats import parse_format
from hqdit_utils.engine.hadamard import HadamardSpec
from hqdit_utils.engine.lowbit import (LowbitError, codes_to_grid, drop_float_weights_, execution, execution_paths,
                                grid_to_codes, integer_grid, pack_codes, quantize_to_codes, set_execution,
                                unpack_codes, weight_codes)
from hqdit_utils.engine.lowbit import int_mm_fast as _real_int_mm_fast
from hqdit_utils.dit.models import tiny_dit
from hqdit_utils.engine.qlinear import QuantLinear
from hqdit_utils.engine.qmodel import load_quantized, quantize_, save_quantized
from hqdit_utils.engine.quantizer import fake_quantize
from hqdit_utils.engine.recipes import get_recipe, list_recipes

FORMATS = ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "int4", "int8"]
#: Recipes the integer path cannot compute exactly, with the start of the reason it gives.
SIMULATED = {"fp32": "activations are not quantized"}


def _simulated_reason(name):
    if name in SIMULATED:
        return SIMULATED[name]
    r = get_recipe(name)
    if "block" in (r.weight_granularity, r.act_granularity):  # mxfp4, nvfp4 and their rotated/GPTQ variants
        return "block scales"
    if "fp8" in r.act_format or any("fp8" in c for c in r.act_candidates if r.act_format == "auto") or \
            "fp8" in r.weight_format:
        return "more than int8 holds"
    return None


@pytest.fixture(scope="module")
def bundle():
    return tiny_dit(0, width=72, heads=1, num_layers=2)


@pytest.fixture(scope="module")
def calib(bundle):
    return calibrate(bundle, layers=WHOLE_MODEL_LAYERS, num_trajectories=2, num_timesteps=3, num_steps=4,
                     rows_per_timestep=32, attention=True)


def _inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 1, 8, 8, generator=g), torch.full((batch,), 500), torch.arange(batch) % 4)


def _run(m, batch=2):
    x, t, y = _inputs(batch)
    with torch.no_grad():
        return m(x, timestep=t, class_labels=y).sample


def _reference(layer, x):
    """float64 evaluation of the codes the integer path uses: (c_a · s_a / m_a) (c_w · s_w)ᵀ + b."""
    st = layer.lowbit
    a, s, _ = st.act_codes(layer, x.reshape(-1, x.shape[-1]))
    ref = (a.double() @ st.int8_codes().double().T) * s.double() / st.a_grid.multiplier * st.row_scale.double()
    if layer.bias is not None:
        ref = ref + layer.bias.double()
    return ref.reshape(*x.shape[:-1], -1)


def _rel(out, ref):
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# Grids and codes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, m, qmax", [("fp4_e2m1", 2, 12), ("fp4_e1m2", 2, 7), ("fp4_e3m0", 4, 64),
                                          ("int4", 1, 7), ("int8", 1, 127), ("fp6_e2m3", 8, 60)])
def test_integer_grids(fmt, m, qmax):
    g = integer_grid(fmt)
    assert (g.multiplier, g.qmax) == (m, qmax)
    assert torch.equal(torch.tensor(g.levels, dtype=torch.float64), parse_format(fmt).grid().double() * m)


@pytest.mark.parametrize("fmt, why", [("fp8_e4m3", "more than int8 holds"), ("fp8_e5m2", "not saturating"),
                                      ("uint4", "unsigned"), ("fp32", "not quantized")])
def test_formats_without_an_int8_grid_say_why(fmt, why):
    with pytest.raises(LowbitError, match=why):
        integer_grid(fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_grid_point_maps_to_its_code_and_back(fmt):
    grid = parse_format(fmt).grid()
    g = integer_grid(fmt)
    codes = grid_to_codes(grid, fmt)
    assert codes.tolist() == list(g.levels)  # the code of a grid value is the value times the multiplier
    assert torch.equal(codes_to_grid(codes, fmt), grid)
    for s in (0.37, 3.0e-3):  # rounding a scaled grid point gives its code back
        assert torch.equal(quantize_to_codes(grid * s, s, fmt), codes)
    if g.bits <= 4:  # packed: the OCP/two's-complement bit patterns of export.encode, decoded by one look-up
        c = torch.cat([codes, codes.flip(0)])  # every code in both nibble positions
        packed = pack_codes(c, fmt)
        assert packed.dtype == torch.uint8 and packed.shape == (len(c) // 2,)
        assert torch.equal(unpack_codes(packed, fmt), c)
        assert torch.equal(decode(unpack_nibbles(packed), fmt) * g.multiplier, c.float())
    with pytest.raises(LowbitError, match="not on the"):
        grid_to_codes(grid[-2:] * 0.9 if fmt != "int8" else torch.tensor([0.5]), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_codes_reproduce_the_fake_quantized_weight(fmt):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(40, 72, generator=g)
    W[3] = 0.0  # an all-zero row
    scale = torch.rand(40, 1, generator=g) * 0.1 + 1e-3  # clipped (γ < 1) per-row scales
    Wq = fake_quantize(W, fmt, scale)
    codes, s = weight_codes(Wq, fmt)
    assert codes.dtype == torch.int8 and s.shape == (40,)
    assert torch.allclose(codes.double() * s.double()[:, None], Wq.double(), rtol=2 ** -21, atol=0)
    with pytest.raises(LowbitError, match="row 0 is not"):
        weight_codes(W, fmt)  # not quantized


# --------------------------------------------------------------------------------------------------
# Exactness per layer, every recipe
# --------------------------------------------------------------------------------------------------
def _onednn_exact_for(m) -> bool:
    return all(lowbit.onednn_exact(q.lowbit.w_grid, q.lowbit.a_grid) for q in m.modules()
               if isinstance(q, QuantLinear) and q.lowbit is not None)


@pytest.mark.parametrize("kernel", lowbit.KERNELS)
@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_runs_exactly_or_says_why(bundle, calib, name, kernel):
    m = copy.deepcopy(bundle.transformer)
    recipe = get_recipe(name).replace(clip_grid=(20, 0.3, 1.0))
    if recipe.rotation_seed is None:  # a seed tied to the run's (quantize_ refuses it): any fixed seed
        recipe = recipe.replace(rotation_seed=0)
    rep = quantize_(m, recipe, calib)
    paths = {r.layer: r.execution for r in rep.layers}
    # the report names the measured kernel of every integer-path layer, none for simulated ones
    assert all((r.kernel in lowbit.KERNELS) == (r.execution == "int") for r in rep.layers)
    assert all(r.kernel == m.get_submodule(r.layer).lowbit.kernel for r in rep.layers if r.kernel)
    why = _simulated_reason(name)
    if why is not None:
        assert all(p.startswith("sim: ") and why in p for p in paths.values()), paths
        return
    assert set(paths.values()) == {"int"}
    if kernel == "onednn" and not _onednn_exact_for(m):  # INT8 weights: pairs of u8×s8 products could saturate
        with pytest.raises(LowbitError, match="oneDNN's int8 kernel is not exact for int8 weights"):
            set_execution(m, "auto", kernel=kernel)
        return
    set_execution(m, "auto", kernel=kernel)
    assert {q.lowbit.kernel for q in m.modules() if isinstance(q, QuantLinear)} == {kernel}
    inputs = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0]))
             for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    with execution(m, "sim"):
        _run(m)
    for h in hooks:
        h.remove()
    assert set(inputs) == set(paths)
    with torch.no_grad():
        for n, x in inputs.items():
            layer = m.get_submodule(n)
            ref = _reference(layer, x)
            out = layer(x)
            with execution(layer, "sim"):
                sim = layer(x)
            assert _rel(out, ref) <= 1e-5, n  # the integer path: the codes' exact result, one float rescale
            assert _rel(sim, ref) <= 1e-5, n  # the simulation computes the same numbers (up to fp32 rounding)


@pytest.mark.parametrize("kernel", lowbit.KERNELS)
@pytest.mark.parametrize("width", [72, 144, 1152, 4608])
@pytest.mark.parametrize("fmt", FORMATS)
def test_odd_shapes_batch_one_rotation_and_token_scales(width, fmt, kernel):
    if kernel == "onednn" and fmt == "int8":
        pytest.skip("oneDNN is not exact for int8 weights (test_onednn_saturates_on_int8_codes_and_is_refused)")
    g = torch.Generator().manual_seed(width)
    out_f = 3 * 72 if width > 144 else 5 * width // 4
    W = torch.randn(out_f, width, generator=g) / width ** 0.5
    rot = HadamardSpec(width, seed=0)
    from hqdit_utils.engine.hadamard import rotate_weight

    Wq = fake_quantize(rotate_weight(W, rot), fmt, axis=0)
    for mode in ("static", "token"):
        kw = {"act_scale": torch.tensor([0.9 / parse_format(fmt).max_value])} if mode == "static" else {}
        layer = QuantLinear(width, out_f, weight=Wq, bias=torch.randn(out_f, generator=g), weight_format=fmt,
                            act_format=fmt, act_mode=mode, rotation=rot, **kw)
        assert set_execution(layer, "auto", kernel=kernel) == {"": "int"} and layer.lowbit.kernel == kernel
        for shape in ((1, width), (1, 3, width), (7, width)):
            x = torch.randn(*shape, generator=g)
            with torch.no_grad():
                ref, out = _reference(layer, x), layer(x)
                with execution(layer, "sim"):
                    sim = layer(x)
            assert out.shape == (*shape[:-1], out_f) and out.dtype == torch.float32
            assert _rel(out, ref) <= 1e-5 and _rel(sim, ref) <= 1e-5
            # without the bias the integer path is exact to float32 rounding element by element
            acc = layer.lowbit.act_codes(layer, x.reshape(-1, width))
            bias, layer.bias = layer.bias, None
            with torch.no_grad():
                nb = layer(x).double().reshape(-1, out_f)
            layer.bias = bias
            refnb = (ref - bias.double()).reshape(-1, out_f)
            assert float(((nb - refnb).abs() / refnb.abs().clamp_min(1e-30)).max()) <= 1e-5
            assert acc[0].dtype == torch.int8


@pytest.mark.parametrize("kernel", lowbit.KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, kernel):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(144, 144, generator=g) / 12
    act = torch.tensor([0.5])
    layer = QuantLinear(144, 144, weight=fake_quantize(W, "fp4_e2m1", axis=0), bias=torch.randn(144, generator=g),
                        weight_format="fp4_e2m1", act_format="fp4_e2m1", act_mode="static", act_scale=act,
                        rotation=HadamardSpec(144))
    eps = torch.finfo(dtype).eps
    x = torch.randn(4, 144, generator=g)
    # (a) a model cast to the half dtype: codes and scales from the half weight
    lh = copy.deepcopy(layer).to(dtype)
    assert set_execution(lh, "auto", kernel=kernel) == {"": "int"}
    xh = x.to(dtype)
    with torch.no_grad():
        out, ref = lh(xh), _reference(lh, xh)
        with execution(lh, "sim"):
            sim = lh(xh)
    assert out.dtype == dtype and _rel(out, ref) <= eps  # exact up to the output's rounding
    assert _rel(sim, ref) <= 8 * eps  # the simulation rounds activations, weights and products to `dtype`
    # (b) a float32 model under CPU autocast: the output takes the autocast dtype like F.linear's
    set_execution(layer, "auto", kernel=kernel)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):  # (the rotation's matmul runs in `dtype` too)
        out, ref = layer(xh), _reference(layer, xh)
        with execution(layer, "sim"):
            sim = layer(xh)
    assert ref.dtype == torch.float64
    assert out.dtype == sim.dtype == dtype and _rel(out, ref) <= eps


# --------------------------------------------------------------------------------------------------
# The switch, packed weights, fallbacks, files
# --------------------------------------------------------------------------------------------------
def test_auto_keeps_float_layers_simulated_on_a_cpu_without_int8_dot_products(monkeypatch):
    g = torch.Generator().manual_seed(3)
    W = fake_quantize(torch.randn(72, 144, generator=g) / 12, "fp4_e2m1", axis=0)
    layer = QuantLinear(144, 72, weight=W, weight_format="fp4_e2m1", act_format="fp4_e2m1", act_mode="static",
                        act_scale=torch.tensor([0.1]))
    monkeypatch.setattr(lowbit, "int_mm_fast", lambda: False)
    monkeypatch.setattr(lowbit, "onednn_available", lambda: False)
    paths = set_execution(layer, "auto")
    assert paths[""].startswith("sim: this CPU has no int8 dot-product instructions")
    assert "oneDNN's int8 kernel is not available" in paths[""]
    assert not layer.lowbit.enabled and execution_paths(layer)[""] == paths[""]
    assert set(lowbit.packed_weights(layer)) == {""}  # the codes are kept: a packed file is written all the same
    with execution(layer, "sim"):
        assert execution_paths(layer)[""] == "sim: forced"
    assert execution_paths(layer)[""] == paths[""]  # restored with its reason
    assert set_execution(layer, "int") == {"": "int"}  # forced: runs the slow kernel all the same
    drop_float_weights_(layer)  # codes only: the integer path is the only one left, so "auto" keeps it
    assert set_execution(layer, "auto") == {"": "int"}
    monkeypatch.setattr(lowbit, "int_mm_fast", lambda: True)
    layer2 = QuantLinear(144, 72, weight=W, weight_format="fp4_e2m1", act_format="fp4_e2m1", act_mode="static",
                         act_scale=torch.tensor([0.1]))
    assert set_execution(layer2, "auto") == {"": "int"}


FOUR_BIT = [f for f in FORMATS if f != "int8"]


def _grid_codes(fmt, shape, g):
    levels = torch.tensor(integer_grid(fmt).levels, dtype=torch.int8)
    return levels[torch.randint(len(levels), shape, generator=g)]


@pytest.mark.parametrize("w_fmt", FOUR_BIT)
@pytest.mark.parametrize("a_fmt", FOUR_BIT)
def test_kernels_agree_bit_for_bit_on_every_4bit_grid(w_fmt, a_fmt):
    """torch._int_mm and oneDNN give the same float32 bits, static and per-token scales, with and without
    bias, on random codes of every 4-bit grid pair (largest codes included)."""
    g = torch.Generator().manual_seed(11)
    for m, k, n in ((1, 3, 2), (7, 72, 33), (16, 144, 64)):
        w = _grid_codes(w_fmt, (n, k), g)
        w[0, :] = integer_grid(w_fmt).qmax
        W = w.float() * (torch.rand(n, 1, generator=g) * 0.02 + 1e-3) / integer_grid(w_fmt).multiplier
        for bias in (None, torch.randn(n, generator=g)):
            layer = QuantLinear(k, n, weight=W, bias=bias, weight_format=w_fmt, act_format=a_fmt,
                                act_mode="static", act_scale=torch.tensor([0.037]))
            set_execution(layer, "int", kernel="onednn")
            st = layer.lowbit
            a = _grid_codes(a_fmt, (m, k), g)
            for s in (torch.tensor(0.037), torch.rand(m, 1, generator=g) * 0.1 + 1e-3):
                outs = {}
                for kern in lowbit.KERNELS:
                    st.kernel, st._onednn = kern, None
                    outs[kern] = st.matmul(a, s, bias)
                assert torch.equal(outs["onednn"], outs["torch._int_mm"]), (w_fmt, a_fmt, m, k, n, s.dim())
                acc = a.double() @ st.int8_codes().double().t()
                assert torch.equal(outs["onednn"], lowbit.rescale(acc.to(torch.int32), s, st.w_scale, bias))


_AVX2_FUSED = """
import sys, torch
from hqdit_utils.engine import lowbit
g = torch.Generator().manual_seed(5)
bad = total = 0
for m, k, n in ((1, 64, 8), (7, 96, 33), (64, 256, 256), (33, 1152, 96), (16, 4608, 24)):
    a = torch.randint(-12, 13, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-12, 13, (n, k), generator=g, dtype=torch.int8)
    sw = torch.rand(n, generator=g) * 0.05 + 1e-4
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    zeros = torch.zeros(n, dtype=torch.int64)
    acc = torch._int_mm(a, w.t())
    for sa in (0.0123, 0.77):
        for bias in (None, torch.randn(n, generator=g)):
            fused = lowbit._onednn_linear(a, sa, packed, sw, zeros, bias)
            ours = lowbit.rescale(acc, torch.tensor(sa), sw, bias)
            bad += int((fused != ours).sum()); total += fused.numel()
    per_token = lowbit._onednn_linear(a, 1.0, packed, sw, zeros, None).mul_(0.31)
    bad += int((per_token != lowbit.rescale(acc, torch.full((m, 1), 0.31), sw, None)).sum())
print(bad, total)
"""


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64") or "avx2" not in open("/proc/cpuinfo").read(),
                    reason="oneDNN's AVX2 kernel needs an x86 CPU with AVX2")
def test_rescale_is_onednn_avx2_fused_rescale_bit_for_bit():
    """The book's runs were made by oneDNN's AVX2 kernel with the scales and bias fused; :func:`rescale`
    computes the same bits (oneDNN limited to AVX2 in a child process, as on such a machine)."""
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", _AVX2_FUSED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    bad, total = map(int, out.stdout.split())
    assert total > 50_000 and bad == 0, f"{bad}/{total} elements differ"


@pytest.mark.parametrize("mode", ["static", "token"])
def test_nan_and_inf_behave_as_on_the_simulated_path(mode):
    g = torch.Generator().manual_seed(8)
    W = fake_quantize(torch.randn(24, 48, generator=g) / 7, "fp4_e2m1", axis=0)
    layer = QuantLinear(48, 24, weight=W, bias=torch.randn(24, generator=g), weight_format="fp4_e2m1",
                        act_format="fp4_e2m1", act_mode=mode, act_scale=torch.tensor([0.2]),
                        rotation=HadamardSpec(48))
    x = torch.randn(6, 48, generator=g)
    x[1, 3], x[2, 5], x[3, 0], x[4, 7] = float("nan"), float("inf"), -float("inf"), float("nan")
    for kern in lowbit.KERNELS:
        set_execution(layer, "int", kernel=kern)
        with torch.no_grad():
            out = layer(x)
            with execution(layer, "sim"):
                sim = layer(x)
        assert torch.equal(out.isnan(), sim.isnan()) and torch.equal(out.isinf(), sim.isinf()), kern
        assert bool(out[1].isnan().all()) and bool(out[[0, 5]].isfinite().all())
        assert _rel(out[[0, 5]], sim[[0, 5]].double()) <= 1e-5


@pytest.mark.parametrize("mode", ["static", "token"])
def test_nan_rows_propagate_in_a_compiled_layer(mode):
    """Compiled, the NaN mask is computed from the rows' sums (no data-dependent branch): the same rows are NaN as
    in eager, and the others agree up to float rounding of the rotation."""
    g = torch.Generator().manual_seed(8)
    W = fake_quantize(torch.randn(24, 72, generator=g) / 7, "fp4_e2m1", axis=0)
    layer = QuantLinear(72, 24, weight=W, bias=torch.randn(24, generator=g), weight_format="fp4_e2m1",
                        act_format="fp4_e2m1", act_mode=mode, act_scale=torch.tensor([0.2]),
                        rotation=HadamardSpec(72, seed=1))
    set_execution(layer, "int")
    x = torch.randn(6, 72, generator=g)
    x[1, 3], x[4, 7] = float("nan"), float("nan")
    with torch.no_grad():
        eager = layer(x)
        out = torch.compile(layer, dynamic=False)(x)
    assert torch.equal(out.isnan(), eager.isnan()) and bool(out[[1, 4]].isnan().all())
    ok = [0, 2, 3, 5]
    assert _rel(out[ok], eager[ok].double()) <= 0.05  # a code may round the other way: one grid step at most


@pytest.mark.parametrize("weights", [None, "packed"])
def test_torch_compile_of_a_quantized_model_is_one_graph_near_eager(bundle, calib, weights):
    """torch.compile of a W4A4 model on the integer path traces into one graph (no generator drawn, no tensor
    read, no version counter, no format parsed inside the forward; q/k/v still share one quantized input), with
    int8 or packed weight codes, and gives the eager output up to the few activation codes that float rounding of
    the rotation sends to the neighbouring grid point."""
    m = copy.deepcopy(bundle.transformer)
    quantize_(m, get_recipe("hqdit-w4a4").replace(clip_grid=(20, 0.3, 1.0), rotation_seed=0), calib)
    set_execution(m, "int", weights=weights)
    x, t, y = _inputs()
    explained = torch._dynamo.explain(m)(x, timestep=t, class_labels=y)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    calls = []
    orig = lowbit.IntLinearState.act_codes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lowbit.IntLinearState, "act_codes", lambda self, *a: calls.append(1) or orig(self, *a))
        torch._dynamo.reset()
        compiled = torch.compile(m, dynamic=False)
        with torch.no_grad():
            out = compiled(x, timestep=t, class_labels=y).sample
    assert len(calls) == 4 * 2  # per block: q/k/v (shared), out, fc1, fc2 — traced once
    eager = _run(m)
    assert out.shape == eager.shape and bool(out.isfinite().all())
    assert _rel(out, eager.double()) <= 0.05


def test_auto_runs_the_measured_kernel_and_keeps_the_choice(monkeypatch, tmp_path):
    """"auto" asks choose_kernel (timings measured once per machine, threads and shape, kept in a JSON file);
    every kernel gives the same bits; a forced kernel wins; INT8 weights have torch._int_mm only."""
    from hqdit_utils import config

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(lowbit, "_CHOSEN", {})
    calls = []

    def fake_measure(k, n, kernels=lowbit.KERNELS, rows=256):
        calls.append((k, n, tuple(kernels)))
        return {"kernel": "onednn", "ms": {"onednn": 1.0, "torch._int_mm": 9.0}, "rows": rows, "threads": 1}

    monkeypatch.setattr(lowbit, "measure_kernels", fake_measure)
    g = torch.Generator().manual_seed(4)
    W = torch.randn(72, 144, generator=g) / 12
    layers = {fmt: QuantLinear(144, 72, weight=fake_quantize(W, fmt, axis=0), bias=torch.randn(72, generator=g),
                               weight_format=fmt, act_format=fmt, act_mode="static",
                               act_scale=torch.tensor([0.05])) for fmt in FORMATS}
    x = torch.randn(5, 144, generator=g)
    for fmt, layer in layers.items():
        assert set_execution(layer, "auto") == {"": "int"}
        want = "torch._int_mm" if fmt == "int8" else "onednn"
        assert layer.lowbit.kernel == want and (layer.lowbit.kernel_choice["kernel"] == want)
        with torch.no_grad():
            out = layer(x)
            with execution(layer, "auto", kernel="torch._int_mm"):
                assert layer.lowbit.kernel == "torch._int_mm" and layer.lowbit.kernel_choice == {}
                assert torch.equal(layer(x), out)  # the other kernel: the same bits
        assert layer.lowbit.kernel == want  # restored
        set_execution(layer, "auto", weights="packed")  # packed codes: prepacked per call, same numbers
        with torch.no_grad():
            assert torch.equal(layer(x), out)
        assert copy.deepcopy(layer).lowbit._onednn is None  # the prepacked weight is not copied
    assert calls == [(144, 72, ("torch._int_mm", "onednn"))]  # measured once for the shape
    import json

    table = json.loads((tmp_path / lowbit.KERNEL_CACHE_FILE).read_text())
    (key, entry), = table.items()
    assert "threads" in key and "144x72" in key and entry["kernel"] == "onednn"
    monkeypatch.setattr(lowbit, "_CHOSEN", {})  # a new process reads the file instead of measuring
    assert lowbit.choose_kernel(144, 72)["kernel"] == "onednn" and len(calls) == 1
    (tmp_path / lowbit.KERNEL_CACHE_FILE).write_text("{not json")  # unreadable: measured again
    monkeypatch.setattr(lowbit, "_CHOSEN", {})
    assert lowbit.choose_kernel(144, 72)["kernel"] == "onednn" and len(calls) == 2


def test_measure_kernels_times_each_exact_kernel():
    r = lowbit.measure_kernels(40, 24, rows=16)
    assert r["kernel"] in lowbit.KERNELS and set(r["ms"]) == set(lowbit.KERNELS)
    assert r["ms"][r["kernel"]] == min(v for v in r["ms"].values() if v is not None) > 0


def test_onednn_saturates_on_int8_codes_and_is_refused():
    """The reason oneDNN is refused for INT8 weights: on a CPU without int8 dot-product instructions its sums
    are wrong there. Where it is exact (int8 dot-product CPUs) the rule still refuses, so only the rule is
    checked against the arithmetic: every 4-bit pair satisfies it, INT8 weights do not."""
    grids = {f: integer_grid(f) for f in FORMATS}
    for wf, wg in grids.items():
        for af, ag in grids.items():
            assert lowbit.onednn_exact(wg, ag) == (2 * (ag.qmax + 128) * wg.qmax <= 32767)
            assert lowbit.onednn_exact(wg, ag) == (wf != "int8"), (wf, af)
    w = torch.full((2, 64), 127, dtype=torch.int8)
    layer = QuantLinear(64, 2, weight=w.float() * 0.01, weight_format="int8", act_format="int8",
                        act_mode="static", act_scale=torch.tensor([0.01]))
    with pytest.raises(LowbitError, match="not exact for int8 weights"):
        set_execution(layer, "int", kernel="onednn")


def test_int8_dot_product_detection_reads_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else None
    real = _real_int_mm_fast()  # imported before the suite's fixture patches lowbit.int_mm_fast
    if flags is not None:
        assert real == any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    assert isinstance(real, bool)


def test_switch_forces_either_path_and_restores(bundle, calib):
    m = copy.deepcopy(bundle.transformer)
    quantize_(m, get_recipe("hqdit-w4a4").replace(clip_grid=(20, 0.3, 1.0)), calib)
    out_int = _run(m)
    with execution(m, "sim") as paths:
        assert set(paths.values()) == {"sim: forced"}
        out_sim = _run(m)
        assert set(execution_paths(m).values()) == {"sim: forced"}
    assert set(execution_paths(m).values()) == {"int"}
    assert torch.equal(_run(m), out_int) and not torch.equal(out_int, out_sim)
    assert _rel(out_int, out_sim.double()) < 1e-3  # end to end: a rare code may flip at a rounding tie
    with pytest.raises(ValueError, match="execution mode must be one of"):
        set_execution(m, "fast")
    mx = copy.deepcopy(bundle.transformer)
    quantize_(mx, "mxfp4")
    with pytest.raises(LowbitError, match="12 layer.*block scales"):
        set_execution(mx, "int")


def test_packed_weights_and_codes_only_model_give_the_same_output(bundle, calib):
    m = copy.deepcopy(bundle.transformer)
    quantize_(m, get_recipe("fp4-hybrid").replace(clip_grid=(20, 0.3, 1.0)), calib)
    out = _run(m)
    set_execution(m, "auto", weights="packed")
    assert torch.equal(_run(m), out)
    layers = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
    w_sim = {id(q): q.weight.clone() for q in layers}
    freed = drop_float_weights_(m)
    assert freed == sum(4 * w.numel() for w in w_sim.values())
    assert all(q.weight is None and q.lowbit.codes is None and q.lowbit.packed.dtype == torch.uint8
               for q in layers)
    assert torch.equal(_run(m), out)
    for q in layers:  # the decoded weight is the simulated one (to float32 rounding of code · scale)
        assert torch.allclose(q.lowbit.float_weight(), w_sim[id(q)], rtol=2 ** -21, atol=0)
    with execution(m, "sim"):
        assert torch.isfinite(_run(m)).all()


def test_a_changed_weight_is_planned_again(bundle, calib):
    m = copy.deepcopy(bundle.transformer)
    quantize_(m, "int4-rtn", calib)
    q = m.get_submodule("transformer_blocks.0.ff.net.2")
    x = torch.randn(3, q.in_features)
    with torch.no_grad():
        y = q(x)
        q.weight.mul_(2)  # still a scaled int4 grid: new codes, doubled output (minus the bias)
        assert q.lowbit is not None
        torch.testing.assert_close(q(x) - q.bias, 2 * (y - q.bias), rtol=1e-5, atol=1e-6)
        q.weight.add_(1e-3 * torch.randn_like(q.weight))  # no longer on a grid: back to the simulation
        q(x)
    assert q.lowbit is None and "is not int4 grid values" in execution_paths(q)[q.name]


def test_without_int_mm_the_layers_stay_simulated_with_a_warning(bundle, calib, monkeypatch):
    def broken(a, b):
        raise RuntimeError("_int_mm not compiled")
    monkeypatch.setattr(torch, "_int_mm", broken)
    monkeypatch.setattr(lowbit, "_INT_MM", {})
    m = copy.deepcopy(bundle.transformer)
    with pytest.warns(RuntimeWarning, match="simulated"):
        rep = quantize_(m, "int4-rtn", calib)
    assert {r.execution for r in rep.layers} == {"sim: torch._int_mm is not available on this CPU build"}
    assert torch.isfinite(_run(m)).all()


def test_saved_and_loaded_model_runs_the_integer_path_identically(bundle, calib, tmp_path):
    m = copy.deepcopy(bundle.transformer)
    quantize_(m, get_recipe("hqdit-w4a4-dyn").replace(clip_grid=(20, 0.3, 1.0)), calib)
    save_quantized(m, tmp_path)
    m2 = load_quantized(copy.deepcopy(bundle.transformer), tmp_path)
    assert set(execution_paths(m2).values()) == {"int"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_run(m2), _run(m))


def test_packed_files_load_back_bit_identically(bundle, calib, tmp_path):
    from hqdit_utils.engine.export import load_packed, save_packed, unpack_weight
    from hqdit_utils.engine.qmodel import QuantizationError

    m = copy.deepcopy(bundle.transformer)
    quantize_(m, get_recipe("fp4-hybrid-dyn").replace(clip_grid=(20, 0.3, 1.0)), calib)
    out = _run(m)
    save_quantized(m, tmp_path / "q", packed=True)
    files = {f.name: f.stat().st_size for f in (tmp_path / "q").iterdir()}
    plain = save_quantized(m, tmp_path / "f") / "quant_state.safetensors"
    weights = sum(4 * q.weight.numel() for q in m.modules() if isinstance(q, QuantLinear))
    # the float weights are gone from the state; the codes take 1/8 of their bytes (+ one scale per row)
    assert plain.stat().st_size - files["quant_state.safetensors"] >= weights
    assert files[lowbit.PACKED_FILE] < weights / 8 + 16 * 1024
    m2 = load_quantized(copy.deepcopy(bundle.transformer), tmp_path / "q")
    layers2 = [q for q in m2.modules() if isinstance(q, QuantLinear)]
    assert all(q.weight is None and q.lowbit.packed is not None for q in layers2)
    assert set(execution_paths(m2).values()) == {"int"} and torch.equal(_run(m2), out)
    # export.save_packed takes the model directly; its file decodes to the simulated weights
    save_packed(m, tmp_path / "p.safetensors")
    for name, p in load_packed(tmp_path / "p.safetensors").items():
        assert torch.allclose(unpack_weight(p), m.get_submodule(name).weight, rtol=2 ** -21, atol=0)
    with pytest.raises(QuantizationError, match="holds codes only; save with packed=True"):
        save_quantized(m2, tmp_path / "g")
    (tmp_path / "q" / lowbit.PACKED_FILE).unlink()
    with pytest.raises(QuantizationError, match=f"{lowbit.PACKED_FILE} is listed in .*MANIFEST.json but missing"):
        load_quantized(copy.deepcopy(bundle.transformer), tmp_path / "q")
