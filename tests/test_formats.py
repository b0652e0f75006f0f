"""Number formats: grammar, grids, and bit-exact agreement with ml_dtypes."""
import itertools
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hqdit_utils.engine.formats import FloatFormat, IntFormat, NoFormat, bias_for_clip, parse_format, scale_for_bias
from hqdit_utils.engine.quantizer import round_to_grid

# Non-negative half of each grid, written out from the format definitions (subnormals on).
WRITTEN_OUT = {
    "fp4_e1m2": [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5],
    "fp4_e2m1": [0, 0.5, 1, 1.5, 2, 3, 4, 6],
    "fp4_e3m0": [0, 0.25, 0.5, 1, 2, 4, 8, 16],
    "fp6_e2m3": [k / 8 for k in range(8)] + [(1 + k / 8) * 2 ** e for e in range(0, 3) for k in range(8)],
    "fp6_e3m2": [k / 16 for k in range(4)] + [(1 + k / 4) * 2 ** e for e in range(-2, 5) for k in range(4)],
}

ML_DTYPES = {
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
}

ALL_SMALL_FLOATS = [f"fp{1 + e + m}_e{e}m{m}" for e in range(1, 8) for m in range(0, 7) if 1 + e + m <= 8]


@pytest.mark.parametrize("name", sorted(WRITTEN_OUT))
def test_grid_written_out(name):
    grid = parse_format(name).grid().tolist()
    pos = sorted(WRITTEN_OUT[name])
    assert grid == sorted(set([-v for v in pos] + pos))


def test_fp8_special_values():
    e4m3 = parse_format("fp8_e4m3fn")
    assert e4m3.max_value == 448.0 and len(e4m3.grid()) == 2 * 127 - 1  # 127 finite magnitudes, one zero
    e5m2 = parse_format("fp8_e5m2")
    assert e5m2.max_value == 57344.0 and e5m2.special == "ieee"
    assert parse_format("fp8_e4m3").max_value == 480.0  # the all-finite E4M3 of this package's default


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_grid_equals_ml_dtypes_finite_values(name):
    dt = ML_DTYPES[name]
    bits = np.dtype(dt).itemsize * 8
    codes = np.arange(2 ** min(bits, 8), dtype=np.uint8)
    values = codes.view(dt).astype(np.float64) if bits == 8 else None
    if values is None:  # sub-byte types: enumerate through a float sweep of the grid we expect
        values = np.array(parse_format(name).grid().tolist())
        assert np.array_equal(values.astype(dt).astype(np.float64), values)
    finite = np.unique(values[np.isfinite(values)] + 0.0)
    assert np.array_equal(finite, parse_format(name).grid().double().numpy())


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_rounding_bit_exact_with_ml_dtypes(name):
    fmt = parse_format(name)
    gen = torch.Generator().manual_seed(0)
    grid = fmt.grid().double()
    mids = ((grid[1:] + grid[:-1]) / 2).float()  # every tie point
    x = torch.cat([
        (torch.randn(20000, generator=gen) * fmt.max_value / 4).clamp(-fmt.max_value, fmt.max_value),
        torch.rand(20000, generator=gen) * fmt.min_normal * 2,  # the subnormal range
        mids,
        torch.nextafter(mids, torch.full_like(mids, math.inf)),
        torch.nextafter(mids, torch.full_like(mids, -math.inf)),
    ])
    ref = torch.from_numpy(x.numpy().astype(ML_DTYPES[name]).astype(np.float32))
    ours = round_to_grid(x, fmt)
    assert torch.equal(ours, ref), f"{int((ours != ref).sum())} mismatches"


@pytest.mark.parametrize("name", ALL_SMALL_FLOATS + ["fp8_e4m3fn", "fp8_e5m2", "int2", "int4", "int8", "uint4"])
def test_every_representable_value_maps_to_itself(name):
    grid = parse_format(name).grid()
    assert torch.equal(round_to_grid(grid, name), grid)


