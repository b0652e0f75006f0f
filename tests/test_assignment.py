"""The end-of-book assignment's automatic checks: each way a submission can be wrong is caught."""
import math

import pandas as pd
import pytest

from hqdit_utils.chapters.exercises import WrongAnswer, check_assignment
from hqdit_utils.engine.recipes import INGREDIENT_FIELDS, QuantRecipe, changed_ingredients, get_recipe

BASE = "hqdit-w4a4"
ONE = get_recipe(BASE).replace(rotation_block=16, name="hqdit-w4a4-rb16")  # rotation only


def _table(rows: dict[str, list[float]], metric="sFID*"):
    return pd.DataFrame([{"recipe": r, "seed": s, metric: v} for r, vals in rows.items() for s, v in enumerate(vals)])


def test_ingredient_groups_name_real_fields_and_do_not_overlap():
    names = {f for f in QuantRecipe.__dataclass_fields__}
    grouped = [f for fields in INGREDIENT_FIELDS.values() for f in fields]
    assert set(grouped) <= names and len(grouped) == len(set(grouped))


def test_changed_ingredients():
    assert changed_ingredients(BASE, BASE) == {}
    assert changed_ingredients(BASE, ONE) == {"rotation": ["rotation_block"]}
    two = get_recipe(BASE).replace(gptq=False, act_clip="none", name="x")
    assert set(changed_ingredients(BASE, two)) == {"weight rounding", "clipping"}
    assert "other" in changed_ingredients(BASE, get_recipe(BASE).replace(max_calib_rows=10, name="y"))


def test_a_correct_submission_returns_the_paired_interval():
    t = _table({BASE: [1.0, 1.2, 1.1], ONE.name: [1.5, 1.8, 1.6]})
    out = check_assignment(t, BASE, ONE)
    assert out["ingredient"] == "rotation" and out["seeds"] == 3
    assert math.isclose(out["difference"], (0.5 + 0.6 + 0.5) / 3)
    assert out["direction"] == "b better"  # sFID*: lower is better, the baseline (b) wins


@pytest.mark.parametrize("changed, table, message", [
    (get_recipe(BASE).replace(gptq=False, act_clip="none", name="x2"),
     {BASE: [1, 2, 3], "x2": [1, 2, 3]}, "2 ingredients"),
    (get_recipe(BASE).replace(max_calib_rows=10, name="x3"), {BASE: [1, 2, 3], "x3": [1, 2, 3]}, "no ingredient"),
    (get_recipe(BASE).replace(name="x4"), {BASE: [1, 2, 3], "x4": [1, 2, 3]}, "0 ingredients"),
    (ONE, {BASE: [1, 2, 3]}, "no runs"),
    (ONE, {BASE: [1, 2, 3], ONE.name: [1, 2]}, "different seeds"),
    (ONE, {BASE: [1, 2], ONE.name: [1, 2]}, "at least 3"),
    (ONE, {BASE: [1, 2, 3], ONE.name: [1, float("nan"), 3]}, "not finite"),
])
def test_each_wrong_submission_is_refused(changed, table, message):
    with pytest.raises(WrongAnswer, match=message):
        check_assignment(_table(table), BASE, changed)
