"""Tests of QuantLinear and quantize_."""
import copy
import math

import pytest
import torch
from torch import nn

from hqdit_utils.engine.calibration import calibrate
from hqdit_utils.engine.formats import parse_format
from hqdit_utils.engine.layers import ALL_FC_LAYERS
from hqdit_utils.engine.lowbit import execution
from hqdit_utils.dit.models import tiny_dit
from hqdit_utils.engine.qlinear import QuantAttnProcessor, QuantLinear
from hqdit_utils.engine.qmodel import QuantizationError, load_quantized, quantize_, save_quantized
from hqdit_utils.engine.quantizer import fake_quantize
from hqdit_utils.engine.recipes import get_recipe


@pytest.fixture(scope="module")
def bundle():
    return tiny_dit(0, width=72, heads=1, num_layers=2)


@pytest.fixture(scope="module")
def calib(bundle):
    return calibrate(bundle, layers=ALL_FC_LAYERS, num_trajectories=2, num_timesteps=3, num_steps=4,
                     rows_per_timestep=32, attention=True)


def _r(recipe_name, **kw):
    """A named recipe with a 20-point γ grid (keeps the tests fast; the search code is the same)."""
    return get_recipe(recipe_name).replace(clip_grid=(20, 0.3, 1.0), **kw)


def _fresh(bundle):
    return copy.deepcopy(bundle.transformer)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 1, 8, 8, generator=g), torch.tensor([500, 500]), torch.tensor([1, 2]))


def _run(m):
    x, t, y = _inputs()
    with torch.no_grad():
        return m(x, timestep=t, class_labels=y).sample


def test_identity_quantlinear_equals_linear():
    lin = nn.Linear(144, 60)
    x = torch.randn(3, 7, 144)
    q = QuantLinear.from_linear(lin)
    assert torch.equal(q(x), lin(x))
    q2 = QuantLinear(144, 60, weight=lin.weight.data, bias=lin.bias.data, act_format="fp32", act_mode="static",
                     act_scale=torch.tensor([1.0]))
    assert torch.equal(q2(x), lin(x))
    q3 = QuantLinear(144, 60, weight=lin.weight.data, bias=None, act_format="fp32")
    assert torch.equal(q3(x), torch.nn.functional.linear(x, lin.weight))


def test_fp32_recipe_leaves_sampled_images_bit_identical(bundle):
    from hqdit_utils.dit.sampling import sample

    ref = sample(bundle, [0, 1, 2], num_steps=3, cfg_scale=1.5, seeds=[0, 1, 2], progress=False)
    b2 = copy.copy(bundle)
    b2.transformer = _fresh(bundle)
    rep = quantize_(b2.transformer, "fp32", None)
    assert len(rep.layers) == 12 and all(isinstance(b2.transformer.get_submodule(r.layer), QuantLinear)
                                         for r in rep.layers)
    out = sample(b2, [0, 1, 2], num_steps=3, cfg_scale=1.5, seeds=[0, 1, 2], progress=False)
    assert torch.equal(ref, out)


def test_misuse_gives_clear_errors(bundle, calib):
    m = _fresh(bundle)
    quantize_(m, "fp32")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_(m, "fp32")
    with pytest.raises(QuantizationError, match="matches no module"):
        quantize_(_fresh(bundle), get_recipe("fp4-minmax").replace(layers=("*.attn2.to_q",)), calib)
    with pytest.raises(QuantizationError, match="names no layer"):
        quantize_(_fresh(bundle), get_recipe("fp4-minmax").replace(layers=()), calib)
    with pytest.raises(QuantizationError, match="needs calibration"):
        quantize_(_fresh(bundle), "fp4-minmax", None)
    m2 = _fresh(bundle)
    small = calibrate(bundle, layers=["*.ff.net.2"], num_trajectories=1, num_timesteps=1, num_steps=2,
                      rows_per_timestep=4)
    with pytest.raises(QuantizationError, match="no data for"):
        quantize_(m2, "fp4-minmax", small)
    assert not any(isinstance(x, QuantLinear) for x in m2.modules())  # a failed call leaves the model untouched
    with pytest.raises(KeyError, match="Known recipes"):
        quantize_(_fresh(bundle), "fp5-magic", calib)


