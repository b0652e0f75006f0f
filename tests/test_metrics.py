"""Metric maths: Fréchet distance, streaming statistics, sFID flattening, Inception Score, precision/recall."""
import warnings

import numpy as np
import pytest
from scipy import linalg

from hqdit_utils.metrics import frechet
from hqdit_utils.metrics.frechet import FeatureStats, frechet_distance
from hqdit_utils.metrics.inception_score import inception_score
from hqdit_utils.metrics.precision_recall import manifold_radii, precision_recall
from hqdit_utils.metrics.sfid import INCEPTION_SFID_DIM, spatial_features


def random_cov(rng, d, n=None):
    """A well-conditioned random covariance [d, d] (sample covariance of n > d Gaussian vectors)."""
    a = rng.standard_normal((n or 3 * d, d)) @ rng.standard_normal((d, d))
    return np.cov(a, rowvar=False)


# ----------------------------------------------------------------------------------------- Fréchet
def test_frechet_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    v1, v2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_symmetric_scipy_formula_on_random_covariances():
    # tr((S1 S2)^½) = tr((S1^½ S2 S1^½)^½): an independent route through scipy.
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    r1 = linalg.sqrtm(s1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(r1 @ s2 @ r1).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_agrees_with_torch_fidelity_on_feature_statistics():
    # torch-fidelity takes the trace from the eigenvalues of the product: an independent implementation.
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(8)
    a = rng.standard_normal((300, 40)) @ rng.standard_normal((40, 40))
    b = 0.5 + rng.standard_normal((250, 40)) @ rng.standard_normal((40, 40))
    sa, sb = FeatureStats.from_features(a, batch_size=33), FeatureStats.from_features(b)
    theirs = fid_statistics_to_metric({"mu": sa.mean, "sigma": sa.cov}, {"mu": sb.mean, "sigma": sb.cov}, verbose=False)
    assert sa.frechet_distance(sb) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-8)


def test_frechet_zero_for_identical_and_symmetric():
    rng = np.random.default_rng(2)
    mu, s = rng.standard_normal(24), random_cov(rng, 24)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
    mu2, s2 = rng.standard_normal(24), random_cov(rng, 24)
    ab, ba = frechet_distance(mu, s, mu2, s2), frechet_distance(mu2, s2, mu, s)
    assert ab > 1.0 and ab == pytest.approx(ba, rel=1e-9)


def test_frechet_singular_product_falls_back_to_diagonal_offset(monkeypatch):
    # ADM's fallback: a non-finite sqrtm triggers a retry with eps on both diagonals, and a warning.
    calls = []
    real_sqrtm = linalg.sqrtm

    def flaky_sqrtm(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(frechet.linalg, "sqrtm", flaky_sqrtm)
    s = np.diag([1.0, 0.0])  # rank-deficient: the product is singular
    with pytest.warns(RuntimeWarning, match="singular"):
        d = frechet_distance(np.zeros(2), s, np.ones(2), s)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s + 1e-6 * np.eye(2)) @ (s + 1e-6 * np.eye(2)))
    assert d == pytest.approx(2.0, abs=1e-5)


def test_frechet_rejects_significant_imaginary_part_and_bad_inputs():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))  # not PSD
    with pytest.raises(ValueError, match="same length"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="covariances must be"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([0.0, np.nan]), np.eye(2), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------------ streaming statistics
def test_feature_stats_identical_for_batch_sizes_1_7_64():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((200, 12)) * rng.uniform(0.1, 5, 12) + 1e3).astype(np.float32)  # large mean
    ref_mean, ref_cov = x.astype(np.float64).mean(0), np.cov(x.astype(np.float64), rowvar=False)
    stats = {b: FeatureStats.from_features(x, batch_size=b) for b in (1, 7, 64)}
    for b, st in stats.items():
        assert st.n == 200
        np.testing.assert_allclose(st.mean, ref_mean, rtol=1e-13, err_msg=f"batch {b}")
        np.testing.assert_allclose(st.cov, ref_cov, rtol=1e-10, atol=1e-10 * np.abs(ref_cov).max(), err_msg=f"batch {b}")
    np.testing.assert_allclose(stats[1].cov, stats[64].cov, rtol=1e-10, atol=1e-12 * np.abs(ref_cov).max())
    assert stats[7].frechet_distance(stats[64]) == pytest.approx(0.0, abs=1e-7)


