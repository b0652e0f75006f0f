"""Tests of QuantRecipe and the named recipes (and the quantize CLI's parser)."""
import argparse
import dataclasses

import pytest
import torch

from hqdit_utils.engine.layers import ALL_FC_LAYERS, DEFAULT_LAYERS
from hqdit_utils.engine.formats import parse_format
from hqdit_utils.engine.recipes import AUTO, RECIPES, QuantRecipe, get_recipe, list_recipes, register_recipe


PART1 = ["fp32", "int8", "int4-rtn", "int4w-a8", "fp4-minmax", "fp4-clip", "fp4-hybrid"]
PART2 = ["hqdit-w4a4", "hqdit-w4a8", "hqdit-w8a8", "hqdit-no-rotation", "hqdit-no-select", "hqdit-no-clip",
         "hqdit-no-gptq", "smoothquant-int", "fpq", "gptq-int", "mxfp4", "nvfp4", "hqdit-w4a4-all-fc"]


def test_all_named_recipes_exist_and_are_valid():
    names = list_recipes()
    for n in PART1 + PART2:
        assert n in names
    for fam in ("fp4-minmax", "fp4-clip", "fp4-hybrid"):
        for s in ("w4a4", "w4a8", "w8a8"):
            assert f"{fam}-{s}" in names
    for r in RECIPES.values():  # every concrete format name parses
        for f in (r.weight_format, r.act_format, *r.weight_candidates, *r.act_candidates, r.attn_format):
            if f != AUTO:
                parse_format(f)
        assert r.description


def test_get_recipe_unknown_name_lists_names():
    with pytest.raises(KeyError) as e:
        get_recipe("fp4-hybird")
    msg = str(e.value)
    assert "fp4-hybrid" in msg and "Known recipes" in msg and "int4-rtn" in msg
    r = get_recipe("fp4-clip")
    assert get_recipe(r) is r


def test_recipes_are_frozen_and_validated():
    r = get_recipe("fp4-minmax")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.act_format = "int4"
    with pytest.raises(ValueError, match="act_granularity"):
        QuantRecipe("bad", act_granularity="channel")
    with pytest.raises(ValueError, match="weight_clip"):
        QuantRecipe("bad", weight_clip="kl")
    with pytest.raises(ValueError, match="block_size"):
        QuantRecipe("bad", weight_granularity="block")
    with pytest.raises(ValueError, match="tuples"):
        QuantRecipe("bad", layers="*.to_q")
    with pytest.raises(ValueError, match="exists"):
        register_recipe(r)


def test_recipe_contents_match_their_definitions():
    mm = get_recipe("fp4-minmax")
    assert (mm.weight_format, mm.act_format, mm.weight_granularity, mm.act_granularity, mm.weight_clip,
            mm.act_clip) == ("fp4_e2m1", "fp4_e2m1", "channel", "tensor", "none", "none")
    assert get_recipe("fp4-clip").weight_clip == "mse" and get_recipe("fp4-clip").act_clip == "mse"
    hy = get_recipe("fp4-hybrid")
    assert hy.weight_format == AUTO and set(hy.weight_candidates) == {"fp4_e1m2", "fp4_e2m1", "fp4_e3m0"}
    assert get_recipe("fp4-hybrid-w4a8").act_candidates == ("fp8_e2m5", "fp8_e3m4", "fp8_e4m3")
    assert get_recipe("fp4-minmax-w4a8").act_format == "fp8_e4m3"
    assert get_recipe("int4w-a8").weight_format == "int4" and get_recipe("int4w-a8").act_format == "int8"
    h = get_recipe("hqdit-w4a4")
    assert h.rotation and h.gptq and h.weight_format == AUTO and h.weight_clip == "mse"
    assert not get_recipe("hqdit-no-rotation").rotation and not get_recipe("hqdit-no-gptq").gptq
    assert get_recipe("hqdit-no-select").weight_format == "fp4_e2m1"
    assert get_recipe("hqdit-no-clip").act_clip == "none"
    assert get_recipe("smoothquant-int").smoothquant_alpha == 0.5
    assert get_recipe("mxfp4").block_size == 32 and get_recipe("nvfp4").scale_format == "fp8_e4m3fn"
    assert tuple(get_recipe("fp4-hybrid").layers) == DEFAULT_LAYERS
    assert tuple(get_recipe("hqdit-w4a4-all-fc").layers) == ALL_FC_LAYERS
    assert get_recipe("fp32").is_identity and not get_recipe("fp32").needs_calibration
    assert get_recipe("int4-rtn").needs_calibration  # static activation ranges
    assert not get_recipe("mxfp4").needs_calibration


