"""Tests of per-layer format selection, the ratio statistics and rule, and FormatPlan JSON."""
import math

import pytest
import torch

from hqdit_utils.engine.stats import TensorStats
from hqdit_utils.engine.format_select import (DEFAULT_CANDIDATES, FormatPlan, LayerFormat, fit_thresholds, order_by_range,
                                       ratio_rule, ratio_statistics, ratio_statistics_from_stats, select_format)
from hqdit_utils.engine.clipping import clip_activation, clip_weight

G = torch.Generator().manual_seed(0)
DATA = {
    "gauss": torch.randn(32, 64, generator=G),
    "uniform": torch.rand(32, 64, generator=G) * 2 - 1,
    # seeded (the global RNG made this tensor, and the 1/8-octave test below, depend on test order)
    "laplace": torch.distributions.Laplace(0.0, 1.0).icdf(
        torch.rand(32, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64).clamp(1e-6, 1 - 1e-6)).float(),
    "loguniform": torch.sign(torch.randn(32, 64, generator=G)) * 2.0 ** (-8 * torch.rand(32, 64, generator=G)),
    "pow2": torch.sign(torch.randn(32, 64, generator=G)) * 2.0 ** -torch.randint(0, 7, (32, 64), generator=G).float(),
}


@pytest.mark.parametrize("kind", ["weight", "activation"])
@pytest.mark.parametrize("name", list(DATA))
def test_selected_format_never_worse_than_any_fixed_candidate(kind, name):
    t = DATA[name]
    choice = select_format(t, DEFAULT_CANDIDATES, kind=kind)
    for fmt in DEFAULT_CANDIDATES:
        r = clip_weight(t, fmt) if kind == "weight" else clip_activation(t, fmt)
        assert choice.mse[choice.format] <= r.mse * (1 + 1e-9)
    assert choice.format == min(choice.mse, key=choice.mse.get)


def test_selection_follows_the_distribution():
    assert select_format(DATA["uniform"], kind="activation").format == "fp4_e1m2"   # uniform grid for uniform data
    assert select_format(DATA["pow2"], kind="activation").format == "fp4_e3m0"  # powers of two: exact in E3M0
    assert select_format(DATA["pow2"], kind="activation").mse["fp4_e3m0"] == 0.0


def test_ratio_statistics_known_values():
    t = torch.tensor([[1.0, -2.0], [4.0, 8.0]])
    s = ratio_statistics(t, channel_axis=0)
    assert s["max_min_ratio"] == 8.0
    assert s["channel_max_ratio"] == 4.0  # row maxima 2 and 8
    assert s["max_rms_ratio"] == pytest.approx(8 / math.sqrt((1 + 4 + 16 + 64) / 4))
    assert s["max_mean_ratio"] == pytest.approx(8 / 3.75)
    assert ratio_statistics(t, channel_axis=1)["channel_max_ratio"] == 2.0  # column maxima 4 and 8
    assert math.isnan(ratio_statistics(torch.zeros(3, 3))["max_min_ratio"])


def test_ratio_statistics_from_running_stats_match_direct():
    x = DATA["laplace"]
    st = TensorStats(64, 0, torch.ones(64, dtype=torch.int64))
    st.update(x)
    a, b = ratio_statistics(x, channel_axis=1), ratio_statistics_from_stats(st)
    assert b["channel_max_ratio"] == pytest.approx(a["channel_max_ratio"], rel=1e-6)
    assert b["max_rms_ratio"] == pytest.approx(a["max_rms_ratio"], rel=1e-6)
    assert abs(math.log2(b["max_min_ratio"] / a["max_min_ratio"])) <= 1 / 8 + 1e-9
    assert b["max_mean_ratio"] == pytest.approx(a["max_mean_ratio"], rel=0.05)


