"""significance: Holm, TOST and the minimum detectable effect against scipy on known inputs."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hqdit_utils.chapters.significance import (cross_cpu_check, declared_margins, holm, judge_family, mde, t_test, tost,
                                      verdict_sentence)


def test_holm_on_a_known_p_vector():
    # sorted 0.005, 0.01, 0.03, 0.04 -> ×4, ×3, ×2, ×1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])          # capped at 1
    out = holm([0.01, np.nan, 0.02])                                   # NaN does not count in m
    np.testing.assert_allclose(out[[0, 2]], [0.02, 0.02])
    assert np.isnan(out[1])


def test_t_test_matches_scipy():
    d = np.array([0.3, -0.1, 0.25, 0.4, 0.05])
    assert t_test(d) == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    assert np.isnan(t_test([0.2]))
    assert t_test([0.5, 0.5, 0.5]) == 0.0 and t_test([0.0, 0.0]) == 1.0


def test_tost_matches_two_one_sided_scipy_tests():
    d = np.array([0.02, -0.01, 0.015, 0.0, 0.01])
    m = 0.05
    r = tost(d, m)
    lower = stats.ttest_1samp(d, -m, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, m, alternative="less").pvalue
    assert r["p_lower"] == pytest.approx(lower) and r["p_upper"] == pytest.approx(upper)
    assert r["p"] == pytest.approx(max(lower, upper)) and r["p"] < 0.05  # equivalent within ±0.05
    # same as the 90 % interval inside the margins
    half = stats.t.ppf(0.95, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert -m < d.mean() - half and d.mean() + half < m
    assert tost(d, 0.005)["p"] > 0.05  # not equivalent within a margin smaller than the mean
    with pytest.raises(ValueError, match="positive"):
        tost(d, 0.0)


def test_mde_has_the_stated_power_by_simulation():
    sd, n = 0.02, 5
    e = mde(sd, n)
    rng = np.random.default_rng(0)
    d = rng.normal(e, sd, size=(40000, n))
    p = 2 * stats.t.sf(np.abs(d.mean(1)) / (d.std(1, ddof=1) / np.sqrt(n)), n - 1)
    assert (p < 0.05).mean() == pytest.approx(0.8, abs=0.01)
    # large n: the normal approximation (z_0.975 + z_0.8) · sd / √n
    assert mde(1.0, 400) == pytest.approx((1.959964 + 0.841621) / 20, rel=0.01)
    assert mde(1.0, 5) > mde(1.0, 10) > mde(1.0, 40)
    assert np.isnan(mde(1.0, 1)) and mde(0.0, 5) == 0.0


def test_judge_family_holm_tost_and_verdicts():
    seeds = range(5)
    rng = np.random.default_rng(1)
    base = rng.normal(1.0, 0.05, 5)
    rows = [("ref", base), ("clearly_worse", base + 0.3 + rng.normal(0, 0.01, 5)),
            ("same", base + rng.normal(0, 0.002, 5)), ("noisy", base + rng.normal(0, 0.2, 5))]
    table = pd.DataFrame([{"recipe": r, "seed": s, "sFID*": v[s]} for r, v in rows for s in seeds])
    fam = judge_family(table, [(r, "ref") for r, _ in rows[1:]], {"sFID*": 0.05}).set_index("A")
    assert fam.loc["clearly_worse", "verdict"] == "B better"   # lower is better: A is worse
    assert fam.loc["same", "verdict"] == "equivalent"
    assert fam.loc["noisy", "verdict"] == "inconclusive"
    np.testing.assert_allclose(fam["p_holm"].to_numpy(), holm(fam["p"].to_numpy()))
    assert (fam["p_holm"] >= fam["p"]).all() and fam.loc["noisy", "mde"] > fam.loc["same", "mde"]


def _toy_table():
    from hqdit_utils.chapters.fidelity import FEATURE

    rows = []
    for s in range(4):
        rows += [{"recipe": "fp32", "seed": s, "sFID*": 1.0 + 0.1 * (s % 2), FEATURE: 0.0},
                 {"recipe": "hqdit-w8a8", "seed": s, "sFID*": 1.0, FEATURE: 0.02 + 0.01 * s},
                 {"recipe": "q", "seed": s, "sFID*": 1.5 + 0.01 * s, FEATURE: 0.5}]
    return pd.DataFrame(rows)


def test_declared_margins_come_from_fp32_spread_and_the_8bit_floor():
    from hqdit_utils.chapters.fidelity import FEATURE

    m = declared_margins(_toy_table())
    assert m["sFID*"] == pytest.approx(np.std([1.0, 1.1, 1.0, 1.1], ddof=1))
    assert m[FEATURE] == pytest.approx(0.035)


def test_verdict_sentences_say_what_the_statistics_say():
    t = _toy_table()
    fam = judge_family(t, [("q", "fp32"), ("hqdit-w8a8", "fp32")], {"sFID*": 0.05})
    worse, same = fam.iloc[0], fam.iloc[1]
    assert worse.verdict == "B better" and verdict_sentence(worse, {"q": "Q", "fp32": "FP32"}).startswith(
        "FP32 is better than Q on sFID*")
    assert same.verdict == "inconclusive"
    text = verdict_sentence(same)
    assert "no sFID* difference" in text and f"{same.mde:.3g}" in text and "±0.05" in text


def test_cross_cpu_check_flags_intervals_within_the_measured_shift():
    fam = pd.DataFrame({"A": ["q", "q", "r", "q"], "B": ["fp32", "fp32", "q", "q-alias"], "metric": "sFID*",
                        "verdict": ["A better", "inconclusive", "B better", "equivalent"],
                        "low": [-0.05, -0.02, 0.015, 0.0], "high": [-0.03, 0.01, 0.04, 0.0]})
    c = cross_cpu_check(fam, 0.01)
    assert c["tolerance"].tolist() == [0.01, 0.01, 0.02, 0.0]            # FP32 does not move; nor a row vs itself
    np.testing.assert_allclose(c["clearance"], [0.03, -0.01, 0.015, 0.0])
    assert c["robust"].tolist() == [True, False, False, True]


def test_chapter7_family_is_declared_once():
    from hqdit_utils.chapters.tables import chapter7_family, chapter7_rows

    fam = chapter7_family()
    rows = {r for g in chapter7_rows().values() for r in g}
    assert len(fam) == 24 and not fam.duplicated(["A", "B"]).any()
    assert set(fam["A"]) | set(fam["B"]) <= rows
    assert ("hqdit-w4a4", "fp32") in set(zip(fam["A"], fam["B"]))


def test_tost_without_a_margin_estimate_is_undecided():
    assert np.isnan(tost([0.1, 0.2, 0.15], float("nan"))["p"])
    assert np.isnan(tost([0.1], 0.5)["p"])


def test_the_hard_regime_family_is_declared_once():
    from hqdit_utils.chapters.tables import hard_regime_family, hard_regime_rows
    from hqdit_utils.engine.recipes import RECIPES

    fam, rows = hard_regime_family(), hard_regime_rows()
    assert len(fam) == 11 and not fam.duplicated(["A", "B"]).any()
    assert set(fam["A"]) | set(fam["B"]) <= set(rows) and set(rows) <= set(RECIPES)
    assert {("hqdit-w4a3", "fp32"), ("fp4-minmax-w4a3", "fp32"), ("fp4-rtn-plus-rotation-w4a3", "fp32")} <= \
        set(zip(fam["A"], fam["B"]))
    # the paper's five baselines, each against HQ-DiT
    assert sorted(fam[fam["group"] == "HQ-DiT vs a baseline"]["B"]) == sorted(
        ["int4-rtn-w4a3", "fp4-minmax-w4a3", "smoothquant-int-w4a3", "fpq-w4a3", "gptq-int-w4a3"])


def test_joint_holm_is_holm_over_both_families():
    from hqdit_utils.chapters.significance import joint_holm

    rng = np.random.default_rng(3)
    base = rng.normal(1.0, 0.05, 5)
    table = pd.DataFrame([{"recipe": r, "seed": s, "sFID*": v[s]} for r, v in
                          [("ref", base), ("far", base + 0.5 + rng.normal(0, 0.01, 5)),
                           ("near", base + 0.02 + rng.normal(0, 0.012, 5)), ("same", base)] for s in range(5)])
    f1 = judge_family(table, [("far", "ref")], {"sFID*": 0.05})
    f2 = judge_family(table, [("near", "ref"), ("same", "ref")], {"sFID*": 0.05})
    j1, j2 = joint_holm(f1, f2)
    p_all = np.concatenate([f1["p"], f2["p"]])
    np.testing.assert_allclose(np.concatenate([j1["p_holm"], j2["p_holm"]]), holm(p_all))
    assert (j2["p_holm"].to_numpy() >= f2["p_holm"].to_numpy()).all()  # never more lenient than one family
    assert list(j1["verdict"]) == ["B better"] and len(j2) == 2
