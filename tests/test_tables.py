"""tables: the paper's CSVs as written, recipes per bit setting, statistics over seeds, full-scale discovery."""
import json

import numpy as np
import pandas as pd
import pytest

from hqdit_utils.recipes import get_recipe
from hqdit_utils.tables import (METHODS, SETTINGS, bit_recipe, full_scale_results, load_paper, mean_std,
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


def test_claim_verdict_rule():
    t = _table()
    from hqdit_utils.tables import claim_verdict
    v = claim_verdict(t, "fp32", "q", ["FID*", "IS*"])
    assert v["verdict"] == "reproduced" and "3 paired seeds" in v["evidence"]
    assert claim_verdict(t, "q", "fp32", ["FID*", "IS*"])["verdict"] == "not reproduced"
    # one seed: judged against the noise level
    noise = pd.Series({"FID*": 1.0, "IS*": 1.0})
    assert claim_verdict(t, "fp32", "one-seed", ["FID*"], noise)["verdict"] == "reproduced"  # 10 vs 20
    assert claim_verdict(t, "fp32", "one-seed", ["FID*"], noise * 10)["verdict"] == "not reproduced"  # no win
    assert claim_verdict(t, "fp32", "one-seed", ["FID*", "IS*"], noise)["verdict"] == "reproduced"
    assert claim_verdict(t, "fp32", "one-seed", ["FID*"])["verdict"].startswith("cannot be judged")
