"""fake_quantize: properties, granularities, block formats (MXFP4 / NVFP4) and bad inputs."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from hqdit_utils.engine.formats import parse_format
from hqdit_utils.engine.quantizer import fake_quantize, max_abs_scale, round_to_grid

FORMATS = ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "fp6_e3m2", "fp8_e4m3fn", "int4", "int8"]
finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
vectors = arrays(np.float32, st.integers(1, 64), elements=finite)


@settings(max_examples=60, deadline=None)
@given(vectors, st.sampled_from(FORMATS))
def test_monotone_odd_idempotent(x, name):
    x = torch.from_numpy(np.sort(x))
    q = round_to_grid(x, name)
    assert bool((q[1:] >= q[:-1]).all())  # monotone
    assert torch.equal(round_to_grid(-x, name), -q)  # odd-symmetric
    assert torch.equal(round_to_grid(q, name), q)  # idempotent


@settings(max_examples=60, deadline=None)
@given(vectors, st.sampled_from(FORMATS))
def test_error_at_most_half_step_inside_range_and_saturates_outside(x, name):
    fmt = parse_format(name)
    x = torch.from_numpy(x).double()
    grid = fmt.grid().double()
    q = round_to_grid(x.float(), fmt).double()
    inside = x.abs() <= fmt.max_value
    idx = torch.searchsorted(grid, x.clamp(grid[0], grid[-1])).clamp(1, len(grid) - 1)
    half_step = (grid[idx] - grid[idx - 1]) / 2
    assert bool(((q - x).abs()[inside] <= half_step[inside] + 1e-12).all())
    assert bool((q[~inside] == torch.sign(x[~inside]) * fmt.max_value).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_shapes_preserved(dtype):
    x = torch.randn(3, 5, 64).to(dtype)
    for kw in [{}, {"axis": 1}, {"block_size": 32, "scale_format": "e8m0"}, {"block_size": 16, "scale_format": "fp8_e4m3fn"}]:
        q = fake_quantize(x, "fp4_e2m1", **kw)
        assert q.dtype == dtype and q.shape == x.shape


def test_max_abs_scaling_hits_the_grid_max():
    x = torch.randn(8, 32)
    for axis in (None, 0, 1):
        q = fake_quantize(x, "fp4_e2m1", axis=axis)
        s = max_abs_scale(x, "fp4_e2m1", axis)
        assert torch.allclose(q.abs().amax() if axis is None else q.abs().amax(dim=1 - axis),
                              x.abs().amax() if axis is None else x.abs().amax(dim=1 - axis))
        assert torch.equal(q, round_to_grid(x / s, "fp4_e2m1") * s)


def test_per_channel_beats_per_tensor_with_an_outlier_channel():
    x = torch.randn(16, 64)
    x[3] *= 50.0
    rest = torch.arange(16) != 3  # the rows the outlier channel would drown under one shared scale
    err_t = (fake_quantize(x, "fp4_e2m1") - x)[rest].pow(2).mean()
    err_c = (fake_quantize(x, "fp4_e2m1", axis=0) - x)[rest].pow(2).mean()
    assert err_c < err_t / 10


def test_explicit_scale_equals_manual_formula():
    x = torch.randn(4, 8)
    s = torch.rand(4, 1) + 0.1
    assert torch.equal(fake_quantize(x, "fp4_e3m0", s), round_to_grid(x / s, "fp4_e3m0") * s)


def test_fp32_is_identity():
    x = torch.randn(5)
    assert fake_quantize(x, "fp32") is x


@pytest.mark.parametrize("scale_format,block", [("e8m0", 32), ("fp8_e4m3fn", 16), (None, 16)])
def test_block_with_grid_max_times_power_of_two_round_trips(scale_format, block):
    gen = torch.Generator().manual_seed(1)
    grid = parse_format("fp4_e2m1").grid()
    codes = grid[torch.randint(len(grid), (4, 64), generator=gen)]
    codes[:, ::block] = 6.0  # every block holds the grid maximum
    x = codes * 2.0 ** torch.randint(-3, 4, (4, 1), generator=gen).float()
    if scale_format == "fp8_e4m3fn":
        x = codes * 0.25  # one power of two for the tensor, so every block scale is exact in E4M3
    assert torch.equal(fake_quantize(x, "fp4_e2m1", block_size=block, scale_format=scale_format), x)


def test_mx_block_scale_is_a_power_of_two():
    x = torch.randn(2, 64) * 3
    q = fake_quantize(x, "fp4_e2m1", block_size=32, scale_format="e8m0")
    # each block's values are grid values times one power of two
    for blk in q.reshape(-1, 32):
        nz = blk[blk != 0].abs()
        ratio = nz / nz.min()
        assert bool(torch.isin(blk / (2.0 ** torch.floor(torch.log2(blk.abs().max())) / 4), parse_format("fp4_e2m1").grid()).all())
        assert ratio.max() <= 12  # FP4 E2M1 spans 0.5 … 6


def test_block_size_must_divide():
    with pytest.raises(ValueError, match="must divide"):
        fake_quantize(torch.randn(4, 30), "fp4_e2m1", block_size=16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_reported(bad):
    x = torch.randn(10)
    x[2] = bad
    with pytest.raises(ValueError, match=r"NaN and .* Inf"):
        fake_quantize(x, "fp4_e2m1")
    fake_quantize(x, "fp4_e2m1", scale=1.0, check_finite=False)  # the switch turns the check off


def test_bad_scale_shape_and_value():
    with pytest.raises(ValueError, match="does not broadcast"):
        fake_quantize(torch.randn(4, 8), "int4", torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        fake_quantize(torch.randn(4, 8), "int4", torch.zeros(4, 1))
    with pytest.raises(ValueError, match="floating-point"):
        fake_quantize(torch.arange(4), "int4")
    with pytest.raises(ValueError, match="Grammar"):
        fake_quantize(torch.randn(4), "fp4_e3m1")


def test_zero_tensor_stays_zero():
    for kw in [{}, {"axis": 0}, {"block_size": 16, "scale_format": "fp8_e4m3fn"}, {"block_size": 32, "scale_format": "e8m0"}]:
        assert torch.equal(fake_quantize(torch.zeros(2, 32), "fp4_e2m1", **kw), torch.zeros(2, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    x = torch.randn(64, 64)
    assert torch.equal(fake_quantize(x.cuda(), "fp4_e2m1", axis=0).cpu(), fake_quantize(x, "fp4_e2m1", axis=0))


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "fp6_e3m2", "fp8_e4m3fn", "fp8_e5m2",
                                 "fp9_e8m0", "fp16_e8m7", "int4", "int8", "uint4"])
def test_in_place_rounding_is_bit_identical(fmt):
    """round_to_grid_ (in place, used by fake_quantize) gives exactly round_to_grid's result, special
    values included."""
    from hqdit_utils.engine.quantizer import round_to_grid_

    f = parse_format(fmt)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4000, generator=g) * torch.logspace(-45, 38, 4000, base=2.0)
    special = torch.tensor([0.0, -0.0, 0.25, 0.75, 1.25, 2.5, -2.5, 1e-45, -1e-40, 3e38, -3e38,
                            float("inf"), float("-inf"), float("nan")])
    x = torch.cat([x, special, f.grid(), (f.grid()[1:] + f.grid()[:-1]) / 2])
    expect = round_to_grid(x, f)
    got = round_to_grid_(x.clone(), f)
    assert torch.equal(torch.isnan(got), torch.isnan(expect))
    assert torch.equal(torch.signbit(got), torch.signbit(expect))
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(expect))


@pytest.mark.parametrize("amax", [1e-39, 2.0 ** -126 * 0.999, 2.0 ** -126, 1.5 * 2.0 ** -126, 2.0 ** -149])
def test_mx_block_at_the_float32_subnormal_boundary_stays_finite(amax):
    """A block whose max is a float32 subnormal (< 2^-126) read exponent 0, got scale 0 and turned its zeros
    into NaN; the E8M0 scale is at least 2^-127, so the block stays finite and its zeros zero."""
    x = torch.zeros(2, 32)
    x[0, 3], x[0, 7] = amax, -amax / 2
    x[1, 0] = 1.0  # a normal block beside it
    q = fake_quantize(x, "fp4_e2m1", block_size=32, scale_format="e8m0")
    assert torch.isfinite(q).all()
    assert (q[x == 0] == 0).all()
    assert q[1, 0] == 1.0
    assert abs(float(q[0, 3]) - amax) <= 2.0 ** -127  # within one E8M0-minimum scale step of the value


def test_nvfp4_block_whose_e4m3_scale_underflows_uses_the_smallest_e4m3_scale():
    """Block max 20 beside a tensor max 1e8: 20 / 6 / s2 (s2 = 1e8 / (6·448)) is below half of E4M3's smallest
    subnormal 2^-9, so the block scale rounds to zero. It used to fall back to 1.0 (20 → 6.0, a value no stored
    scale gives); now the scale is 2^-9 · s2, the smallest an encoder can store."""
    x = torch.zeros(2, 16)
    x[0, 0] = 1e8
    x[1, 0], x[1, 1] = 20.0, -5.0
    q = fake_quantize(x, "fp4_e2m1", block_size=16, scale_format="fp8_e4m3fn")
    s2 = 1e8 / (6 * 448)
    scale = torch.tensor(2.0 ** -9 * s2, dtype=torch.float32)
    expected = fake_quantize(x[1], "fp4_e2m1", scale)
    assert torch.equal(q[1], expected)
    assert float(q[1, 0]) != 6.0 and abs(float(q[1, 0]) - 20.0) <= float(scale)
