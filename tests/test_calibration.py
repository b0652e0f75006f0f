"""Tests of calibration: recording along trajectories, shared q/k/v inputs, memory bound, batch-size
invariance, save/load, errors."""
import pytest
import torch

from hqdit_utils.engine import calibration as capture
from hqdit_utils.engine.calibration import ActivationRecorder, Calibration, CalibrationError, calibrate
from hqdit_utils.dit.models import tiny_dit


@pytest.fixture(scope="module")
def bundle():
    return tiny_dit(0, width=144, heads=2, num_layers=2)


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
