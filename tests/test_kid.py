"""KID*: the unbiased polynomial-kernel MMD² of Bińkowski et al. (2018), checked against a brute-force
double loop, for unbiasedness (where the plug-in estimate is biased), monotonicity in a shift, and its
wiring into ``metrics.adm.evaluate``."""
import numpy as np
import pytest

from hqdit_utils.metrics.kid import kernel_inception_distance, mmd2_unbiased, polynomial_kernel


def _brute_mmd2(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_matches_the_definition():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(0.3, 1.2, size=(9, 5))
    assert polynomial_kernel(x, y).shape == (7, 9)
    assert polynomial_kernel(x, y)[2, 3] == pytest.approx((x[2] @ y[3] / 5 + 1) ** 3)
    assert mmd2_unbiased(x, y) == pytest.approx(_brute_mmd2(x, y), rel=1e-10)


def test_unbiased_where_the_plug_in_estimate_is_not():
    # Same distribution on both sides: the true MMD² is 0. Averaged over many small draws the unbiased
    # estimate is ~0, the biased (V-statistic, diagonal included) estimate is clearly positive.
    rng = np.random.default_rng(1)
    u, v = [], []
    for _ in range(400):
        x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
        u.append(mmd2_unbiased(x, y))
        kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
        v.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    se = np.std(u, ddof=1) / np.sqrt(len(u))
    assert abs(np.mean(u)) < 3 * se
    assert np.mean(v) > 10 * se


def test_grows_with_the_shift_and_is_deterministic():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(300, 8))
    kids = [kernel_inception_distance(rng.normal(shift, 1, size=(200, 8)), ref, num_subsets=20, subset_size=100)[0]
            for shift in (0.0, 0.3, 1.0)]
    assert kids[0] < kids[1] < kids[2] and abs(kids[0]) < kids[1]
    gen = rng.normal(size=(50, 8))
    assert kernel_inception_distance(gen, ref, seed=3) == kernel_inception_distance(gen, ref, seed=3)
    # whole sets on both sides: one estimate, std 0
    mean, std = kernel_inception_distance(gen, ref[:50])
    assert std == 0.0 and mean == pytest.approx(mmd2_unbiased(gen, ref[:50]))


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError):
        kernel_inception_distance(np.zeros((4, 3)), np.zeros((5, 2)))
    with pytest.raises(ValueError):
        kernel_inception_distance(np.full((4, 3), np.nan), np.zeros((5, 3)))


def test_evaluate_reports_kid():
    from hqdit_utils.metrics.adm import evaluate
    from hqdit_utils.metrics.features import ProxyExtractor

    rng = np.random.default_rng(4)
    ref = rng.integers(0, 256, size=(40, 16, 16, 1), dtype=np.uint8)
    same = evaluate(ref[:20], ref[20:], ProxyExtractor())
    noise = evaluate(np.zeros((20, 16, 16, 1), np.uint8), ref, ProxyExtractor())
    assert "kid" in same.metric_names() and same.metric_names()["kid"] == "KID*"
    assert np.isfinite(same.kid) and noise.kid > same.kid