def test_int4_rtn_stores_quantized_weight_and_quantizes_activations(bundle, calib):
    m = _fresh(bundle)
    ref = {n: (mod.weight.detach().clone(), mod.bias.detach().clone()) for n, mod in m.named_modules()
           if isinstance(mod, nn.Linear)}
    rep = quantize_(m, "int4-rtn", calib)
    name = "transformer_blocks.0.ff.net.2"
    ql = m.get_submodule(name)
    W, b = ref[name]
    assert torch.equal(ql.weight, fake_quantize(W, "int4", axis=0))  # per-channel max-abs, computed once
    s = ql.act_scale[0]
    x = torch.randn(5, W.shape[1])
    sim = torch.nn.functional.linear(fake_quantize(x, "int4", s), ql.weight, b)
    with execution(ql, "sim"):  # the simulated path computes exactly this
        assert torch.equal(ql(x), sim)
    torch.testing.assert_close(ql(x), sim, rtol=1e-5, atol=1e-6)  # the default: exact integer path
    assert {r.execution for r in rep.layers} == {"int"}
    assert float(s) * 7 == pytest.approx(calib[name].pooled().absmax, rel=1e-6)  # static max-abs α
    df = rep.to_pandas()
    assert len(df) == 12 and {"weight_format", "act_format", "weight_sqnr", "act_sqnr", "output_sqnr",
                               "act_alpha", "weight_gamma"} <= set(df.columns)
    assert (df.weight_format == "int4").all() and (df.weight_sqnr > 5).all()
    assert m.get_submodule("transformer_blocks.0.norm1.linear").__class__ is nn.Linear  # others untouched


def test_clip_and_hybrid_are_never_worse_per_layer(bundle, calib):
    reps = {n: quantize_(_fresh(bundle), _r(n), calib).to_pandas() for n in ("fp4-minmax", "fp4-clip", "fp4-hybrid")}
    mm, cl, hy = reps["fp4-minmax"], reps["fp4-clip"], reps["fp4-hybrid"]
    assert (cl.weight_sqnr >= mm.weight_sqnr - 1e-6).all() and (cl.act_sqnr >= mm.act_sqnr - 1e-6).all()
    assert (hy.weight_sqnr >= cl.weight_sqnr - 1e-6).all() and (hy.act_sqnr >= cl.act_sqnr - 1e-6).all()
    assert (cl.weight_gamma <= 1).all() and (cl.act_gamma < 1).any()


def test_hybrid_plan_and_quantized_forward(bundle, calib, tmp_path):
    m = _fresh(bundle)
    rep = quantize_(m, _r("fp4-hybrid"), calib)
    plan = rep.plan
    assert set(plan.layers) == {r.layer for r in rep.layers}
    for name, lf in plan.layers.items():
        assert lf.weight_format in ("fp4_e1m2", "fp4_e2m1", "fp4_e3m0")
        assert lf.weight_mse[lf.weight_format] == min(lf.weight_mse.values())
        assert lf.act_mse[lf.act_format] == min(lf.act_mse.values())
        assert "channel_max_ratio" in lf.weight_stats and "max_rms_ratio" in lf.act_stats
    out, ref = _run(m), _run(bundle.transformer)
    assert not torch.equal(out, ref)
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 1
    s = rep.summary()
    assert s["layers"] == 12 and math.isfinite(s["output_sqnr"]) and sum(s["weight_formats"].values()) == 12
    # save / load round trip gives the same outputs
    save_quantized(m, tmp_path / "q", rep)
    m2 = load_quantized(_fresh(bundle), tmp_path / "q")
    assert torch.equal(_run(m2), out)
    assert (tmp_path / "q" / "plan.json").exists() and (tmp_path / "q" / "report.csv").exists()


