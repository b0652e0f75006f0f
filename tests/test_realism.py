"""realism: random matrices look random, trained-looking ones do not, and the shipped model is trained."""
import pytest
import torch

from hqdit_utils.engine.layers import DEFAULT_LAYERS, layer_kind, select_linears
from hqdit_utils.dit.models import load_dit, tiny_dit
from hqdit_utils.runs.realism import (MIN_ATTENTION_SV_RATIO, MIN_MEDIAN_KURTOSIS, MIN_MEDIAN_SV_RATIO,
                                 matrix_stats, model_realism, summarize_realism, weight_realism)


def test_random_matrices_sit_at_the_marchenko_pastur_edge():
    g = torch.Generator().manual_seed(0)
    uni = matrix_stats("u", "fc1", torch.empty(576, 144).uniform_(-1, 1, generator=g))
    gau = matrix_stats("g", "fc1", torch.randn(576, 144, generator=g))
    assert 0.9 < uni.sv_ratio < 1.1 and 0.9 < gau.sv_ratio < 1.1
    assert abs(uni.kurtosis - 1.8) < 0.05 and abs(gau.kurtosis - 3.0) < 0.1
    assert uni.row_spread < 1.3 and gau.col_spread < 1.3


def test_low_rank_structure_and_tails_are_detected():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(144, 144, generator=g)
    spike = 3.0 * torch.outer(torch.randn(144, generator=g), torch.randn(144, generator=g)) / 12
    s = matrix_stats("w", "to_q", noise + spike)
    assert s.sv_ratio > 1.5
    heavy = torch.distributions.StudentT(3.0).sample((144, 144))
    assert matrix_stats("t", "fc2", heavy).kurtosis > 4.0
    with pytest.raises(ValueError, match="2-D"):
        matrix_stats("v", "fc2", torch.ones(3))


def test_summary_thresholds_can_fail():
    g = torch.Generator().manual_seed(2)
    rand = [matrix_stats(f"l{i}", k, torch.empty(144, 144).uniform_(-1, 1, generator=g))
            for i, k in enumerate(["to_q", "to_k", "to_v", "to_out", "fc1", "fc2"])]
    summ = summarize_realism(rand)
    assert summ["layers"] == 6 and not summ["meets_thresholds"]


def test_shipped_embedded_model_is_trained_not_random():
    stats = model_realism(load_dit("embedded").transformer)
    assert len(stats) == 36
    summ = summarize_realism(stats)
    assert summ["median_sv_ratio"] >= MIN_MEDIAN_SV_RATIO, summ
    assert summ["min_attention_sv_ratio"] >= MIN_ATTENTION_SV_RATIO, summ
    assert summ["median_kurtosis"] >= MIN_MEDIAN_KURTOSIS, summ


def test_model_realism_covers_the_quantized_block_linears():
    t = tiny_dit(0, width=144, heads=2, num_layers=2).transformer
    stats = model_realism(t)
    assert len(stats) == 2 * 6
    assert {s.kind for s in stats} == {"to_q", "to_k", "to_v", "to_out", "fc1", "fc2"}
    assert [s.name for s in stats] == list(select_linears(t, DEFAULT_LAYERS))
    assert stats == weight_realism(select_linears(t, DEFAULT_LAYERS), layer_kind)
    summary = summarize_realism(stats)
    assert summary["layers"] == 12 and summary["min_attention_sv_ratio"] > 0