@pytest.mark.parametrize("name", ["fp4_e1m2", "fp4_e3m0", "fp5_e1m3", "fp5_e3m1", "fp3_e1m1", "fp4_e2m1"])
def test_rounding_matches_exhaustive_nearest(name):
    """Formats ml_dtypes lacks: compare with brute-force nearest-grid search (ties to the even code)."""
    fmt = parse_format(name)
    grid = fmt.grid().double()
    x = torch.linspace(-1.2 * fmt.max_value, 1.2 * fmt.max_value, 4001).double()
    x = torch.cat([x, grid[1:] / 2 + grid[:-1] / 2])  # every tie point
    d = (x[:, None] - grid[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    # among equally near grid values pick the one with an even mantissa code (= even index in the
    # non-negative half of the grid, since codes increase with magnitude)
    pos = grid.abs()
    mag_rank = torch.tensor([sorted(set(pos.tolist())).index(v) for v in pos.tolist()])
    cand = (d == best)
    choice = torch.where(cand & (mag_rank % 2 == 0)[None, :], 1, 0) + cand.int()
    ref = grid[choice.argmax(dim=1)]
    assert torch.equal(round_to_grid(x.float(), fmt).double(), ref)



@pytest.mark.parametrize("name", ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "fp6_e2m3", "fp8_e4m3fn", "fp8_e5m2",
                                  "fp16_e5m10", "fp12_e8m3", "int4", "uint8", "fp32"])
def test_canonical_names_round_trip(name):
    assert str(parse_format(name)) == name


@pytest.mark.parametrize("bad", ["fp4_e3m1", "e2m1x", "fp0_e0m0", "", "fp4_e0m3", "fp17_e8m8", "int1", "int17",
                                 "fp8_e5m2fn", "fp10_e9m0", "float4", "fp4-e2m1"])
def test_malformed_names_raise_with_grammar(bad):
    with pytest.raises(ValueError, match="Grammar"):
        parse_format(bad)


def test_error_suggests_nearest_names():
    with pytest.raises(ValueError, match="fp5_e3m1"):
        parse_format("fp4_e3m1")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12))
def test_parse_format_fuzz_raises_only_value_error(s):
    try:
        fmt = parse_format(s)
    except ValueError:
        return
    assert isinstance(fmt, (FloatFormat, IntFormat, NoFormat))


def test_derived_quantities():
    f = parse_format("fp4_e2m1")
    assert (f.bits, f.exponent_bias, f.min_normal, f.min_subnormal, f.max_value) == (4, 1, 1.0, 0.5, 6.0)
    i = parse_format("int4")
    assert (i.bits, i.max_value, i.min_value) == (4, 7.0, -7.0)
    assert parse_format("uint4").grid().tolist() == list(range(16))


def test_no_subnormals_grid():
    f = FloatFormat(2, 1, subnormals=False)
    assert f.grid().tolist() == [-6, -4, -3, -2, -1.5, -1, 0, 1, 1.5, 2, 3, 4, 6]
    x = torch.tensor([0.2, 0.6, 0.9, 1.2])
    assert round_to_grid(x, f).tolist() == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", ["fp4_e1m2", "fp4_e2m1", "fp4_e3m0", "fp6_e3m2"])
def test_bias_and_scale_are_one_knob(name):
    """A real-valued exponent bias equals the default grid times a scale (formats.py docstring)."""
    fmt = parse_format(name)
    for alpha in [0.37, 1.0, 5.5, 123.0]:
        beta = bias_for_clip(fmt, alpha)
        s = scale_for_bias(fmt, beta)
        assert math.isclose(fmt.max_value * s, alpha, rel_tol=1e-12)
        # the grid with bias beta, enumerated from the definition, equals grid * s
        E, M = fmt.exp_bits, fmt.man_bits
        vals = sorted({(2.0 ** (1 - beta)) * f / 2 ** M if e == 0 else (2.0 ** (e - beta)) * (1 + f / 2 ** M)
                       for e, f in itertools.product(range(2 ** E), range(2 ** M))})
        assert np.allclose(vals, (fmt.grid()[fmt.grid() >= 0].double() * s).numpy(), rtol=1e-12)
