"""The results store's rule: keys hold a declared numerics version, and the golden check catches what it did not
declare (hqdit_utils.numerics, hqdit_utils.runs.golden)."""
import json
from dataclasses import replace

from hqdit_utils.runs import experiments, golden
from hqdit_utils.config import SHIPPED_RUNS_DIR
from hqdit_utils.numerics import NUMERICS_VERSION


def test_shipped_runs_and_golden_outputs_carry_the_declared_numerics_version():
    """A bump of NUMERICS_VERSION without regenerated golden outputs and a refreshed store fails here."""
    stored = json.loads((golden.GOLDEN_DIR / "golden.json").read_text())
    assert stored["numerics"] == NUMERICS_VERSION, "regenerate data/golden with `make golden`"
    assert set(golden.TESTED_RECIPES) <= set(stored["runs"])
    entries = sorted(SHIPPED_RUNS_DIR.glob("*/result.json"))
    assert len(entries) >= 100  # the store ships every row of chapter 7
    stale = [p.parent.name for p in entries if json.loads(p.read_text())["material"].get("numerics") != NUMERICS_VERSION]
    assert not stale, f"{len(stale)} shipped runs have another numerics version (e.g. {stale[0]}): refresh the store"


def test_golden_runs_are_unchanged():
    exact, problems = golden.compare_golden(recipes=golden.TESTED_RECIPES)
    failing = [p for p in problems if not p.startswith("(info)")]
    assert not failing, "an undeclared behaviour change (bump NUMERICS_VERSION if it is meant):\n" + "\n".join(failing)
    if not exact:
        print("not the machine that wrote data/golden: kernel-independent numbers compared within",
              golden.TOLERANCE, *problems, sep="\n")


def test_an_undeclared_behaviour_change_fails_the_check(monkeypatch):
    """The control: another default of the clipping search (a code change that keeps every key) is caught."""
    original = experiments.quantize_

    def changed(model, recipe, calib=None, **kw):
        return original(model, replace(recipe, clip_grid=(50, 0.3, 1.0)), calib, **kw)
    monkeypatch.setattr(experiments, "quantize_", changed)
    _, problems = golden.compare_golden(recipes=["hqdit-w4a4"])
    assert any(p.startswith("hqdit-w4a4:") for p in problems), problems


def test_a_stored_difference_is_reported(tmp_path):
    """The comparison itself can fail: a golden file with one altered number is reported."""
    stored = json.loads((golden.GOLDEN_DIR / "golden.json").read_text())
    stored["runs"]["nvfp4"]["quant"]["weight_sqnr"] += 0.5
    (tmp_path / "golden.json").write_text(json.dumps(stored))
    (tmp_path / "samples.npz").write_bytes((golden.GOLDEN_DIR / "samples.npz").read_bytes())
    _, problems = golden.compare_golden(tmp_path, recipes=["nvfp4"])
    assert any(p.startswith("nvfp4: weight_sqnr") or p.startswith("nvfp4: metrics") for p in problems), problems


def test_a_stale_golden_file_names_the_command(tmp_path):
    stored = json.loads((golden.GOLDEN_DIR / "golden.json").read_text())
    (tmp_path / "golden.json").write_text(json.dumps({**stored, "numerics": NUMERICS_VERSION - 1}))
    exact, problems = golden.compare_golden(tmp_path)
    assert not exact and len(problems) == 1 and "make golden" in problems[0]


def test_every_registered_recipe_has_a_golden_run(monkeypatch):
    from hqdit_utils.engine import recipes

    assert golden.unrecorded_recipes() == []
    # control: a recipe registered without `make golden` is named (and would fail `make check-golden`)
    monkeypatch.setitem(recipes.RECIPES, "added-later", recipes.RECIPES["fp4-minmax"].replace(name="added-later"))
    assert golden.unrecorded_recipes() == ["added-later"]