def test_feature_stats_errors():
    st = FeatureStats()
    st.update(np.zeros((0, 4)))  # an empty batch adds nothing
    assert st.n == 0
    with pytest.raises(ValueError, match="at least 1"):
        st.mean
    st.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        st.cov
    with pytest.raises(ValueError, match="dimension changed"):
        st.update(np.ones((3, 5)))
    bad = np.ones((5, 4))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="1 of 5 feature vectors contain NaN"):
        st.update(bad)
    with pytest.raises(ValueError, match="2-D"):
        FeatureStats.from_features(np.ones(4))


# ---------------------------------------------------------------------------------------------- sFID
def test_spatial_features_flatten_in_nhwc_order():
    n, c, h, w = 2, 9, 3, 4
    x = np.arange(n * c * h * w, dtype=np.float32).reshape(n, c, h, w)
    f = spatial_features(x, channels=7)
    assert f.shape == (n, h * w * 7)
    for y, xx, ch in [(0, 0, 0), (0, 0, 6), (1, 2, 3), (2, 3, 6)]:
        assert f[1, (y * w + xx) * 7 + ch] == x[1, ch, y, xx]
    assert spatial_features(np.zeros((1, 192, 17, 17))).shape == (1, INCEPTION_SFID_DIM) == (1, 2023)
    with pytest.raises(ValueError, match="fewer than"):
        spatial_features(np.zeros((1, 6, 4, 4)))
    with pytest.raises(ValueError, match="NCHW"):
        spatial_features(np.zeros((1, 7, 4)))


def _spatial_maps(rng, n, shift=0.0):
    """[n, 8, 3, 3] maps whose channels have very different means and scales (like real feature maps)."""
    channel_mean = np.linspace(0, 6, 8)[None, :, None, None]
    channel_scale = np.linspace(0.2, 2, 8)[None, :, None, None]
    return channel_mean + shift + channel_scale * rng.standard_normal((n, 8, 3, 3))


def _fid(a, b):
    return FeatureStats.from_features(a).frechet_distance(FeatureStats.from_features(b))


def test_sfid_flattening_pitfall():
    """A consistent permutation of the 7·h·w coordinates changes nothing — which is why an NCHW port
    agrees with itself — but NCHW samples against NHWC reference statistics (ADM's mu_s, sigma_s)
    give a wildly different number."""
    rng = np.random.default_rng(4)
    samples, reference = _spatial_maps(rng, 2000, shift=0.05), _spatial_maps(rng, 2000)
    nhwc = _fid(spatial_features(samples), spatial_features(reference))
    nchw = lambda m: np.ascontiguousarray(m[:, :7], dtype=np.float32).reshape(len(m), -1)  # the pitfall
    assert nhwc < 2.0  # true distance 63 · 0.05² ≈ 0.16, plus the finite-sample bias
    assert _fid(nchw(samples), nchw(reference)) == pytest.approx(nhwc, rel=1e-9)
    perm = rng.permutation(samples.shape[2] * samples.shape[3] * 7)
    assert _fid(spatial_features(samples)[:, perm], spatial_features(reference)[:, perm]) == pytest.approx(nhwc, rel=1e-9)
    mixed = _fid(nchw(samples), spatial_features(reference))
    assert mixed > 100 * nhwc


# ----------------------------------------------------------------------------------- Inception Score
def test_inception_score_uniform_classifier_is_one():
    assert inception_score(np.zeros((50, 1008))) == pytest.approx(1.0, abs=1e-12)
    assert inception_score(probs=np.full((30, 10), 0.1)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 10, 1000])
