"""Issue 32, the Python side: one-line errors for misplaced arguments and an unknown profile, ``sample`` on a
bare transformer (wrapped as ``calibrate`` wraps it), and a short ``Calibration`` repr."""
import pytest
import torch

from hqdit_utils import calibrate, sample
from hqdit_utils.engine.calibration import CalibrationError
from hqdit_utils.config import ProfileError, profile
from hqdit_utils.dit.models import as_bundle, tiny_dit

CALIB = dict(num_trajectories=2, num_timesteps=2, num_steps=2, rows_per_timestep=8)


@pytest.fixture(scope="module")
def bare():
    return tiny_dit(0).transformer


def test_a_recipe_where_the_scheduler_goes_is_one_line(bare):
    with pytest.raises(CalibrationError, match="got a str 'hqdit-w4a4': a recipe goes to quantize_") as err:
        calibrate(bare, "hqdit-w4a4")
    assert "\n" not in str(err.value)


def test_unknown_profile_is_one_line(monkeypatch):
    monkeypatch.setenv("HQDIT_PROFILE", "fast")
    with pytest.raises(ProfileError, match=r"unknown \$HQDIT_PROFILE 'fast': choose one of \['book', 'ci', 'full'\]"):
        profile()
    with pytest.raises(ProfileError, match="unknown profile 'fast'"):
        profile("fast")


def test_sample_accepts_a_bare_transformer_as_calibrate_does(bare):
    kw = dict(num_steps=2, cfg_scale=1.5, seeds=[0, 1], progress=False)
    images = sample(bare, [0, 1], **kw)
    assert torch.equal(images, sample(as_bundle(bare), [0, 1], **kw))
    assert images.shape == (2, 8, 8, 1) and images.dtype == torch.uint8


def test_calibration_repr_is_short(bare):
    cal = calibrate(bare, **CALIB)
    text = repr(cal)
    assert len(text) < 200 and "\n" not in text, text
    assert f"{len(cal.layers)} layers" in text and f"timesteps {cal.timesteps}" in text
    rows = sum(len(st.rows) for rec in cal.unique() for st in rec.per_timestep.values())
    assert f"{rows} reservoir rows" in text and rows > 0
