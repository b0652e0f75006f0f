"""Real 4-bit storage: encodings, nibble packing, safetensors round trip, sizes; packing a quantized model,
block-format bits, DiT-XL/2 parameter counts."""
import ml_dtypes
import numpy as np
import pytest
import torch

from pathlib import Path

from hqdit_utils.engine.codes import pack_rows, row_grid_values
from hqdit_utils.engine.export import (block_format_bits, decode, dit_parameter_groups, encode, load_packed,
                                memory_scenarios, pack_nibbles, pack_quantized, save_packed, storage_report,
                                unpack_nibbles, unpack_weight)
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
    for name, fmt in [("a", "fp4_e2m1"), ("b", "fp4_e3m0"), ("c", "int4"), ("d", "fp8_e4m3")]:
        w = torch.randn(8, 32)
        scale = max_abs_scale(w, fmt, axis=0)
        wq = fake_quantize(w, fmt, scale)
        layers[name] = pack_rows(*row_grid_values(wq, fmt), fmt)
        assert layers[name].scale.dtype == torch.float32
        torch.testing.assert_close(unpack_weight(layers[name]), wq, rtol=4 * 2 ** -23, atol=0)
    path = save_packed(layers, tmp_path / "packed.safetensors")
    back = load_packed(path)
    for name, p in layers.items():
        assert torch.equal(unpack_weight(back[name]), unpack_weight(p))


#: Written by the code before float32 scales (float16 [out, 1] scales): 4×8 fp4_e2m1 and 3×4 int8.
OLD_FILE = Path(__file__).parent / "data" / "packed_float16_scales.safetensors"


def test_a_file_written_with_float16_scales_still_loads():
    old = load_packed(OLD_FILE)
    assert {n: (p.fmt, p.shape, p.scale.dtype) for n, p in old.items()} == {
        "blocks.0.fc": ("fp4_e2m1", (4, 8), torch.float16), "blocks.0.out": ("int8", (3, 4), torch.float16)}
    w = (torch.arange(32, dtype=torch.float32).reshape(4, 8) - 13.5) / 7
    fc = fake_quantize(w, "fp4_e2m1", torch.tensor([[0.25], [0.5], [0.125], [1.0]]))
    out = fake_quantize(torch.arange(12, dtype=torch.float32).reshape(3, 4) - 5, "int8",
                        torch.tensor([[0.5], [0.25], [2.0]]))
    assert torch.equal(unpack_weight(old["blocks.0.fc"]), fc) and torch.equal(unpack_weight(old["blocks.0.out"]), out)
    # repacked by today's route (float32 scales; a row may take another valid scale): the same weight
    again = pack_rows(*row_grid_values(fc, "fp4_e2m1"), "fp4_e2m1")
    assert again.scale.dtype == torch.float32 and torch.equal(unpack_weight(again), fc)


def test_packed_size_is_about_an_eighth_of_fp32():
    w = torch.randn(256, 1152)
    wq = fake_quantize(w, "fp4_e2m1", max_abs_scale(w, "fp4_e2m1", axis=0))
    report = storage_report({"l": pack_rows(*row_grid_values(wq, "fp4_e2m1"), "fp4_e2m1")})
    assert report.loc["total", "packed bytes"] == 256 * 1152 // 2 + 4 * 256  # codes + one float32 per row
    ratio = report.loc["total", "packed / fp32"]
    assert 0.125 <= ratio <= 1 / 7


def test_not_a_packed_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a packed-weights file"):
        load_packed(tmp_path / "plain.safetensors")


# ---- what a quantized DiT weighs (was test_storage.py) ----
@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e3m0", "fp4_e1m2", "int4", "fp8_e4m3", "int8"])
def test_row_grid_values(fmt):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=gen)
    s = torch.rand(6, 1, generator=gen) + 0.1
    wq = fake_quantize(w, fmt, s)
    values, rec = row_grid_values(wq, fmt)
    # any valid scale puts every row on the grid (it need not be s: a row may fit several scales); the values
    # are grid points and their product with the recovered scale is the weight to 4 float32 ulps
    assert torch.equal(round_to_grid(values, fmt), values) and rec.shape == (6,)
    torch.testing.assert_close(values * rec[:, None], wq, rtol=4 * 2 ** -23, atol=0)
    with pytest.raises(ValueError, match="row 0 is not"):
        row_grid_values(torch.tensor([[1.0, 0.123456, 0.777]]), fmt)


def test_pack_quantized_roundtrip(tmp_path):
    b = tiny_dit(seed=0)
    # a weight-only recipe needs no calibration: per-channel max-abs FP4 weights
    quantize_(b.transformer, get_recipe("fp4-minmax").replace(name="w-only", act_format="fp32"))
    layers, report = pack_quantized(b.transformer)
    n_q = sum(isinstance(m, QuantLinear) for m in b.transformer.modules())
    assert len(layers) == n_q == len(report) > 0
    assert (report["max rel. change"] <= 4 * 2 ** -23).all()  # float32 scales: a few ulps at most
    back = load_packed(save_packed(layers, tmp_path / "p.safetensors"))
    for name, p in layers.items():
        w = b.transformer.get_submodule(name).weight
        torch.testing.assert_close(unpack_weight(back[name]), w, rtol=4 * 2 ** -23, atol=0)
        assert p.nbytes == w.numel() // 2 + 4 * w.shape[0]


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
    # one route: the export of an integer-path model is the file save_quantized(packed=True) writes, and the
    # float weight's decomposition gives the integer path's codes and scales
    from hqdit_utils.engine import lowbit

    coded = lowbit.packed_weights(b.transformer)
    assert set(coded) == set(first)
    for name, p in first.items():
        layer = b.transformer.get_submodule(name)
        assert torch.equal(coded[name].codes, p.codes) and torch.equal(coded[name].scale, p.scale), name
        values, scale = row_grid_values(layer.weight, layer.weight_format)
        assert torch.equal(pack_rows(values, scale, p.fmt).scale, p.scale), name
    save_quantized(b.transformer, tmp_path / "q", packed=True)
    reloaded = load_quantized(fresh, tmp_path / "q")
    assert all(m.weight is None for m in reloaded.modules() if isinstance(m, QuantLinear))
    again, report = pack_quantized(reloaded)
    assert set(again) == set(first) and len(report) == len(first)
    for name, p in first.items():
        assert torch.equal(again[name].codes, p.codes) and torch.equal(again[name].scale, p.scale), name
