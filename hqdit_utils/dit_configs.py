"""DiT configurations: one constructor and a table of named sizes, as DiT's own ``models.py`` writes them
(``DiT_XL_2 = DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16)``), giving diffusers'
``DiTTransformer2DModel`` keyword arguments. The one place a DiT config is written out
(``tests/test_package_layout.py`` holds it); ground floor: imports nothing.
"""
from __future__ import annotations

__all__ = ["dit_config", "DIT_SIZES", "HEADS_BY_WIDTH", "DiT_XL_2", "DiT_XL_4", "DiT_XL_8", "DiT_L_2", "DiT_B_2",
           "DiT_S_2"]


def dit_config(*, depth: int, hidden_size: int, num_heads: int, patch_size: int = 2, in_channels: int = 4,
               out_channels: int | None = None, input_size: int = 32, num_classes: int = 1000) -> dict:
    """``DiTTransformer2DModel(**config)`` keyword arguments of a class-conditional DiT with adaLN-Zero blocks.

    Args:
        depth: number of transformer blocks; hidden_size: token width (``num_heads`` × head dimension).
        patch_size: side of a square patch, in latent pixels; input_size: side of the (latent) input, pixels.
        in_channels: input channels; out_channels: output channels (default ``2 * in_channels``: DiT's
            learned-sigma layout, [ε, variance interpolation]).
        num_classes: class labels the embedding table holds (diffusers adds the null class itself).
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
    return dict(num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads, in_channels=in_channels,
                out_channels=2 * in_channels if out_channels is None else out_channels, num_layers=depth,
                sample_size=input_size, patch_size=patch_size, num_embeds_ada_norm=num_classes,
                norm_type="ada_norm_zero", activation_fn="gelu-approximate", norm_elementwise_affine=False)


#: DiT's model sizes (Peebles & Xie 2023, table 1): name -> (depth, hidden size, heads).
DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
#: Heads of a DiT of a given width (to read a config from an original checkpoint's shapes).
HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in DIT_SIZES.values()}


def _named(size: str, patch_size: int):
    depth, hidden, heads = DIT_SIZES[size]

    def config(**kw) -> dict:
        return dit_config(**{"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": patch_size,
                             **kw})

    config.__name__ = f"DiT_{size}_{patch_size}"
    config.__doc__ = (f"DiT-{size}/{patch_size}: {depth} blocks x {hidden} ({heads} heads), patch {patch_size}; keyword "
                      "arguments of :func:`dit_config` override (e.g. ``depth=1`` for a one-block shape check).")
    return config


DiT_XL_2, DiT_XL_4, DiT_XL_8 = _named("XL", 2), _named("XL", 4), _named("XL", 8)
DiT_L_2, DiT_B_2, DiT_S_2 = _named("L", 2), _named("B", 2), _named("S", 2)