def test_inception_score_perfect_classifier_over_k_classes_is_k(k):
    labels = np.arange(5 * k) % k
    assert inception_score(probs=np.eye(k)[labels]) == pytest.approx(k, rel=1e-12)
    logits = np.where(np.eye(k, dtype=bool)[labels], 60.0, 0.0)  # confident, not exactly one-hot
    assert inception_score(logits) == pytest.approx(k, rel=1e-6)


def test_inception_score_uses_adm_consecutive_splits():
    # 12 samples, splits of 5: [0..4] and [5..9] each cover 5 classes perfectly (IS 5); [10, 11] covers 2.
    probs = np.eye(5)[np.r_[np.arange(5), np.arange(5), [0, 1]]]
    assert inception_score(probs=probs, split_size=5) == pytest.approx((5 + 5 + 2) / 3)
    assert inception_score(probs=probs) == pytest.approx(np.exp(-np.sum([3/12, 3/12, 2/12, 2/12, 2/12] * np.log([3/12, 3/12, 2/12, 2/12, 2/12]))))


def test_inception_score_errors():
    with pytest.raises(ValueError, match="exactly one"):
        inception_score()
    with pytest.raises(ValueError, match="exactly one"):
        inception_score(np.zeros((2, 3)), probs=np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="non-empty"):
        inception_score(np.zeros((0, 10)))
    with pytest.raises(ValueError, match="NaN"):
        inception_score(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="sum"):
        inception_score(probs=np.ones((2, 3)))


# ----------------------------------------------------------------------------------- precision/recall
def test_precision_recall_of_a_set_against_itself_is_one():
    x = np.random.default_rng(5).standard_normal((300, 16))
    assert precision_recall(x, x) == (1.0, 1.0)


def test_precision_recall_against_a_far_disjoint_cluster_is_zero():
    rng = np.random.default_rng(6)
    ref, far = rng.standard_normal((200, 16)), rng.standard_normal((150, 16)) + 100.0
    assert precision_recall(ref, far) == (0.0, 0.0)


def test_precision_recall_partial_overlap_and_block_independence():
    rng = np.random.default_rng(7)
    ref = rng.standard_normal((200, 8))
    samples = np.concatenate([ref[:100] + 1e-3 * rng.standard_normal((100, 8)), rng.standard_normal((100, 8)) + 50.0])
    p, r = precision_recall(ref, samples)
    assert p == 0.5  # the far half of the samples is outside every reference ball
    assert 0.4 < r < 0.9  # only the reference points near the copied half are covered
    assert precision_recall(ref, samples, block=7) == (p, r)


def test_precision_recall_matches_brute_force_definition():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(9)
    ref, gen = rng.standard_normal((150, 6)), 0.7 * rng.standard_normal((120, 6)) + 0.8
    r_ref = np.sort(cdist(ref, ref), axis=1)[:, 3]  # 3rd nearest other point (column 0 is the point itself)
    r_gen = np.sort(cdist(gen, gen), axis=1)[:, 3]
    precision = np.mean((cdist(gen, ref) <= r_ref[None, :]).any(axis=1))
    recall = np.mean((cdist(ref, gen) <= r_gen[None, :]).any(axis=1))
    assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95  # a case where both can be wrong
    assert precision_recall(ref, gen, block=16) == pytest.approx((precision, recall), abs=1e-12)


def test_manifold_radii_is_distance_to_third_other_neighbour():
    x = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # squared distance to the 3rd nearest *other* point (element 3 of the sorted row incl. self)
    np.testing.assert_array_equal(manifold_radii(x, block=2), [36.0, 25.0, 9.0, 25.0, 81.0])
    with pytest.raises(ValueError, match="more than 3"):
        manifold_radii(x[:3])
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(np.full((5, 2), np.nan), x[:, [0, 0]])
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))
