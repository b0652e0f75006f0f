"""tables: the paper's CSVs as written, recipes per bit setting, statistics over seeds, full-scale discovery."""
import json

import numpy as np
import pandas as pd
import pytest

from hqdit_utils.engine.recipes import get_recipe
from hqdit_utils.chapters.tables import (METHODS, SETTINGS, bit_recipe, full_scale_results, load_paper, mean_std,
                                noise_level, paired_difference, paper_sources)


def test_paper_tables_keep_unknown_cells_and_sources():
    rep = load_paper("hqdit_reported")
    assert "unknown" in set(rep["FID"]) and (rep["source"] != "").all()
    assert "FP + 0.12" in set(rep["sFID"])  # a difference, kept verbatim
    src = paper_sources()
    assert set(rep["source"]) <= set(src.index)
    assert set(load_paper("anchors")["source"]) <= set(src.index)
    with pytest.raises(FileNotFoundError):
        load_paper("no-such-table")


def test_every_method_has_every_bit_setting():
    for method in METHODS:
        for s in SETTINGS:
            r = bit_recipe(method, s)
            w4 = get_recipe(METHODS[method]["w4a4"])
            if METHODS[method][s] is None:  # derived: only bit widths change
                assert r.name == f"{w4.name}-{s}"
                assert (r.rotation, r.gptq, r.smoothquant_alpha, r.format_rule) == \
                       (w4.rotation, w4.gptq, w4.smoothquant_alpha, w4.format_rule)
    assert bit_recipe("SmoothQuant", "w4a8").weight_format == "int4"
    assert bit_recipe("SmoothQuant", "w4a8").act_format == "int8"
    assert bit_recipe("FPQ", "w8a8").weight_candidates == get_recipe("hqdit-w8a8").weight_candidates
    with pytest.raises(KeyError):
        bit_recipe("nope", "w4a4")


def _table():
    rows = []
    for seed, (a, b) in enumerate([(10.0, 12.0), (11.0, 13.5), (12.0, 13.0)]):
        rows += [{"recipe": "fp32", "seed": seed, "FID*": a, "IS*": 5.0 + seed},
                 {"recipe": "q", "seed": seed, "FID*": b, "IS*": 4.0 + seed}]
    rows.append({"recipe": "one-seed", "seed": 0, "FID*": 20.0, "IS*": 1.0})
    return pd.DataFrame(rows)


def test_mean_std_noise_and_paired_difference():
    t = _table()
    mean, std = mean_std(t)
    assert list(mean.index) == ["fp32", "q", "one-seed"]
    assert mean.loc["fp32", "FID*"] == pytest.approx(11.0) and std.loc["fp32", "FID*"] == pytest.approx(1.0)
    assert np.isnan(std.loc["one-seed", "FID*"])
    noise = noise_level(t)
    assert noise["FID*"] == pytest.approx(np.sqrt((1.0 + std.loc["q", "FID*"] ** 2) / 2))
    d = paired_difference(t, "q", "fp32", "FID*")
    assert d["difference"] == pytest.approx(np.mean([2.0, 2.5, 1.0])) and d["seeds"] == 3
    assert d["a better"] is False  # higher FID is worse
    d = paired_difference(t, "fp32", "q", "IS*")
    assert d["a better"] is True and d["stderr"] == 0.0  # IS: higher is better, same +1 on every seed
    assert paired_difference(t, "one-seed", "fp32", "FID*")["a better"] is None


def test_full_scale_results_discovery(tmp_path):
    assert full_scale_results(tmp_path).empty
    assert "FID" in full_scale_results(tmp_path / "missing").columns
    run = tmp_path / "dit-xl2-256-hqdit-w4a4"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({
        "recipe": "hqdit-w4a4", "finished": "2026-01-01T00:00:00Z",
        "metrics": {"FID": 5.0, "sFID": 18.0, "IS": 200.0, "Precision": 0.7, "Recall": 0.6},
        "protocol": {"model": "DiT-XL-2-256", "samples": 10000, "steps": 100, "cfg_scale": 1.5,
                     "reference": "VIRTUAL_imagenet256_labeled.npz", "device": "cuda"}}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "result.json").write_text("{not json")
    df = full_scale_results(tmp_path)
    assert len(df) == 1 and df.loc[0, "FID"] == 5.0 and df.loc[0, "samples"] == 10000


# --------------------------------------------------------------------------------------------------
# chapter 7's rule: paired t-intervals on the primary metric
# --------------------------------------------------------------------------------------------------
from hqdit_utils.chapters.tables import PRIMARY, SECONDARY, claim_verdict, compare, paired_interval, require_same_seeds  # noqa: E402


