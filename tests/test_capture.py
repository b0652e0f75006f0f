"""Tests of calibration capture: layer selection, statistics, reservoir, batch-size invariance, errors."""
import math

import pytest
import torch

from hqdit_utils import capture
from hqdit_utils.capture import (ALL_FC_LAYERS, DEFAULT_LAYERS, ActivationRecorder, Calibration, CalibrationError,
                                 TensorStats, calibrate, select_linears)
from hqdit_utils.models import tiny_dit


def _coeffs(seed=0):
    return torch.randint(1, 2 ** 62, (64,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64) | 1


@pytest.fixture(scope="module")
def bundle():
    return tiny_dit(0, width=144, heads=2, num_layers=2)


# -- layer selection ---------------------------------------------------------------------------------
def test_default_selection_is_the_token_wise_block_linears(bundle):
    sel = select_linears(bundle.transformer, DEFAULT_LAYERS)
    assert len(sel) == 12
    assert all(n.split(".", 2)[2] in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj",
                                      "ff.net.2") for n in sel)

    sel_all = select_linears(bundle.transformer, ALL_FC_LAYERS)
    assert set(sel_all) - set(sel) == {"transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear"}


def test_regex_patterns_and_exclude(bundle):
    sel = select_linears(bundle.transformer, ["re:transformer_blocks\\.1\\..*to_[qkv]"])
    assert list(sel) == [f"transformer_blocks.1.attn1.to_{c}" for c in "qkv"]
    sel = select_linears(bundle.transformer, DEFAULT_LAYERS, exclude=["transformer_blocks.0.*"])
    assert len(sel) == 6 and all(n.startswith("transformer_blocks.1") for n in sel)


def test_pattern_matching_nothing_is_an_error(bundle):
    with pytest.raises(CalibrationError, match="matches no module"):
        select_linears(bundle.transformer, ["*.attn2.to_q"])
    with pytest.raises(CalibrationError, match="none is an nn.Linear"):
        select_linears(bundle.transformer, ["*.attn1"])


# -- statistics --------------------------------------------------------------------------------------
def test_statistics_identical_for_any_batch_split():
    torch.manual_seed(0)
    x = torch.randn(300, 40) * torch.linspace(0.1, 5, 40)
    results = []
    for bs in (300, 7, 64):
        st = TensorStats(40, 32, _coeffs())
        for i in range(0, 300, bs):
            st.update(x[i:i + bs])
        results.append(st)
    a = results[0]
    for b in results[1:]:
        assert a.count == b.count and a.absmax == b.absmax
        assert torch.equal(a.channel_absmax, b.channel_absmax)
        assert torch.equal(a.hist, b.hist)
        assert torch.equal(a.rows, b.rows) and torch.equal(a.priority, b.priority)
        assert torch.equal(a.top_rows, b.top_rows) and float(a.top_absmax[0]) == a.absmax
        torch.testing.assert_close(a.moments, b.moments, rtol=1e-12, atol=0)
        torch.testing.assert_close(a.channel_sumsq, b.channel_sumsq, rtol=1e-12, atol=0)
    # order of arrival does not matter either
    c = TensorStats(40, 32, _coeffs())
    c.update(x.flip(0))
    assert torch.equal(torch.sort(c.priority).values, torch.sort(a.priority).values)


def test_reservoir_is_bounded_made_of_real_rows_and_seeded():
    x = torch.randn(500, 16)
    st = TensorStats(16, 50, _coeffs(0))
    st.update(x)
    assert st.rows.shape == (50, 16)
    # every kept row is a row of x
    assert bool((st.rows[:, None, :] == x[None]).all(-1).any(-1).all())
    st2 = TensorStats(16, 50, _coeffs(1))
    st2.update(x)
    assert not torch.equal(st.rows, st2.rows)
    st3 = TensorStats(16, 0, _coeffs(0))
    st3.update(x)
    assert st3.rows.shape == (0, 16) and st3.count == 500


def test_percentiles_within_one_histogram_bin_and_moments():
    torch.manual_seed(1)
    x = torch.randn(4000, 25)
    st = TensorStats(25, 0, _coeffs())
    st.update(x)
    a = x.abs().flatten().double()
    for q in (50, 90, 99, 99.9):
        exact = float(torch.quantile(a, q / 100))
        est = st.percentile(q)
        assert abs(math.log2(est / exact)) <= 1 / 8 + 1e-9, (q, est, exact)
    assert st.percentile(100) == pytest.approx(st.absmax)
    assert st.kurtosis == pytest.approx(3.0, abs=0.15)
    assert st.mean == pytest.approx(float(x.double().mean()), abs=1e-12)
    assert st.std == pytest.approx(float(x.double().std(unbiased=False)), rel=1e-9)
    lap = torch.distributions.Laplace(0.0, 1.0).sample((200000,)).reshape(-1, 20)
    st2 = TensorStats(20, 0, _coeffs())
    st2.update(lap)
    assert st2.kurtosis == pytest.approx(6.0, rel=0.1)
    assert torch.equal(st.channel_absmax, x.abs().amax(0))


def test_merge_pools_everything():
    x, y = torch.randn(100, 8), torch.randn(50, 8) * 3
    a, b, c = (TensorStats(8, 10, _coeffs()) for _ in range(3))
    a.update(x), b.update(y), c.update(torch.cat([x, y]))
    m = a.merge(b)
    assert m.count == 150 and m.absmax == c.absmax and torch.equal(m.hist, c.hist)
    assert m.rows.shape == (20, 8)
    m2 = a.merge(b, keep_all_rows=False)
    assert torch.equal(m2.rows, c.rows)