def test_rotation_alone_keeps_the_output_and_hqdit_runs(bundle, calib):
    m = _fresh(bundle)
    rep = quantize_(m, get_recipe("fp32").replace(name="rot-only", rotation=True), calib)
    assert all(r.rotated for r in rep.layers)
    torch.testing.assert_close(_run(m), _run(bundle.transformer), rtol=1e-4, atol=1e-5)
    m = _fresh(bundle)
    rep = quantize_(m, _r("hqdit-w4a4"), calib)
    assert all(r.rotated and r.gptq for r in rep.layers)
    assert torch.isfinite(_run(m)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotated_model_runs_with_autograd_enabled(bundle, calib, dtype):
    """Outside torch.no_grad() (parameters requiring grad), a rotated W4A4 model gives the same output as
    under no_grad, in every floating dtype the model may be cast to."""
    m = _fresh(bundle)
    quantize_(m, _r("hqdit-w4a4"), calib)
    m = m.to(dtype)
    x, t, y = _inputs()
    out = m(x.to(dtype), timestep=t, class_labels=y).sample
    assert out.requires_grad
    with torch.no_grad():
        ref = m(x.to(dtype), timestep=t, class_labels=y).sample
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["int8", "fp4-hybrid-dyn", "smoothquant-int", "mxfp4", "nvfp4",
                                  "fp4-hybrid-ratio", "fp4-hybrid-all-fc", "nvfp4-rot-gptq", "mxfp4-rot",
                                  "hqdit-w4a4-attn", "hqdit-w4a4-dyn", "hqdit-w4a4-all-fc",
                                  "fp4-rtn-plus-rotation", "fp4-rtn-plus-select", "fp4-rtn-plus-gptq"])

def test_other_recipes_run(bundle, calib, name):
    m = _fresh(bundle)
    rep = quantize_(m, _r(name), calib)
    assert len(rep.layers) == (14 if name.endswith("all-fc") else 12)
    assert torch.isfinite(_run(m)).all()


def test_summary_tells_exact_from_unmeasured(bundle, calib):
    """Identity: every layer exact -> inf; block formats without calibration rows: not measured -> nan;
    with calibration rows the block formats' activation and output SQNRs are measured (finite)."""
    assert math.isinf(quantize_(_fresh(bundle), _r("fp32"), calib).summary()["output_sqnr"])
    unmeasured = quantize_(_fresh(bundle), _r("mxfp4")).summary()
    assert math.isnan(unmeasured["act_sqnr"]) and math.isnan(unmeasured["output_sqnr"])
    assert math.isfinite(unmeasured["weight_sqnr"])
    measured = quantize_(_fresh(bundle), _r("nvfp4"), calib).summary()
    assert math.isfinite(measured["act_sqnr"]) and math.isfinite(measured["output_sqnr"])


def test_timestep_groups_use_the_current_timestep(bundle, calib):
    m = _fresh(bundle)
    quantize_(m, _r("fp4-clip", name="tg", timestep_groups=3), calib)
    ql = m.get_submodule("transformer_blocks.0.ff.net.2")
    assert len(ql.act_scale) == 3 and len(ql.ts_edges) == 2
    assert torch.isfinite(_run(m)).all()
    with pytest.raises(RuntimeError, match="current timestep"):
        ql.ts_ctx.t = None
        ql(torch.randn(2, ql.in_features))


def test_attention_processor_matches_default_and_quantizes(bundle, calib):
    m = _fresh(bundle)
    ref = _run(m)
    for blk in m.transformer_blocks:
        blk.attn1.set_processor(QuantAttnProcessor("fp32"))
    torch.testing.assert_close(_run(m), ref, rtol=1e-5, atol=1e-5)
    m = _fresh(bundle)
    quantize_(m, get_recipe("fp32").replace(name="attn8", quantize_attention=True, attn_format="fp8_e4m3"), calib)
    proc = m.transformer_blocks[0].attn1.processor
    assert isinstance(proc, QuantAttnProcessor) and set(proc.scales) == {"q", "k", "v"}
    out = _run(m)
    assert not torch.equal(out, ref) and float((out - ref).norm() / ref.norm()) < 0.05


