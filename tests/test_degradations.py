"""degradations: each known degradation does what it says, and the ladder measures it."""
import numpy as np
import pytest

from hqdit_utils.chapters.degradations import blur, degradation_ladder, pixel_noise, requantize
from hqdit_utils.chapters.fidelity import FEATURE, RMS


def _images(n=64, seed=0):
    return np.random.default_rng(seed).integers(40, 216, size=(n, 16, 16, 1), dtype=np.uint8)


def test_pixel_noise_has_the_stated_rms_and_is_seeded():
    x = _images()
    y = pixel_noise(x, 8.0, seed=1)
    rms = np.sqrt(((y.astype(float) - x) ** 2).mean())
    assert rms == pytest.approx(8.0, rel=0.03)  # rounding adds 1/12 grey level², clipping never happens here
    assert np.array_equal(y, pixel_noise(x, 8.0, seed=1)) and not np.array_equal(y, pixel_noise(x, 8.0, seed=2))


def test_blur_keeps_a_flat_image_and_smooths_a_spike():
    flat = np.full((1, 16, 16, 1), 100, np.uint8)
    assert np.array_equal(blur(flat, 1.5), flat)
    spike = np.zeros((1, 16, 16, 1), np.uint8)
    spike[0, 8, 8, 0] = 255
    b = blur(spike, 1.0)
    assert b[0, 8, 8, 0] < 60 and b[0, 8, 9, 0] > 0 and b[0, 0, 0, 0] == 0
    pair = np.concatenate([spike, np.zeros_like(spike)])
    assert not blur(pair, 1.0)[1].any()  # nothing leaks into the next image of the batch


def test_requantize_keeps_exactly_the_stated_levels():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    assert np.unique(requantize(x, 4)).tolist() == [0, 85, 170, 255]
    assert np.array_equal(requantize(x, 256), x)
    assert np.abs(requantize(x, 16).astype(int) - x).max() <= 9  # half a step of 17
    with pytest.raises(ValueError, match="levels"):
        requantize(x, 1)


def test_ladder_measures_more_damage_for_more_noise(toy_extractor):
    x = _images(128)
    ref = _images(128, seed=5)
    lad = degradation_ladder(x, ref, toy_extractor, [("noise 4", lambda a: pixel_noise(a, 4)),
                                                     ("noise 32", lambda a: pixel_noise(a, 32))],
                             metrics=("FID*", "KID*"))
    assert lad.loc["none", RMS] == 0 and lad.loc["none", FEATURE] == 0
    assert lad.loc["noise 4", RMS] < lad.loc["noise 32", RMS]
    assert lad.loc["noise 4", FEATURE] < lad.loc["noise 32", FEATURE]
    assert lad.loc["noise 32", "FID*"] > lad.loc["none", "FID*"]
