"""Tests of the DiT layer vocabulary: selection by patterns, kinds, short names."""
import pytest

from hqdit_utils.engine.layers import (ALL_FC_LAYERS, BLOCK_LINEARS, DEFAULT_LAYERS, LEAF_KINDS, LayerSelectionError,
                                layer_kind, select_linears, short_layer_name)
from hqdit_utils.dit.models import tiny_dit


@pytest.fixture(scope="module")
def bundle():
    return tiny_dit(0, width=144, heads=2, num_layers=2)


# -- layer selection ---------------------------------------------------------------------------------
def test_default_selection_is_the_token_wise_block_linears(bundle):
    sel = select_linears(bundle.transformer, DEFAULT_LAYERS)
    assert len(sel) == 12
    assert all(n.split(".", 2)[2] in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj",
                                      "ff.net.2") for n in sel)

    sel_all = select_linears(bundle.transformer, ALL_FC_LAYERS)
    assert set(sel_all) - set(sel) == {"transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1.linear"}


def test_regex_patterns_and_exclude(bundle):
    sel = select_linears(bundle.transformer, ["re:transformer_blocks\\.1\\..*to_[qkv]"])
    assert list(sel) == [f"transformer_blocks.1.attn1.to_{c}" for c in "qkv"]
    sel = select_linears(bundle.transformer, DEFAULT_LAYERS, exclude=["transformer_blocks.0.*"])
    assert len(sel) == 6 and all(n.startswith("transformer_blocks.1") for n in sel)


def test_pattern_matching_nothing_is_an_error(bundle):
    with pytest.raises(LayerSelectionError, match="matches no module"):
        select_linears(bundle.transformer, ["*.attn2.to_q"])
    with pytest.raises(LayerSelectionError, match="none is an nn.Linear"):
        select_linears(bundle.transformer, ["*.attn1"])


def test_short_layer_names_use_dits_names():
    assert short_layer_name("transformer_blocks.3.ff.net.2") == "b3.fc2"
    assert short_layer_name("transformer_blocks.0.attn1.to_out.0") == "b0.proj"
    assert short_layer_name("transformer_blocks.11.norm1.linear") == "b11.adaLN"
    assert short_layer_name("proj_out_1") == "proj_out_1"


def test_layer_kind_of_every_block_linear(bundle):
    kinds = {n: layer_kind(n) for n in select_linears(bundle.transformer, ALL_FC_LAYERS)}
    assert kinds["transformer_blocks.1.attn1.to_q"] == "to_q"
    assert kinds["transformer_blocks.0.attn1.to_out.0"] == "to_out"
    assert kinds["transformer_blocks.0.ff.net.0.proj"] == "fc1" and kinds["transformer_blocks.0.ff.net.2"] == "fc2"
    assert kinds["transformer_blocks.0.norm1.linear"] == "adaln"
    assert set(kinds.values()) == set(LEAF_KINDS.values())
    assert layer_kind("proj_out_1") == "proj_out_1"


def test_one_vocabulary():
    """The default patterns, DiT's grouped linears and the kinds are the same six leaves."""
    leaves = [leaf for group in BLOCK_LINEARS.values() for leaf in group]
    assert DEFAULT_LAYERS == tuple(f"*.{leaf}" for leaf in leaves)
    assert set(leaves) | {"norm1.linear"} == set(LEAF_KINDS)
