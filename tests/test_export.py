"""Real 4-bit storage: encodings, nibble packing, safetensors round trip, sizes."""
import ml_dtypes
import numpy as np
import pytest
import torch

from hqdit_utils.export import (decode, encode, load_packed, pack_nibbles, pack_weight, save_packed,
                                storage_report, unpack_nibbles, unpack_weight)
from hqdit_utils.formats import parse_format
from hqdit_utils.quantizer import fake_quantize, max_abs_scale


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