@pytest.mark.skipif(not (__import__("hqdit_utils.config", fromlist=["DATA_DIR"]).DATA_DIR / "embedded" / "transformer"
                         ).is_dir(), reason="embedded model not present")
def test_on_the_embedded_model():
    from hqdit_utils.dit.models import load_dit

    b = load_dit("embedded")
    cal = calibrate(b, num_trajectories=2, num_timesteps=2, num_steps=2, rows_per_timestep=16)
    assert len(cal.unique()) == 4 * b.transformer.config.num_layers  # q/k/v share one record per block
    m = _fresh(b)
    quantize_(m, "fp32")
    assert torch.equal(_run_on(m, b), _run_on(b.transformer, b))
    m = _fresh(b)
    rep = quantize_(m, _r("fp4-hybrid"), cal)
    assert sum(rep.plan.histogram("weight").values()) == 6 * b.transformer.config.num_layers
    assert torch.isfinite(_run_on(m, b)).all()


def _run_on(m, b):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, b.latent_channels, b.latent_size, b.latent_size, generator=g)
    with torch.no_grad():
        return m(x, timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 2])).sample


def test_layers_reading_one_tensor_share_its_quantized_input(bundle, calib):
    """to_q/to_k/to_v quantize their common input once (SharedInput); outputs are bit-identical to
    quantizing it in every layer, and an in-place change of the input is seen."""
    from hqdit_utils.engine.qlinear import SharedInput

    m = _fresh(bundle)
    quantize_(m, _r("hqdit-w4a4"), calib)
    attn = m.transformer_blocks[0].attn1
    shared = attn.to_q.shared
    assert isinstance(shared, SharedInput) and shared.members == 3
    assert attn.to_k.shared is shared and attn.to_v.shared is shared and attn.to_out[0].shared is None
    unshared = copy.deepcopy(m)
    for mod in unshared.modules():
        if isinstance(mod, QuantLinear):
            mod.shared = None
    assert torch.equal(_run(m), _run(unshared))
    x = torch.randn(5, 72)
    with torch.no_grad():
        a = attn.to_q(x)
        x.mul_(2)  # same tensor object, new content: must be requantized
        k = attn.to_k(x)
    assert torch.equal(k, unshared.transformer_blocks[0].attn1.to_k(x))
    assert torch.equal(a, unshared.transformer_blocks[0].attn1.to_q(x / 2))


def test_gptq_with_block_scales_uses_the_block_grid():
    """NVFP4/MXFP4 + GPTQ: with a diagonal Hessian GPTQ has nothing to propagate, so it must give exactly the
    block round-to-nearest weights; with correlated inputs it must lower the layer-output error."""
    from hqdit_utils.engine.gptq import GPTQ
    from hqdit_utils.engine.quantizer import block_fake_quantize, block_weight_scales

    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 48, generator=g)
    for fmt, block, sf in (("fp4_e2m1", 16, "fp8_e4m3fn"), ("fp4_e2m1", 32, "e8m0")):
        rtn = block_fake_quantize(W, parse_format(fmt), block, sf)
        s = block_weight_scales(W, fmt, block, sf)
        assert s.shape == (24, math.ceil(48 / block))
        gq = GPTQ(W).set_hessian(torch.diag(torch.rand(48, generator=g) + 0.5))
        assert torch.equal(gq.quantize(fmt, s, groupsize=block, percdamp=0.0).weight, rtn)
        X = torch.randn(512, 8, generator=g) @ torch.randn(8, 48, generator=g) + 0.1 * torch.randn(512, 48, generator=g)
        gq = GPTQ(W)
        gq.add_batch(X)
        wq = gq.quantize(fmt, s, groupsize=block).weight
        assert ((X @ (wq - W).T) ** 2).mean() < ((X @ (rtn - W).T) ** 2).mean()


