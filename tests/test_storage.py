"""storage: packing a quantized model for real, block-format bits, DiT-XL/2 parameter counts."""
import pytest
import torch

from hqdit_utils.export import load_packed, save_packed, unpack_weight
from hqdit_utils.qmodel import QuantLinear, quantize_
from hqdit_utils.quantizer import fake_quantize, round_to_grid
from hqdit_utils.storage import (block_format_bits, dit_parameter_groups, memory_scenarios, pack_quantized,
                                 recover_row_scales)
from hqdit_utils.models import tiny_dit
from hqdit_utils.recipes import get_recipe


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
