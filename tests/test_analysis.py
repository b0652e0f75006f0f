"""Tests of hqdit_utils.chapters.analysis: the layer-level measurements behind chapters 04 and 05."""
from __future__ import annotations

import math

import pytest
import torch

from hqdit_utils.chapters import analysis as A
from hqdit_utils.engine.gptq import GPTQ, rtn_quantize
from hqdit_utils.engine.hadamard import hadamard_matrix


def _outlier_inputs(n=512, d=144, seed=0, outliers=(3, 70), gain=20.0, mean=0.0):
    """Gaussian rows with a few large 'outlier channels' (and an optional common offset)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) + mean
    for c in outliers:
        x[:, c] *= gain
    return x


def _layer(d_in=144, d_out=64, n=512, seed=0, **kw) -> A.BlockLinear:
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in)
    x = _outlier_inputs(n, d_in, seed, **kw)
    return A.BlockLinear("b0.fc1", 0, "fc1", w, None, x, torch.zeros(n, dtype=torch.long))


# --- crest factor ---------------------------------------------------------------------------------
def test_crest_factor_known_values():
    assert A.crest_factor(torch.full((64,), -3.0)) == pytest.approx(1.0)
    one_hot = torch.zeros(144)
    one_hot[7] = 5.0
    assert A.crest_factor(one_hot) == pytest.approx(12.0)  # √144
    rows = torch.stack([torch.ones(16), torch.eye(16)[0]])
    cf = A.crest_factor(rows, dim=1)
    assert cf.shape == (2,) and cf[0] == pytest.approx(1.0) and cf[1] == pytest.approx(4.0)


# --- rotations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,block", [(144, None), (576, None), (144, 36), (64, None)])
@pytest.mark.parametrize("signs", ["before", "after"])
def test_rotation_apply_matches_dense_and_is_orthogonal(n, block, signs):
    rot = A.Rotation(n, seed=3, signs=signs, block=block)
    q = rot.matrix(torch.float64)
    assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, 7, n, dtype=torch.float64)
    assert torch.allclose(rot.apply(x), x @ q, atol=1e-10)


def test_signs_before_and_after_are_different_matrices():
    before, after = A.Rotation(144, seed=0).matrix(), A.Rotation(144, seed=0, signs="after").matrix()
    assert not torch.allclose(before, after)
    h = hadamard_matrix(144)
    assert torch.equal(before.abs(), h.abs()) and torch.equal(after.abs(), h.abs())
    with pytest.raises(ValueError):
        A.Rotation(144, signs="middle")
    with pytest.raises(ValueError):
        A.Rotation(6)  # a Hadamard matrix has order 1, 2 or a multiple of 4


def test_signs_after_the_mixing_change_no_magnitude_and_no_quantization_error():
    """The point of chapter 04's sign section: H·D leaves |x Q| equal to |x H|/√n, so the quantization
    error is exactly that of the plain Hadamard transform; D·H is a genuinely different transform."""
    x = _outlier_inputs(256, 144, mean=1.0)
    plain = x @ hadamard_matrix(144)
    after = A.Rotation(144, seed=5, signs="after").apply(x)
    before = A.Rotation(144, seed=5, signs="before").apply(x)
    assert torch.allclose(after.abs(), plain.abs(), atol=1e-4)
    assert not torch.allclose(before.abs(), plain.abs(), atol=1e-2)
    w = torch.randn(32, 144)
    e_after = A.w4a4_errors(w, x, "fp4_e2m1", A.Rotation(144, seed=5, signs="after"))
    e_plain = A.w4a4_errors(w, x, "fp4_e2m1", A.Rotation(144, seed=None))
    assert e_after["act_sqnr_db"] == pytest.approx(e_plain["act_sqnr_db"], abs=1e-6)


def test_common_offset_is_concentrated_by_plain_hadamard_but_not_by_signs_before():
    """A constant offset on every channel (like a GELU output's positive mean) lands in one Hadamard
    coefficient — a new outlier — unless the signs are flipped first."""
    x = _outlier_inputs(256, 144, outliers=(), mean=2.0)
    plain = A.crest_factor(A.Rotation(144, seed=None).apply(x))
    before = A.crest_factor(A.Rotation(144, seed=0).apply(x))
    assert plain > 2.5 * before


def test_rotate_pair_keeps_the_layer_output():
    lay = _layer()
    w_r, x_r = A.rotate_pair(lay.weight, lay.inputs, A.rotation_spec(144))
    assert torch.allclose(x_r @ w_r.t(), lay.inputs @ lay.weight.t(), atol=1e-3)
    assert A.rotate_pair(lay.weight, lay.inputs, None)[0] is lay.weight


def test_rotation_spreads_outlier_channels_and_raises_sqnr():
    lay = _layer(gain=30.0)
    plain = A.w4a4_errors(lay.weight, lay.inputs, "fp4_e2m1")
    rot = A.w4a4_errors(lay.weight, lay.inputs, "fp4_e2m1", A.rotation_spec(144))
    assert rot["act_crest"] < 0.5 * plain["act_crest"]
    assert rot["act_sqnr_db"] > plain["act_sqnr_db"] + 3.0
    assert rot["out_sqnr_db"] > plain["out_sqnr_db"] + 3.0
    finer = A.w4a4_errors(lay.weight, lay.inputs, "int8", A.rotation_spec(144))
    assert finer["out_sqnr_db"] > rot["out_sqnr_db"] + 10.0


def test_rotation_table_layout():
    layers = [_layer(), _layer(d_in=576, seed=1)]
    layers[1].name, layers[1].kind = "b0.fc2", "fc2"
    t = A.rotation_table(layers, formats=("fp4_e2m1", "int4"))
    assert len(t) == 2 * 2 * 2
    assert set(t["rotated"]) == {False, True}
    assert {"act_crest", "weight_crest", "act_sqnr_db", "weight_sqnr_db", "out_sqnr_db"} <= set(t.columns)
    assert t["act_sqnr_db"].notna().all()
    # the batched computation equals one call per format
    one = A.w4a4_errors(layers[1].weight, layers[1].inputs, "int4", A.rotation_spec(576))
    row = t[(t.layer == "b0.fc2") & (t.format == "int4") & t.rotated].iloc[0]
    assert row["out_sqnr_db"] == pytest.approx(one["out_sqnr_db"]) and row["act_crest"] == pytest.approx(one["act_crest"])
    only = A.rotation_table(layers[:1], formats=("fp4_e2m1",), rotations=(True,))
    assert len(only) == 1 and bool(only.rotated.iloc[0])


# --- model plumbing -------------------------------------------------------------------------------
def test_block_linears_on_a_tiny_dit():
    from hqdit_utils.engine.calibration import calibrate
    from hqdit_utils.dit.models import tiny_dit

    bundle = tiny_dit(0, width=144, heads=2, num_layers=2)
    calib = calibrate(bundle, num_trajectories=2, num_timesteps=2, num_steps=3, rows_per_timestep=16, batch_size=2)
    layers = A.block_linears(bundle.transformer, calib)
    assert [l.name for l in layers] == ["b0.qkv", "b0.proj", "b0.fc1", "b0.fc2", "b1.qkv", "b1.proj", "b1.fc1", "b1.fc2"]
    blk = bundle.transformer.transformer_blocks[1]
    qkv = layers[4]
    assert qkv.weight.shape == (3 * 144, 144)
    assert torch.equal(qkv.weight[144:288], blk.attn1.to_k.weight)
    assert qkv.inputs.shape == (32, 144) and qkv.timesteps.shape == (32,)
    assert layers[3].inputs.shape[1] == 576 and layers[3].weight.shape == (144, 576)
    with pytest.raises(ValueError):
        A.block_linears(bundle.transformer, calib, kinds=("adaLN",))


# --- timing ---------------------------------------------------------------------------------------
def test_rotation_cost_table_and_threads_restored():
    before = torch.get_num_threads()
    t = A.rotation_cost([144, 64], rows=32, min_time=0.001, repeats=2)
    assert torch.get_num_threads() == before
    assert list(t.index) == [144, 64]
    assert (t[["dense x@Q µs", "fast µs", "linear µs"]] > 0).all().all()
    assert t.loc[144, "ops/row dense"] == 144 * 144
    assert t.loc[144, "ops/row fast"] == 144 * 36 + 144 * 2  # 4 × 36: dense 36 + log2(4) butterfly passes
    assert t.loc[64, "ops/row fast"] == 64 * 1 + 64 * 6


# --- GPTQ vs RTN ----------------------------------------------------------------------------------
def test_split_rows_is_a_deterministic_partition():
    x = torch.arange(100, dtype=torch.float32)[:, None]
    fit, ev = A.split_rows(x, 0.3, seed=1)
    assert len(fit) == 70 and len(ev) == 30
    assert sorted(torch.cat([fit, ev]).flatten().tolist()) == list(range(100))
    assert torch.equal(A.split_rows(x, 0.3, seed=1)[1], ev)
    with pytest.raises(ValueError):
        A.split_rows(x, 1.0)


def test_output_error_values():
    x = torch.randn(50, 8)
    w = torch.randn(4, 8)
    assert A.output_error(x, w, w) == 0.0
    assert A.output_error(x, w, torch.zeros_like(w)) == pytest.approx(1.0)
    assert A.output_error(x, w, 0.9 * w) == pytest.approx(0.01, rel=1e-5)  # 0.9·w rounded to float32


def test_energy_rank():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(300, 3, generator=g) @ torch.randn(3, 40, generator=g)
    assert A.energy_rank(low, 0.999) <= 3
    assert A.energy_rank(torch.eye(40), 0.5) == 20
    assert A.energy_rank(torch.randn(500, 40, generator=g), 0.99) > 30
    assert A.energy_rank(torch.eye(40), [0.5, 1.0]) == [20, 40]


def test_gptq_rtn_table_gptq_wins_on_correlated_inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(800, 8, generator=g) @ torch.randn(8, 144, generator=g) + 0.1 * torch.randn(800, 144, generator=g)
    lay = A.BlockLinear("b0.qkv", 0, "qkv", torch.randn(48, 144, generator=g), None, x, torch.zeros(800))
    before = torch.get_num_threads()
    t = A.gptq_rtn_table([lay], formats=("fp4_e2m1", "int4"), threads=1)
    assert torch.get_num_threads() == before
    assert len(t) == 4 and set(t["format"]) == {"fp4_e2m1", "int4"}
    assert (t["gptq_err"] < t["rtn_err"]).all()
    assert (t["gptq_fit_err"] < t["rtn_fit_err"]).all()
    assert (t["reduction_pct"] > 0).all() and (t["fit_rows"] == 400).all()
    # RTN does not look at X: its error is the same whether measured on fit or held-out rows up to sampling
    assert t["rtn_err"].iloc[0] == pytest.approx(t["rtn_fit_err"].iloc[0], rel=0.2)


def test_damping_sweep_large_damping_tends_to_rtn():
    lay = _layer(n=600, gain=5.0)
    t = A.damping_sweep(lay, "int4", [1e-3, 1e6], rotated=False)
    assert list(t.index) == [1e-3, 1e6]
    # with λ ≫ diag H the Hessian is ≈ λ I: no error feedback, GPTQ = round-to-nearest
    assert t.loc[1e6, "gptq_eval_err"] == pytest.approx(t.loc[1e6, "rtn_eval_err"], rel=1e-3)
    assert t.loc[1e-3, "gptq_fit_err"] < t.loc[1e-3, "rtn_fit_err"]


# --- the 2-D toy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,scale", [("fp4_e2m1", 1.0), ("int4", 0.25)])
def test_error_feedback_2d_matches_library_gptq(fmt, scale):
    h = torch.tensor([[2.0, 1.6], [1.6, 2.0]], dtype=torch.float64)
    w = (1.25, 0.4)
    r = A.error_feedback_2d(w, h, fmt, scale)
    g = GPTQ(torch.tensor([w], dtype=torch.float32)).set_hessian(h)
    res = g.quantize(fmt, torch.tensor([scale]), percdamp=0.0)
    assert torch.allclose(res.weight.double().flatten(), r["gptq"], atol=1e-6)
    assert torch.allclose(rtn_quantize(torch.tensor([w]), fmt, torch.tensor([scale])).double().flatten(), r["rtn"])
    # the update is the best continuous w2 given q1: the loss's derivative in w2 vanishes there
    e = torch.as_tensor(w, dtype=torch.float64) - r["updated"]
    assert float((h @ e)[1]) == pytest.approx(0.0, abs=1e-12)
    assert r["loss"]["best"] <= r["loss"]["gptq"] + 1e-12 <= r["loss"]["rtn"] + 1e-12
    assert r["loss"]["updated"] <= r["loss"]["gptq"]


def test_error_feedback_2d_example_where_gptq_beats_rtn():
    h = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    r = A.error_feedback_2d((1.25, 0.7), h, "fp4_e2m1")
    assert r["loss"]["gptq"] < r["loss"]["rtn"]


def test_outlier_profile_separates_channel_and_token_outliers():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 144, generator=g)
    chan = base.clone(); chan[:, 5] *= 10.0      # one outlier channel: within-row outliers
    tok = base.clone(); tok[7] *= 30.0           # one outlier token: a whole row is large
    pc, pt = A.outlier_profile(chan), A.outlier_profile(tok)
    assert pc["row_crest"] > 2 * A.outlier_profile(base)["row_crest"] and pc["token_ratio"] < 3.0
    assert pt["token_ratio"] > 10.0
    rot = A.Rotation(144)
    # a rotation keeps every row's norm: the token ratio cannot change, the channel outlier is spread
    assert A.outlier_profile(rot.apply(tok))["token_ratio"] == pytest.approx(pt["token_ratio"], rel=1e-4)
    assert A.outlier_profile(rot.apply(chan))["tensor_crest"] < 0.5 * pc["tensor_crest"]
