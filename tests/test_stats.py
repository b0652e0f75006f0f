"""Tests of streaming tensor statistics: batch-split invariance, the reservoir, percentiles, moments, merging."""
import math

import pytest
import torch

from hqdit_utils.engine.stats import TensorStats


def _coeffs(seed=0):
    return torch.randint(1, 2 ** 62, (64,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64) | 1


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