# -- recording on a DiT --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib(bundle):
    return calibrate(bundle, num_trajectories=2, num_timesteps=3, num_steps=4, rows_per_timestep=32, batch_size=2,
                     attention=True)


def test_calibrate_records_layers_timesteps_and_shares_qkv(calib, bundle):
    assert len(calib.timesteps) == 3
    assert calib.timesteps == sorted(calib.timesteps, reverse=True)
    for b in range(2):
        q = calib[f"transformer_blocks.{b}.attn1.to_q"]
        assert q is calib[f"transformer_blocks.{b}.attn1.to_k"] is calib[f"transformer_blocks.{b}.attn1.to_v"]
        assert sorted(q.per_timestep) == sorted(calib.timesteps)
        st = q.per_timestep[calib.timesteps[0]]
        assert st.count == 2 * 2 * 16  # CFG doubles the batch, 16 tokens per 8x8 image with patch 2
        assert f"transformer_blocks.{b}.attn1.p" in calib
    assert calib["transformer_blocks.0.ff.net.2"].in_features == 4 * 144
    df = calib.to_pandas()
    assert {"layer", "timestep", "absmax", "kurtosis", "p99"} <= set(df.columns)
    # attention processors restored
    from diffusers.models.attention_processor import AttnProcessor2_0
    assert isinstance(bundle.transformer.transformer_blocks[0].attn1.processor, AttnProcessor2_0)


def test_memory_bound_holds(calib):
    R, T = 32, 3
    bound = 0
    for rec in calib.unique():
        if rec.name.endswith((".q", ".k", ".v", ".p")):
            continue
        bound += T * (4 * (R + 8) * rec.in_features + 12 * rec.in_features + 16384 + 12 * (R + 8) + 64)
    attn = sum(s.nbytes() for rec in calib.unique() if rec.name.endswith((".q", ".k", ".v", ".p"))
               for s in rec.per_timestep.values())
    assert calib.nbytes() - attn <= bound


def test_calibration_independent_of_batch_size(bundle, calib):
    other = calibrate(bundle, num_trajectories=2, num_timesteps=3, num_steps=4, rows_per_timestep=32, batch_size=1)
    for name in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2"):
        for t in calib.timesteps:
            a, b = calib[name].per_timestep[t], other[name].per_timestep[t]
            assert a.count == b.count
            torch.testing.assert_close(a.channel_absmax, b.channel_absmax, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.moments, b.moments, rtol=1e-4, atol=1e-4)
            # histograms may differ only by values that moved across a bin edge through float rounding
            assert int((a.hist - b.hist).abs().sum()) <= 0.01 * a.count * a.d
            # the reservoir keeps (almost) the same rows: its hash ignores the low mantissa bits
            assert len(set(a.priority.tolist()) & set(b.priority.tolist())) >= 0.75 * len(a.priority)


def test_non_finite_activation_names_layer_and_timestep(bundle):
    import copy

    b2 = copy.copy(bundle)
    b2.transformer = copy.deepcopy(bundle.transformer)
    with torch.no_grad():
        b2.transformer.transformer_blocks[1].ff.net[0].proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"transformer_blocks\.1\.ff\.net\.2.*timestep \d+"):
        calibrate(b2, num_trajectories=1, num_timesteps=2, num_steps=3, rows_per_timestep=4)


def test_recorder_direct_use_and_save_load(bundle, tmp_path, calib):
    m = bundle.transformer
    with ActivationRecorder(m, ["*.ff.net.2"], timesteps={10}, rows_per_timestep=8) as rec:
        with torch.no_grad():
            m(torch.randn(2, 1, 8, 8), timestep=torch.tensor([10, 10]), class_labels=torch.tensor([0, 1]))
            m(torch.randn(2, 1, 8, 8), timestep=torch.tensor([20, 20]), class_labels=torch.tensor([0, 1]))
    c = rec.calibration
    assert c.timesteps == [10] and set(c.layers) == {"transformer_blocks.0.ff.net.2", "transformer_blocks.1.ff.net.2"}
    with ActivationRecorder(m, ["*.ff.net.2"], timesteps={5}) as rec2:
        with torch.no_grad():
            m(torch.randn(1, 1, 8, 8), timestep=torch.tensor([10]), class_labels=torch.tensor([0]))
    with pytest.raises(CalibrationError, match="nothing was recorded"):
        rec2.calibration
    calib.save(tmp_path / "c.pt")
    back = Calibration.load(tmp_path / "c.pt")
    assert back.timesteps == calib.timesteps
    n = "transformer_blocks.0.attn1.to_k"
    assert back[n] is back["transformer_blocks.0.attn1.to_q"]
    t = calib.timesteps[1]
    assert torch.equal(back[n].per_timestep[t].rows, calib[n].per_timestep[t].rows)
    assert back[n].per_timestep[t].kurtosis == calib[n].per_timestep[t].kurtosis


def test_calibration_timesteps_spread_over_schedule(bundle):
    ts = capture.calibration_timesteps(bundle, 10, 4)
    assert len(ts) == 4 and ts[0] > ts[-1]
    assert ts[0] == max(capture.calibration_timesteps(bundle, 10, 10))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_activation_is_reported_with_layer_and_count(bad):
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4))
    x = torch.randn(3, 4)
    x[1, 2] = bad
    with pytest.raises(CalibrationError, match=r"input of layer '0'.*1 of 12 elements"):
        with ActivationRecorder(model, ["0"]) as _:
            model(x)
