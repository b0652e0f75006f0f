"""The DiT layer vocabulary: which linears a diffusers DiT block has, their patterns and short names.

A diffusers ``DiTTransformer2DModel`` names its block linears ``transformer_blocks.<b>.<leaf>``; this
module is the one place that knows the leaves, what kind of layer each is, and DiT's own name for it:

=================== ========= ======== =========================================================
leaf                kind      DiT      input
=================== ========= ======== =========================================================
``attn1.to_q``      to_q      q        adaLN-modulated tokens [B, N, d] (shared with k and v)
``attn1.to_k``      to_k      k        same tensor as ``to_q``
``attn1.to_v``      to_v      v        same tensor as ``to_q``
``attn1.to_out.0``  to_out    proj     attention output [B, N, d]
``ff.net.0.proj``   fc1       fc1      adaLN-modulated tokens [B, N, d]
``ff.net.2``        fc2       fc2      GELU output [B, N, 4d]
``norm1.linear``    adaln     adaLN    one conditioning vector per sample [B, d]
=================== ========= ======== =========================================================

Layer selection (torchao ``FqnToConfig`` style): fully-qualified names matched by patterns. Our
default quantized set is the six token-wise linears (:data:`DEFAULT_LAYERS`); :data:`ALL_FC_LAYERS`
adds the adaLN modulation linear, the literal "every fully-connected layer of every block" reading
(book/choices.md#choices-layers).
"""
from __future__ import annotations

import fnmatch
import re
from typing import Sequence

from torch import nn

__all__ = ["LEAF_KINDS", "DIT_NAMES", "SHORT_NAMES", "BLOCK_LINEARS", "DEFAULT_LAYERS", "ADALN_LAYERS",
           "ALL_FC_LAYERS", "WHOLE_MODEL_LAYERS", "LayerSelectionError", "match_pattern", "select_linears", "layer_kind",
           "short_layer_name"]

#: Leaf name inside a DiT block → the layer's kind.
LEAF_KINDS: dict[str, str] = {
    "attn1.to_q": "to_q", "attn1.to_k": "to_k", "attn1.to_v": "to_v", "attn1.to_out.0": "to_out",
    "ff.net.0.proj": "fc1", "ff.net.2": "fc2", "norm1.linear": "adaln",
}
#: Kind → DiT's own name for the linear (DiT: qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation).
DIT_NAMES: dict[str, str] = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj", "fc1": "fc1",
                             "fc2": "fc2", "adaln": "adaLN"}
#: Leaf name → DiT's short name (``"ff.net.2"`` → ``"fc2"``), as the book's figures label layers.
SHORT_NAMES: dict[str, str] = {leaf: DIT_NAMES[kind] for leaf, kind in LEAF_KINDS.items()}
#: The four token-wise linears of a DiT block by DiT's name, and the diffusers leaves behind each.
#: ``qkv`` is the concatenation of ``to_q``, ``to_k``, ``to_v`` (one [3·d, d] weight, as in DiT).
BLOCK_LINEARS: dict[str, tuple[str, ...]] = {
    "qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "proj": ("attn1.to_out.0",),
    "fc1": ("ff.net.0.proj",),
    "fc2": ("ff.net.2",),
}
#: Token-wise linears of every block: our default quantized set (book/choices.md#choices-layers).
DEFAULT_LAYERS: tuple[str, ...] = tuple(f"*.{leaf}" for leaves in BLOCK_LINEARS.values() for leaf in leaves)
#: The adaLN-Zero modulation linear of every block (input: one conditioning vector per sample).
ADALN_LAYERS: tuple[str, ...] = ("*.norm1.linear",)
#: "Every fully-connected layer of every block" (the literal reading of the one third-party statement).
ALL_FC_LAYERS: tuple[str, ...] = DEFAULT_LAYERS + ADALN_LAYERS
#: Every linear of the transformer: the block linears, adaLN, each block's timestep embedder (diffusers' DiT gives
#: every block its own) and the final layer's two projections — chapter 7's "whole model" trial scope (ours).
WHOLE_MODEL_LAYERS: tuple[str, ...] = ALL_FC_LAYERS + ("*.timestep_embedder.linear_1", "*.timestep_embedder.linear_2",
                                                       "proj_out_1", "proj_out_2")


class LayerSelectionError(ValueError):
    """A layer pattern matches no ``nn.Linear``, or the patterns select nothing."""


def match_pattern(name: str, pattern: str) -> bool:
    """Whether the fully-qualified module name ``name`` matches ``pattern``.

    ``pattern`` is a shell-style glob (``fnmatch``; ``*`` also matches dots) or, with the prefix
    ``"re:"``, a regular expression that must match the whole name.
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_linears(model: nn.Module, patterns: Sequence[str], exclude: Sequence[str] = (), *,
                   strict: bool = True) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` whose names match any of ``patterns`` and none of ``exclude``.

    Args:
        model: any module (a diffusers ``DiTTransformer2DModel`` in this project).
        patterns: glob or ``re:`` patterns (see :func:`match_pattern`), e.g. :data:`DEFAULT_LAYERS`.
        exclude: patterns removed from the selection.
        strict: raise :class:`LayerSelectionError` if a pattern matches no ``nn.Linear`` or nothing is selected.

    Returns:
        ``{name: module}`` in the model's module order.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    named = [(n, m) for n, m in model.named_modules() if n]
    linears = [(n, m) for n, m in named if isinstance(m, nn.Linear)]
    out = {n: m for n, m in linears
           if any(match_pattern(n, p) for p in patterns) and not any(match_pattern(n, p) for p in exclude)}
    if strict:
        for p in patterns:
            if not any(match_pattern(n, p) for n, _ in linears):
                others = [n for n, _ in named if match_pattern(n, p)]
                what = (f"it matches {len(others)} module(s) but none is an nn.Linear (already quantized?)"
                        if others else "it matches no module")
                example = ", ".join(n for n, _ in linears[:4])
                raise LayerSelectionError(f"layer pattern {p!r}: {what}. Linear layers look like: {example} …")
        if not out:
            raise LayerSelectionError(f"patterns {tuple(patterns)} minus exclude {tuple(exclude)} select no layer")
    return out


def _block_leaf(name: str) -> "tuple[str, str] | None":
    """``transformer_blocks.3.ff.net.2`` → ``("3", "ff.net.2")``; ``None`` outside the blocks."""
    parts = name.split(".")
    if parts[0] == "transformer_blocks" and len(parts) > 2:
        return parts[1], ".".join(parts[2:])
    return None


def layer_kind(name: str) -> str:
    """The kind of a block linear from its full name: ``transformer_blocks.3.attn1.to_q`` → ``"to_q"``
    (one of :data:`LEAF_KINDS`' values); any other name → its last component."""
    bl = _block_leaf(name)
    if bl is not None and bl[1] in LEAF_KINDS:
        return LEAF_KINDS[bl[1]]
    return name.rsplit(".", 1)[-1]


def short_layer_name(name: str) -> str:
    """``transformer_blocks.3.ff.net.2`` → ``b3.fc2`` (block index + DiT's name for the linear)."""
    bl = _block_leaf(name)
    if bl is None:
        return name
    return f"b{bl[0]}.{SHORT_NAMES.get(bl[1], bl[1])}"