def test_save_and_load_restore_attention_timestep_groups_and_shared_inputs(bundle, calib, tmp_path):
    """A reloaded model is the model that was saved: quantized attention matmuls (with their static scales),
    per-timestep-group activation scales (the hook that tells layers the timestep) and the to_q/k/v shared
    input come back; outputs at two timesteps are bit-identical to the model before saving."""
    m = _fresh(bundle)
    recipe = _r("fp4-clip", name="tg-attn", timestep_groups=3, quantize_attention=True, attn_format="fp4_e2m1")
    report = quantize_(m, recipe, calib)
    save_quantized(m, tmp_path / "q", report)
    loaded = load_quantized(_fresh(bundle), tmp_path / "q")
    proc = loaded.transformer_blocks[0].attn1.processor
    assert isinstance(proc, QuantAttnProcessor) and proc.scales == m.transformer_blocks[0].attn1.processor.scales
    assert loaded.transformer_blocks[0].attn1.to_k.shared is loaded.transformer_blocks[0].attn1.to_q.shared
    x, _, y = _inputs()
    for t in (20, 900):  # two different timestep groups
        with torch.no_grad():
            ref = m(x, timestep=torch.tensor([t, t]), class_labels=y).sample
            out = loaded(x, timestep=torch.tensor([t, t]), class_labels=y).sample
        assert torch.equal(out, ref), t
    # a model without the attention processors and hook (what load_quantized rebuilt before) is another model
    bare = _fresh(bundle)
    for name, mod in loaded.named_modules():
        if isinstance(mod, QuantLinear):
            parent, _, child = name.rpartition(".")
            setattr(bare.get_submodule(parent), child, copy.deepcopy(mod))
            bare.get_submodule(name).ts_ctx = bare.get_submodule(name).shared = None
    with pytest.raises(RuntimeError, match="current timestep"):
        _run(bare)


def test_the_model_carries_its_execution_through_save_and_load(bundle, calib, tmp_path):
    """quantize_(execution=...) puts every layer on that path; the folder records it and load_quantized restores
    it (or the execution it is given); an unknown execution is refused before anything changes."""
    from hqdit_utils.engine.lowbit import execution_paths

    m = _fresh(bundle)
    report = quantize_(m, "hqdit-w4a4", calib, execution="sim")
    assert {r.execution[:3] for r in report.layers} == {"sim"}
    assert set(p[:3] for p in execution_paths(m).values()) == {"sim"}
    save_quantized(m, tmp_path / "q", report)
    loaded = load_quantized(_fresh(bundle), tmp_path / "q")
    assert execution_paths(loaded) == execution_paths(m)  # carried, not reset to "auto"
    auto = load_quantized(_fresh(bundle), tmp_path / "q", execution="auto")
    assert "int" in execution_paths(auto).values()  # 4-bit layers run on the integer path under "auto"
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, timestep=t, class_labels=y).sample, m(x, timestep=t, class_labels=y).sample)
    fresh = _fresh(bundle)
    with pytest.raises(QuantizationError, match="execution must be one of"):
        quantize_(fresh, "hqdit-w4a4", calib, execution="integer")
    assert not any(isinstance(mod, QuantLinear) for mod in fresh.modules())


def test_loading_attention_into_a_model_without_it_is_refused_unchanged(bundle, calib, tmp_path):
    import json

    from hqdit_utils.files import write_manifest

    m = _fresh(bundle)
    save_quantized(m, tmp_path / "q", quantize_(m, _r("fp4-clip", name="a", quantize_attention=True,
                                                       attn_format="fp4_e2m1"), calib))
    cfg = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    cfg["attention"]["transformer_blocks.0.nope"] = cfg["attention"].pop("transformer_blocks.0.attn1")
    (tmp_path / "q" / "quant_config.json").write_text(json.dumps(cfg))
    write_manifest(tmp_path / "q")  # a deliberate edit, hashed again (else the manifest check refuses first)
    fresh = _fresh(bundle)
    with pytest.raises(QuantizationError, match="quantizes the attention 'transformer_blocks.0.nope'"):
        load_quantized(fresh, tmp_path / "q")
    assert not any(isinstance(mod, QuantLinear) for mod in fresh.modules())
