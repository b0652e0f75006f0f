"""realism: weight statistics of a model's quantized block linears."""
import torch

from hqdit_utils.layers import DEFAULT_LAYERS, layer_kind, select_linears
from hqdit_utils.models import tiny_dit
from hqdit_utils.realism import matrix_stats, model_realism, summarize_realism, weight_realism


def test_model_realism_covers_the_quantized_block_linears():
    t = tiny_dit(0, width=144, heads=2, num_layers=2).transformer
    stats = model_realism(t)
    assert len(stats) == 2 * 6
    assert {s.kind for s in stats} == {"to_q", "to_k", "to_v", "to_out", "fc1", "fc2"}
    assert [s.name for s in stats] == list(select_linears(t, DEFAULT_LAYERS))
    assert stats == weight_realism(select_linears(t, DEFAULT_LAYERS), layer_kind)
    summary = summarize_realism(stats)
    assert summary["layers"] == 12 and summary["min_attention_sv_ratio"] > 0


def test_random_matrix_sits_at_the_marchenko_pastur_edge():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    s = matrix_stats("w", "fc1", w)
    assert abs(s.sv_ratio - 1.0) < 0.05 and abs(s.kurtosis - 3.0) < 0.1
