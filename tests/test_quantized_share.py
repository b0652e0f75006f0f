"""analysis.quantized_share: the share of weights and multiply-adds that a recipe puts in 4 bits, counted."""
import pytest

from hqdit_utils.chapters.analysis import ATTENTION_MATMULS, quantized_share
from hqdit_utils.dit.models import dit_xl2_meta, tiny_dit
from hqdit_utils.engine.export import dit_parameter_groups


def test_tiny_dit_counts_by_hand():
    t = tiny_dit(0, width=72, heads=1, num_layers=2, sample_size=8, patch_size=2).transformer
    d = quantized_share(t, "hqdit-w4a4")
    tokens, w, blocks = 16, 72, 2
    block_lin = blocks * (4 * w * w + 2 * w * 4 * w)          # q, k, v, out + fc1, fc2 weights
    assert d.attrs["tokens"] == tokens
    assert d.loc["total", "quantized parameters"] == block_lin
    assert d.loc["total", "quantized MACs"] == tokens * block_lin
    assert d.loc["adaLN modulation linears", "quantized parameters"] == 0
    assert d.loc[ATTENTION_MATMULS, "MACs"] == blocks * 2 * tokens * tokens * w
    assert d.loc[ATTENTION_MATMULS, "quantized MACs"] == 0
    assert d.loc["total", "parameters"] == sum(p.numel() for n, p in t.named_parameters()
                                               if ".norm1.emb" not in n or n.startswith("transformer_blocks.0."))
    assert 0 < d.attrs["weight share"] < 1 and 0 < d.attrs["MAC share"] < 1
    assert quantized_share(t, "fp32").attrs["weight share"] == 0
    allfc = quantized_share(t, "hqdit-w4a4-all-fc")
    assert allfc.loc["adaLN modulation linears", "quantized parameters"] == blocks * w * 6 * w
    assert allfc.attrs["weight share"] > d.attrs["weight share"]
    attn = quantized_share(t, "hqdit-w4a4-attn")
    assert attn.loc[ATTENTION_MATMULS, "quantized MACs"] == d.loc[ATTENTION_MATMULS, "MACs"]


def test_dit_xl2_matches_the_architecture_count():
    d = quantized_share(dit_xl2_meta(), "hqdit-w4a4")
    g = dit_parameter_groups()
    assert d.attrs["tokens"] == 256
    assert d.loc["total", "parameters"] == g.sum()
    assert d.loc["adaLN modulation linears", "parameters"] == g["adaLN modulation linears"]
    # the four block linears' weights (biases stay FP32): 28 · (3·1152² + 1152² + 2·1152·4608)
    assert d.loc["total", "quantized parameters"] == 28 * (4 * 1152 ** 2 + 2 * 1152 * 4608)
    assert d.attrs["weight share"] == pytest.approx(0.661, abs=1e-3)


def test_scope_text_quotes_the_counted_shares():
    from hqdit_utils.chapters.analysis import w4a4_scope

    t = tiny_dit(0, width=72, heads=1, num_layers=2).transformer
    text = w4a4_scope(t)
    d = quantized_share(t, "hqdit-w4a4")
    assert f"{d.attrs['weight share']:.0%} of the parameters" in text and "66% of the parameters" in text