def test_ratio_rule_and_threshold_fit():
    assert order_by_range(["fp4_e3m0", "fp4_e1m2", "fp4_e2m1"]) == ["fp4_e1m2", "fp4_e2m1", "fp4_e3m0"]
    assert ratio_rule(1.0, (2, 5)) == "fp4_e1m2"
    assert ratio_rule(3.0, (2, 5)) == "fp4_e2m1"
    assert ratio_rule(9.0, (2, 5)) == "fp4_e3m0"
    with pytest.raises(ValueError):
        ratio_rule(1.0, (2,))
    values = [1, 2, 3, 10, 11, 12, 50, 60]
    choices = ["fp4_e1m2"] * 3 + ["fp4_e2m1"] * 3 + ["fp4_e3m0"] * 2
    th, acc = fit_thresholds(values, choices)
    assert acc == 1.0 and 3 < th[0] < 10 and 12 < th[1] < 50
    _, acc2 = fit_thresholds(values, choices[::-1])
    assert acc2 < 1.0


def test_plan_json_round_trip_and_summaries(tmp_path):
    plan = FormatPlan(meta={"recipe": "x"})
    plan.layers["a"] = LayerFormat("fp4_e2m1", "fp4_e3m0", {"fp4_e2m1": 0.1, "fp4_e1m2": 0.2},
                                   {"fp4_e3m0": 0.3}, {"channel_max_ratio": 3.0, "kurtosis": float("nan")},
                                   {"channel_max_ratio": 20.0}, 0.8, 0.7)
    plan.layers["b"] = LayerFormat("fp4_e1m2", "fp4_e2m1", weight_stats={"channel_max_ratio": 1.5},
                                   act_stats={"channel_max_ratio": 2.0})

    plan.save(tmp_path / "plan.json")
    back = FormatPlan.load(tmp_path / "plan.json")
    assert back.layers["a"].weight_mse == plan.layers["a"].weight_mse
    assert math.isnan(back.layers["a"].weight_stats["kurtosis"])
    assert back.histogram("weight") == {"fp4_e2m1": 1, "fp4_e1m2": 1}
    assert back.histogram("act") == {"fp4_e3m0": 1, "fp4_e2m1": 1}
    assert back.agreement("weight", "channel_max_ratio", (2.0, 10.0)) == 1.0
    assert back.agreement("act", "channel_max_ratio", (2.0, 10.0)) == 1.0
    assert back.agreement("act", "channel_max_ratio", (3.0, 10.0)) == 0.5
    th, acc = back.fit("act", "channel_max_ratio")
    assert acc == 1.0
    df = back.to_pandas()
    assert list(df["layer"]) == ["a", "b"] and "w_mse[fp4_e2m1]" in df.columns


def test_choose_format_rules():
    """The one format choice: MSE (searches every candidate), output (lowest loss), ratio (no search)."""
    from hqdit_utils.engine.format_select import DEFAULT_THRESHOLDS, choose_format

    x = DATA["pow2"]
    calls = []

    def clip(name):
        calls.append(name)
        return clip_activation(x, name, granularity="tensor", method="mse")
    by_mse = choose_format(DEFAULT_CANDIDATES, clip)
    assert by_mse.format == "fp4_e3m0" and calls == list(DEFAULT_CANDIDATES) and by_mse.clip is by_mse.clips["fp4_e3m0"]
    assert choose_format(DEFAULT_CANDIDATES, clip, rule="output").format == "fp4_e3m0"
    calls.clear()
    stats = ratio_statistics(x, channel_axis=1)
    by_ratio = choose_format(DEFAULT_CANDIDATES, clip, rule="ratio", stats=stats, statistic="kurtosis")
    assert calls == [] and by_ratio.clip is None and by_ratio.mse == {}
    assert by_ratio.format == ratio_rule(stats["kurtosis"], DEFAULT_THRESHOLDS["kurtosis"], DEFAULT_CANDIDATES)
    with pytest.raises(ValueError, match="rule must be"):
        choose_format(DEFAULT_CANDIDATES, clip, rule="best")
    with pytest.raises(ValueError, match="needs the tensor's statistics"):
        choose_format(DEFAULT_CANDIDATES, clip, rule="ratio")
