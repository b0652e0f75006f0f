"""Tests of the clipping-range search."""
import math

import pytest
import torch

from hqdit_utils.engine.clipping import (alpha_to_bias, alpha_to_scale, clip_activation, clip_weight, gamma_grid)
from hqdit_utils.engine.formats import FloatFormat, parse_format
from hqdit_utils.engine.quantizer import fake_quantize


FORMATS = ["fp4_e1m2", "fp4_e2m1", "fp4_e3m0", "int4"]


def _heavy(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[torch.rand(n, d, generator=g) < 0.01] *= 12  # sparse outliers
    return x


def test_gamma_grid_default():
    g = gamma_grid()
    assert len(g) == 100 and g[0] == pytest.approx(0.3) and g[-1] == 1.0
    with pytest.raises(ValueError):
        gamma_grid(10, 0.0, 1.0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_per_channel_search_equals_slow_reference_loop(fmt):
    w = _heavy(6, 40, seed=3)
    grid = gamma_grid(25, 0.3, 1.0)
    res = clip_weight(w, fmt, grid=grid)
    f = parse_format(fmt)
    for c in range(w.shape[0]):  # the slow reference: one channel and one γ at a time with fake_quantize
        losses = []
        for g in grid.tolist():
            s = float(w[c].abs().max()) * g / f.max_value
            losses.append(float(((fake_quantize(w[c], f, s) - w[c]).double() ** 2).sum()))
        best = min(range(len(grid)), key=lambda i: losses[i])
        assert res.gamma[c] == grid[best]
        assert float(res.loss[c]) == pytest.approx(losses[best], rel=1e-5)
        assert float(res.loss_at_max[c]) == pytest.approx(losses[-1], rel=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_searched_clip_never_worse_than_max_abs(fmt):
    w = _heavy(32, 64, seed=1)
    r = clip_weight(w, fmt)
    assert bool((r.loss <= r.loss_at_max * (1 + 1e-9)).all())
    mse_max = float(((fake_quantize(w, fmt, axis=0) - w) ** 2).mean())
    assert r.mse <= mse_max * (1 + 1e-6)
    for gran in ("tensor", "token"):
        a = clip_activation(_heavy(200, 48, seed=2), fmt, granularity=gran)
        assert float(a.loss) <= float(a.loss_at_max) * (1 + 1e-9)


def test_clipping_helps_on_heavy_tails_and_none_means_max():
    x = _heavy(256, 64, seed=5)
    a = clip_activation(x, "fp4_e1m2")
    assert float(a.gamma) < 0.9 and float(a.loss) < 0.9 * float(a.loss_at_max)
    n = clip_activation(x, "fp4_e1m2", method="none")
    assert float(n.gamma) == 1.0 and float(n.alpha) == float(x.abs().max())
    assert n.mse == pytest.approx(float(((fake_quantize(x, "fp4_e1m2") - x) ** 2).mean()))


def test_chunking_does_not_change_results():
    w = _heavy(17, 33, seed=7)
    a = clip_weight(w, "fp4_e2m1")
    b = clip_weight(w, "fp4_e2m1", max_elems=100)
    assert torch.equal(a.gamma, b.gamma)
    torch.testing.assert_close(a.loss, b.loss)
    x = _heavy(50, 33, seed=8)
    for gran in ("tensor", "token"):
        c = clip_activation(x, "fp4_e3m0", granularity=gran)
        d = clip_activation(x, "fp4_e3m0", granularity=gran, max_elems=64)
        assert float(c.gamma) == float(d.gamma)


def test_lp_loss_and_output_loss():
    w = _heavy(8, 24, seed=9)
    x = _heavy(100, 24, seed=10)
    lp = clip_weight(w, "fp4_e2m1", method="lp", p=4.0)
    f = parse_format("fp4_e2m1")
    for c in range(3):
        s = lp.alpha[c] / f.max_value
        ref = float(((fake_quantize(w[c], f, s) - w[c]).abs().double() ** 4).sum())
        assert float(lp.loss[c]) == pytest.approx(ref, rel=1e-4)
    out = clip_weight(w, "fp4_e2m1", method="output", inputs=x)
    # per-channel output error at the chosen α equals a direct computation, and is ≤ the max-abs one
    wq = fake_quantize(w, f, out.scale(f))
    err = ((x @ w.T - x @ wq.T).double() ** 2).sum(0)
    torch.testing.assert_close(out.loss, err, rtol=1e-4, atol=1e-6)
    assert bool((out.loss <= out.loss_at_max * (1 + 1e-9)).all())
    a = clip_activation(x, "fp4_e2m1", method="output", weight=wq)
    assert float(a.loss) <= float(a.loss_at_max) * (1 + 1e-9)
    with pytest.raises(ValueError, match="inputs"):
        clip_weight(w, "fp4_e2m1", method="output")
    with pytest.raises(ValueError, match="unknown clipping method"):
        clip_weight(w, "fp4_e2m1", method="kl")


def test_alpha_bias_scale_relation():
    """α ↔ real-valued bias ↔ scale: a grid with integer bias β equals the default grid times
    2^(β₀-β), and the largest value of the biased grid is α."""
    f = parse_format("fp4_e2m1")  # β₀ = 1, max 6
    for beta in (0, 2, 3):
        biased = FloatFormat(2, 1, bias=beta)
        alpha = biased.max_value
        assert alpha_to_bias(alpha, f) == pytest.approx(beta)
        x = torch.randn(500) * alpha
        assert torch.equal(fake_quantize(x, biased, 1.0), fake_quantize(x, f, alpha_to_scale(alpha, f)))
    assert float(alpha_to_scale(torch.tensor([3.0, 0.0]), f)[1]) == 1.0  # zero channels: scale 1
    with pytest.raises(ValueError):
        alpha_to_bias(1.0, "int4")


def test_zero_channels_and_shapes():
    w = torch.randn(5, 16)
    w[2] = 0
    r = clip_weight(w, "fp4_e2m1")
    assert r.alpha.shape == (5,) and r.scale("fp4_e2m1").shape == (5, 1)
    assert float(r.loss[2]) == 0.0 and math.isfinite(r.mse)
    a = clip_activation(torch.randn(2, 3, 16), "fp4_e2m1")
    assert a.alpha.dim() == 0


def test_coarse_fine_search_matches_grid_search_mostly_and_is_never_worse_than_max():
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(11))
    full = clip_weight(w, "fp4_e2m1")
    cf = clip_weight(w, "fp4_e2m1", search="coarse-fine", stride=5)
    assert bool((cf.loss <= cf.loss_at_max * (1 + 1e-9)).all())
    torch.testing.assert_close(cf.loss_at_max, full.loss_at_max)
    assert bool((cf.loss >= full.loss * (1 - 1e-9)).all())  # the full grid is the optimum
    assert float((cf.gamma == full.gamma).float().mean()) >= 0.6
    assert float((cf.loss / full.loss).max()) < 1.1
    a = clip_activation(_heavy(128, 48, seed=12), "fp4_e2m1", search="coarse-fine")
    b = clip_activation(_heavy(128, 48, seed=12), "fp4_e2m1")
    assert float(a.loss) <= float(a.loss_at_max) and float(a.loss) >= float(b.loss) * (1 - 1e-9)
    with pytest.raises(ValueError, match="clip search"):
        clip_weight(w, "fp4_e2m1", search="random")


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "int4", "int8", "fp6_e2m3", "fp8_e4m3",
                                 "fp8_e4m3fn", "fp8_e5m2"])
