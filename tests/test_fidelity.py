"""fidelity: distance of each sample to its FP32 twin, on synthetic images with known answers."""
from types import SimpleNamespace

import numpy as np
import pytest

from hqdit_utils.chapters.fidelity import FEATURE, PSNR, RMS, per_sample_fidelity, run_fidelity
from hqdit_utils.chapters.tables import LOWER_IS_BETTER


def _images(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(20, 200, size=(n, 16, 16, 1), dtype=np.uint8)


def _save(tmp_path, name, images, labels):
    path = tmp_path / f"{name}.npz"
    np.savez(path, arr_0=images, labels=labels)
    return path


def test_identical_images_have_zero_distance(toy_extractor):
    x = _images()
    d = per_sample_fidelity(x, x.copy(), toy_extractor)
    assert np.all(d["rms"] == 0) and np.all(d["feature"] == 0)


def test_known_shift_gives_known_rms_psnr_and_feature_distance(tmp_path, toy_extractor):
    x = _images()
    shifted = x + np.uint8(10)                     # every pixel +10 grey levels (no overflow: x ≤ 199)
    half = x.copy()
    half[:, :8] += np.uint8(20)                    # half the pixels +20: MSE 200, RMS √200
    d = per_sample_fidelity(shifted, x, toy_extractor)
    np.testing.assert_allclose(d["rms"], 10.0)
    # toy features: mean, std, mean of the first 16 pixels, mean of the rest -> the shift moves 3 of 4 by 10
    np.testing.assert_allclose(d["feature"], np.sqrt(3) * 10.0, rtol=1e-5)
    np.testing.assert_allclose(per_sample_fidelity(half, x, False)["rms"], np.sqrt(200.0))
    labels = np.arange(len(x)) % 10
    f = run_fidelity(_save(tmp_path, "q", shifted, labels), _save(tmp_path, "fp", x, labels), toy_extractor)
    assert f[RMS] == pytest.approx(10.0)
    assert f[PSNR] == pytest.approx(20 * np.log10(255 / 10))  # 28.13 dB
    assert f[FEATURE] == pytest.approx(np.sqrt(3) * 10.0, rel=1e-5)
    assert f["samples"] == len(x)
    same = run_fidelity(_save(tmp_path, "fp2", x, labels), _save(tmp_path, "fp", x, labels), toy_extractor)
    assert same[RMS] == 0 and same[FEATURE] == 0 and same[PSNR] == float("inf")


def test_psnr_pools_the_mse_over_the_run(tmp_path, toy_extractor):
    x = _images(4)
    y = x.copy()
    y[:2] += np.uint8(20)  # two samples at RMS 20, two identical: pooled MSE 200
    labels = np.arange(4)
    f = run_fidelity(_save(tmp_path, "q", y, labels), _save(tmp_path, "fp", x, labels), toy_extractor)
    assert f[RMS] == pytest.approx(10.0)  # mean of per-sample RMS
    assert f[PSNR] == pytest.approx(10 * np.log10(255 ** 2 / 200.0))


def test_runs_that_are_not_twins_are_refused(tmp_path, toy_extractor):
    x = _images()
    labels = np.arange(len(x))
    a = _save(tmp_path, "a", x, labels)
    with pytest.raises(ValueError, match="not twins"):
        run_fidelity(a, _save(tmp_path, "b", x, labels[::-1].copy()), toy_extractor)
    with pytest.raises(ValueError, match="not twins"):
        run_fidelity(a, _save(tmp_path, "c", x[:3], labels[:3]), toy_extractor)
    with pytest.raises(ValueError, match="not twins"):
        run_fidelity(SimpleNamespace(samples=a, seed=0), SimpleNamespace(samples=a, seed=1), toy_extractor)
    with pytest.raises(ValueError, match="uint8"):
        per_sample_fidelity(x.astype(np.float32), x, False)
    with pytest.raises(FileNotFoundError, match="run the recipe first"):
        run_fidelity(tmp_path / "missing.npz", a, toy_extractor)


def test_distances_count_as_lower_is_better_in_the_chapter_rule():
    assert {FEATURE, RMS} <= LOWER_IS_BETTER and PSNR not in LOWER_IS_BETTER


def test_with_fidelity_adds_the_twin_distances_to_a_run_table(tmp_path, monkeypatch, toy_extractor):
    import pandas as pd

    from hqdit_utils.runs import experiments
    from hqdit_utils.chapters.fidelity import FIDELITY_METRICS, with_fidelity

    x = {s: _images(4, seed=s) for s in (0, 1)}
    labels = np.arange(4)
    files = {("fp32", s): _save(tmp_path, f"fp32-{s}", x[s], labels) for s in (0, 1)}
    files |= {("q", s): _save(tmp_path, f"q-{s}", x[s] + np.uint8(5 * (s + 1)), labels) for s in (0, 1)}
    monkeypatch.setattr(experiments, "run", lambda bundle, r, *, seed, **kw: SimpleNamespace(samples=files[r, seed],
                                                                                          seed=seed))
    table = pd.DataFrame({"recipe": ["fp32", "fp32", "q", "q"], "seed": [0, 1, 0, 1], "sFID*": [1.0, 1.1, 1.2, 1.3]})
    out = with_fidelity(None, table, extractor=toy_extractor)
    assert list(out.columns) == ["recipe", "seed", "sFID*", *FIDELITY_METRICS]
    assert out["sFID*"].tolist() == table["sFID*"].tolist()
    assert out.loc[out.recipe == "fp32", RMS].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(out.loc[out.recipe == "q", RMS], [5.0, 10.0])  # each seed against its own FP32
