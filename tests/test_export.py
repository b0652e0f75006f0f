"""Real 4-bit storage: encodings, nibble packing, safetensors round trip, sizes; packing a quantized model,
block-format bits, DiT-XL/2 parameter counts."""
import ml_dtypes
import numpy as np
import pytest
import torch

from hqdit_utils.engine.export import (block_format_bits, decode, dit_parameter_groups, encode, load_packed,
                                memory_scenarios, pack_nibbles, pack_quantized, pack_weight, recover_row_scales,
                                save_packed, storage_report, unpack_nibbles, unpack_weight)
from hqdit_utils.engine.formats import parse_format
from hqdit_utils.dit.models import tiny_dit
from hqdit_utils.engine.qlinear import QuantLinear
from hqdit_utils.engine.qmodel import quantize_
from hqdit_utils.engine.quantizer import fake_quantize, max_abs_scale, round_to_grid
from hqdit_utils.engine.recipes import get_recipe


@pytest.mark.parametrize("name", ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "int4", "fp6_e3m2", "fp8_e4m3", "int8"])
def test_encode_decode_every_grid_value(name):
    grid = parse_format(name).grid()
    assert torch.equal(decode(encode(grid, name), name), grid)


def test_fp4_e2m1_codes_are_the_ocp_bit_patterns():
    grid = parse_format("fp4_e2m1").grid()
    ref = grid.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    assert encode(grid, "fp4_e2m1").tolist() == ref.tolist()


def test_off_grid_values_are_refused():
    with pytest.raises(ValueError, match="not on the"):
        encode(torch.tensor([0.7]), "fp4_e2m1")
    with pytest.raises(ValueError, match="not on the"):
        encode(torch.tensor([8.0]), "int4")


def test_nibble_round_trip_and_odd_length():
    codes = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(codes[:, :3])


def test_pack_save_load_round_trips_bit_exactly(tmp_path):
    torch.manual_seed(0)
    layers = {}
    for name, fmt in [("a", "fp4_e2m1"), ("b", "fp4_e3m0"), ("c", "int4")]:
        w = torch.randn(8, 32)
        scale = max_abs_scale(w, fmt, axis=0).half().float()  # scales stored in float16
        wq = fake_quantize(w, fmt, scale)
        layers[name] = pack_weight(wq, scale, fmt)
        assert torch.equal(unpack_weight(layers[name]), wq)
    path = save_packed(layers, tmp_path / "packed.safetensors")
    back = load_packed(path)
    for name, p in layers.items():
        assert torch.equal(unpack_weight(back[name]), unpack_weight(p))


def test_packed_size_is_about_an_eighth_of_fp32():
    w = torch.randn(256, 1152)
    scale = max_abs_scale(w, "fp4_e2m1", axis=0).half().float()
    report = storage_report({"l": pack_weight(fake_quantize(w, "fp4_e2m1", scale), scale, "fp4_e2m1")})
    ratio = report.loc["total", "packed / fp32"]
    assert 0.125 <= ratio <= 1 / 7


def test_not_a_packed_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a packed-weights file"):
        load_packed(tmp_path / "plain.safetensors")


# ---- what a quantized DiT weighs (was test_storage.py) ----
@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e3m0", "fp4_e1m2", "int4"])
def test_recover_row_scales(fmt):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=gen)
    s = torch.rand(6, 1, generator=gen) + 0.1
    wq = fake_quantize(w, fmt, s)
    rec = recover_row_scales(wq, fmt)
    # any valid scale puts every row on the grid (it need not be s: a row may fit several scales), and the
    # recovered one may be off in the last float32 bit, so compare values to float rounding
    torch.testing.assert_close(round_to_grid(wq / rec, fmt) * rec, wq, rtol=1e-6, atol=0)
    with pytest.raises(ValueError):
        recover_row_scales(torch.tensor([[1.0, 0.123456, 0.777]]), fmt)


def test_pack_quantized_roundtrip(tmp_path):
    b = tiny_dit(seed=0)
    # a weight-only recipe needs no calibration: per-channel max-abs FP4 weights
    quantize_(b.transformer, get_recipe("fp4-minmax").replace(name="w-only", act_format="fp32"))
    layers, report = pack_quantized(b.transformer)
    n_q = sum(isinstance(m, QuantLinear) for m in b.transformer.modules())
    assert len(layers) == n_q == len(report) > 0
    assert (report["max rel. change"] < 2 ** -10).all()  # float16 scale rounding only
    back = load_packed(save_packed(layers, tmp_path / "p.safetensors"))
    for name, p in layers.items():
        w = b.transformer.get_submodule(name).weight
        assert torch.allclose(unpack_weight(back[name]), w, rtol=2 ** -10, atol=0)
        assert p.nbytes == w.numel() // 2 + 2 * w.shape[0]


def test_block_bits_and_dit_counts():
    assert block_format_bits(4, 32, 8) == 4.25 and block_format_bits(4, 16, 8) == 4.5
    g = dit_parameter_groups()
    assert 674e6 < g.sum() < 676e6  # DiT-XL/2: 675 M parameters (DiT paper)
    assert g["adaLN modulation linears"] == 28 * (1152 * 6912 + 6912)
    m = memory_scenarios(g)
    assert (m["reduction vs FP32"] > 1).all()
    assert m["reduction vs FP32"].max() < 8.0  # 4-bit + scales can never reach 8x


def test_pack_quantized_of_a_reloaded_packed_model(tmp_path):
    """A model reloaded from packed 4-bit codes holds no float weight; packing it again gives the same codes."""
    import copy

    from hqdit_utils.engine.qmodel import load_quantized, save_quantized

    b = tiny_dit(seed=0)
    fresh = copy.deepcopy(b.transformer)
    quantize_(b.transformer, get_recipe("fp4-minmax").replace(name="w-only", act_format="fp4_e2m1", act_granularity="token"))
    first, _ = pack_quantized(b.transformer)
    save_quantized(b.transformer, tmp_path / "q", packed=True)
    reloaded = load_quantized(fresh, tmp_path / "q")
    assert all(m.weight is None for m in reloaded.modules() if isinstance(m, QuantLinear))
    again, report = pack_quantized(reloaded)
    assert set(again) == set(first) and len(report) == len(first)
    for name, p in first.items():
        assert torch.equal(again[name].codes, p.codes) and torch.equal(again[name].scale, p.scale), name