def test_sorted_mse_search_matches_elementwise_search(fmt, monkeypatch):
    """The sorted/prefix-sum MSE evaluation picks the same γ as quantizing every element for every γ, and
    its losses agree to float rounding (documented tolerance: relative ~1e-7 for 4-bit grids)."""
    import hqdit_utils.engine.clipping as clipping

    w, x = _heavy(24, 72, seed=11), _heavy(300, 40, seed=12)
    fast_w, fast_a = clip_weight(w, fmt), clip_activation(x, fmt, amax=float(x.abs().max()) * 1.3)
    monkeypatch.setattr(clipping, "_sorted_mse_evaluator", lambda *a, **k: None)
    slow_w, slow_a = clip_weight(w, fmt), clip_activation(x, fmt, amax=float(x.abs().max()) * 1.3)
    assert torch.equal(fast_w.gamma, slow_w.gamma)
    torch.testing.assert_close(fast_w.loss, slow_w.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(fast_w.loss_at_max, slow_w.loss_at_max, rtol=1e-5, atol=0)
    assert float(fast_a.gamma) == float(slow_a.gamma)
    assert float(fast_a.loss) == pytest.approx(float(slow_a.loss), rel=1e-5)


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e3m0", "int4", "fp8_e4m3fn"])
def test_rounding_thresholds_reproduce_round_to_grid_exactly(fmt):
    """round_to_grid(fl32(r)) is g[k] exactly for u[k-1] <= r < u[k], ties included: checked at every
    threshold, one float64 ulp either side, and on random values."""
    import numpy as np

    from hqdit_utils.engine.clipping import _rounding_thresholds
    from hqdit_utils.engine.quantizer import round_to_grid

    g, u = _rounding_thresholds(parse_format(fmt))
    un = u.numpy()
    r = np.concatenate([un, np.nextafter(un, np.inf), np.nextafter(un, -np.inf),
                        np.random.default_rng(0).uniform(0, float(g[-1]) * 1.2, 2000)])
    expect = g[torch.from_numpy(np.searchsorted(un, r, side="right"))]
    got = round_to_grid(torch.from_numpy(r).to(torch.float32), fmt).double()
    assert torch.equal(got, expect)
    assert _rounding_thresholds(parse_format("uint4")) is None


def test_sorted_values_are_shared_between_formats_and_follow_changes():
    """The candidate formats' searches on one tensor share a sort; changing the tensor in place, or
    dropping it, invalidates the shared entry."""
    import gc

    from hqdit_utils.engine.clipping import _PREFIX_CACHE

    x = _heavy(64, 40, seed=4)
    a1 = clip_activation(x, "fp4_e2m1")
    assert id(x) in _PREFIX_CACHE
    clip_activation(x, "fp4_e1m2")
    x.mul_(3)
    a2 = clip_activation(x, "fp4_e2m1")
    assert float(a2.alpha) == pytest.approx(3 * float(a1.alpha)) and float(a2.gamma) == float(a1.gamma)
    key = id(x)
    del x
    gc.collect()
    assert key not in _PREFIX_CACHE