def _paired(diffs_primary, diffs_fid=None, base=10.0):
    rows = []
    for seed, d in enumerate(diffs_primary):
        f = diffs_fid[seed] if diffs_fid is not None else 0.0
        rows += [{"recipe": "b", "seed": seed, "sFID*": base + 0.1 * seed, "FID*": 5.0 + seed, "IS*": 3.0},
                 {"recipe": "a", "seed": seed, "sFID*": base + 0.1 * seed + d, "FID*": 5.0 + seed + f, "IS*": 3.0}]
    return pd.DataFrame(rows)


def test_paired_interval_uses_t_for_the_actual_degrees_of_freedom():
    from scipy import stats

    diffs = [-0.3, -0.25, -0.2]
    iv = paired_interval(_paired(diffs), "a", "b", "sFID*")
    sd = np.std(diffs, ddof=1)
    assert iv["df"] == 2 and iv["t"] == pytest.approx(4.302653, rel=1e-6)
    assert iv["t"] == pytest.approx(stats.t.ppf(0.975, 2))
    assert iv["low"] == pytest.approx(-0.25 - 4.302653 * sd / np.sqrt(3), rel=1e-6)
    assert iv["high"] == pytest.approx(-0.25 + 4.302653 * sd / np.sqrt(3), rel=1e-6)
    assert iv["direction"] == "a better"  # lower sFID* is better, interval below zero
    # two standard errors would call this one; the t-interval with 2 df (t = 4.30) does not
    wide = paired_interval(_paired([-0.2, -0.4, -0.1]), "a", "b", "sFID*")
    assert abs(wide["difference"]) > 2 * wide["stderr"]
    assert wide["direction"] == "no difference detected"
    assert paired_interval(_paired([-0.3]), "a", "b", "sFID*")["direction"] is None


def test_compare_decides_on_the_primary_metric_only():
    assert PRIMARY == "sFID*" and "FID*" in SECONDARY and "KID*" in SECONDARY
    # primary clearly better, FID* clearly worse: the verdict follows sFID*, FID* is reported as contradicting
    t = _paired([-0.3, -0.25, -0.35, -0.3], diffs_fid=[0.5, 0.6, 0.55, 0.5])
    c = compare(t, "a", "b")
    assert c["outcome"] == "better" and c["agree"] == 0 and c["contradict"] == 1 and c["secondary"] == 2
    assert c["label"].startswith("better on sFID*: -0.3 [") and "0 of 2 secondary metrics agree, 1 contradict" in c["label"]
    assert claim_verdict(t, "a", "b")["verdict"] == "reproduced"
    assert claim_verdict(t, "b", "a")["verdict"] == "not reproduced"
    noisy = _paired([0.3, -0.3, 0.1, -0.1])
    assert claim_verdict(noisy, "a", "b")["verdict"] == "inconclusive"
    assert claim_verdict(_paired([-0.3]), "a", "b")["verdict"] == "cannot be judged"


def test_rows_must_share_their_seeds():
    t = _paired([-0.3, -0.2, -0.1])
    assert require_same_seeds(t) == [0, 1, 2]
    with pytest.raises(ValueError, match="not paired"):
        compare(t[~((t.recipe == "a") & (t.seed == 2))], "a", "b")
    with pytest.raises(ValueError, match="twice"):
        require_same_seeds(pd.concat([t, t.iloc[:1]]))


def test_table_seeds_is_a_profile_setting_with_an_override(monkeypatch):
    from hqdit_utils.config import ENV_TABLE_SEEDS, profile

    monkeypatch.delenv(ENV_TABLE_SEEDS, raising=False)
    assert profile("ci").table_seeds == 2 and profile("book").table_seeds >= 2
    monkeypatch.setenv(ENV_TABLE_SEEDS, "5")
    p = profile("ci")
    assert p.table_seeds == 5
    # the design size is not part of a run's cache key: the overridden profile reuses the same runs
    monkeypatch.delenv(ENV_TABLE_SEEDS)
    assert p.as_dict() == profile("ci").as_dict() and "table_seeds" not in p.as_dict()
    for bad in ("1", "x"):
        monkeypatch.setenv(ENV_TABLE_SEEDS, bad)
        with pytest.raises(ValueError):
            profile("ci")


def test_paper_sources_carry_their_links():
    src = paper_sources()
    assert src.loc["abstract", "link"] == "https://arxiv.org/abs/2405.19751"
    assert src.loc["korean-notes", "link"] == ""  # none recorded: stays empty, never invented
    assert src["what it is"].str.len().min() > 10


def test_compare_frame_one_row_per_pair():
    from hqdit_utils.chapters.tables import compare_frame

    t = _paired([-0.3, -0.25, -0.35, -0.3])
    f = compare_frame(t, [("a", "b"), ("b", "a")], names={"a": "A!"})
    assert list(f["outcome"]) == ["better", "worse"] and f.loc[0, "A"] == "A!"
    assert f.loc[0, "95 % high"] < 0 < f.loc[1, "95 % low"]