def test_quantize_cli_parser(capsys):
    from hqdit_utils.commands import quantize_cli
    from hqdit_utils.commands.cli_common import run_command

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    quantize_cli.add_parser(sub)
    args = parser.parse_args(["quantize", "--recipe", "fp4-hybrid", "--out", "x", "--model", "embedded"])
    assert args.recipe == "fp4-hybrid" and args.model == "embedded" and args.func is quantize_cli._cmd
    assert quantize_cli._cmd(parser.parse_args(["quantize", "--list"])) == 0
    assert "fp4-hybrid" in capsys.readouterr().out
    args = parser.parse_args(["quantize", "--recipe", "nope", "--out", "x"])
    assert run_command("hqdit quantize", args.func, args) == 2
    assert "Known recipes" in capsys.readouterr().err


def test_quantize_cli_end_to_end(tmp_path):
    import json

    from hqdit_utils.commands import quantize_cli
    from hqdit_utils.dit.models import load_dit, tiny_dit
    from hqdit_utils.engine.qlinear import QuantLinear
    from hqdit_utils.engine.qmodel import load_quantized

    b = tiny_dit(0, width=72, heads=1, num_layers=1)
    b.transformer.save_pretrained(tmp_path / "m" / "transformer")
    b.scheduler.save_pretrained(tmp_path / "m" / "scheduler")
    info = quantize_cli.run("fp4-minmax", tmp_path / "q", model=str(tmp_path / "m"), trajectories=1, timesteps=2,
                            steps=2, rows_per_timestep=8)
    assert info["summary"]["layers"] == 6
    for f in ("quant_state.safetensors", "quant_config.json", "plan.json", "report.csv", "run.json"):
        assert (tmp_path / "q" / f).is_file()
    assert json.loads((tmp_path / "q" / "run.json").read_text())["recipe"] == "fp4-minmax"
    m = load_quantized(load_dit(str(tmp_path / "m")).transformer, tmp_path / "q")
    assert sum(isinstance(x, QuantLinear) for x in m.modules()) == 6


def test_replace_without_a_name_records_the_change_in_the_name():
    """A modified recipe is never saved or reported under the name of the recipe it came from (issue 17)."""
    base = get_recipe("hqdit-w4a4")
    assert base.replace(rotation_block=52).name == "hqdit-w4a4+rotation_block=52"
    assert base.replace(rotation_block=52, gptq=False).name == "hqdit-w4a4+rotation_block=52+gptq=False"
    assert base.replace(name="mine", rotation_block=52).name == "mine"
    assert base.replace(description="reworded").name == "hqdit-w4a4"  # prose is not a change of method
    assert base.replace(gptq=True).name == "hqdit-w4a4"  # the same value: nothing changed


def test_three_bit_activations_change_the_activations_only():
    from hqdit_utils.engine.recipes import (FP3_CANDIDATES, W4A3_BASES, changed_ingredients, w4a3_name,
                                            with_3bit_activations)

    assert with_3bit_activations("fp4-minmax").act_format == "fp3_e2m0"  # E2M1 without its mantissa bit
    assert with_3bit_activations("int4-rtn").act_format == "int3"
    hq = with_3bit_activations("hqdit-w4a4")
    assert hq.name == "hqdit-w4a3" and hq.act_candidates == FP3_CANDIDATES and hq.rotation_seed is None
    assert changed_ingredients("hqdit-w4a4", hq) == {"format choice": ["act_candidates"], "rotation": ["rotation_seed"]}
    assert changed_ingredients("fp4-minmax", with_3bit_activations("fp4-minmax")) == {"format choice": ["act_format"]}
    assert all(parse_format(f).bits == 3 for f in FP3_CANDIDATES + ("int3",))
    for base in W4A3_BASES:
        assert RECIPES[w4a3_name(base)] == with_3bit_activations(base)
    for not_4bit in ("hqdit-w4a8", "fp32", "int8"):
        with pytest.raises(ValueError, match="turns 4-bit activations"):
            with_3bit_activations(not_4bit)


def test_a_tied_rotation_seed_needs_a_run():
    from hqdit_utils.engine.calibration import Calibration  # noqa: F401  (quantize_ refuses before calibrating)
    from hqdit_utils.engine.qmodel import QuantizationError, quantize_
    from hqdit_utils.dit.models import tiny_dit

    tied = RECIPES["hqdit-w4a3"]
    with pytest.raises(QuantizationError, match=r"rotation_seed=None.*recipe.replace\(rotation_seed=0\)"):
        quantize_(tiny_dit(0).transformer, tied, None)
