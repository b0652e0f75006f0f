"""One door to every DiT the project uses: :func:`load_dit` returns a :class:`DiTBundle`.

Sources
-------
``"embedded"`` (default)
    The small DiT shipped in ``data/embedded/`` (trained by ``hqdit train-embedded``): pixel space,
    1 channel, 16×16, 10 classes + null class 10. Every file is checked against the sha256 sums of
    ``data/embedded/MANIFEST.json`` before loading.
a diffusers folder
    e.g. a download of ``facebook/DiT-XL-2-256`` with ``transformer/``, ``vae/`` and ``scheduler/``
    sub-folders (a folder without ``vae/`` is treated as a pixel-space model, like the embedded one).
an original checkpoint ``DiT-XL-2-256x256.pt`` / ``DiT-XL-2-512x512.pt``
    of github.com/facebookresearch/DiT, read with ``torch.load(..., weights_only=True)`` and converted
    in code (:func:`convert_original_state_dict`) to the diffusers layout. The VAE then comes from a
    separately given ``sd-vae-ft-ema`` folder (argument ``vae=`` or ``$HQDIT_VAE``).

``load_dit(None)`` reads ``$HQDIT_DIT_WEIGHTS`` and falls back to ``"embedded"``.

Also here: :func:`dit_xl2_shaped_random` (an untrained model with DiT-XL/2's shapes, for tests and
benchmarks) and :func:`tiny_dit` (a few-thousand-parameter model for unit tests).

Known difference from the original DiT code (inherited from diffusers, also true of the official
diffusers port ``facebook/DiT-XL-2-256``): diffusers' sinusoidal timestep features divide the
frequency exponent by ``half - 1`` (``downscale_freq_shift=1``) where the original divides by
``half``, so a converted ``.pt`` checkpoint gives slightly different outputs from the original
repository's code — exactly as the official diffusers weights do.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import DATA_DIR
from ..dit_configs import HEADS_BY_WIDTH, DiT_XL_2, dit_config
from ..errors import MissingWeightsError, WeightsError
from ..files import load_error_reason, sha256_file

#: Environment variables read by :func:`load_dit`.
ENV_WEIGHTS = "HQDIT_DIT_WEIGHTS"
ENV_VAE = "HQDIT_VAE"
ENV_EMBEDDED = "HQDIT_EMBEDDED"

DOWNLOAD_HELP = (
    "On a machine with internet, download one of:\n"
    "  * the diffusers folder:   huggingface-cli download facebook/DiT-XL-2-256 --local-dir DiT-XL-2-256\n"
    "                            (512 px: facebook/DiT-XL-2-512)\n"
    "  * the original checkpoint: wget https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt\n"
    "                            (512 px: .../DiT-XL-2-512x512.pt), plus its VAE:\n"
    "                            huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema\n"
    f"then pass the path to load_dit(...) / --model, or set ${ENV_WEIGHTS} (and ${ENV_VAE} for the VAE folder)."
)


@dataclass
class DiTBundle:
    """Everything sampling and quantization need to know about one DiT.

    transformer:     a ``diffusers.DiTTransformer2DModel`` (eval mode). ``transformer(x, timestep=t,
                     class_labels=y).sample`` maps latents ``[B, C, s, s]`` to ``[B, 2C, s, s]``
                     (ε, then the learned-variance channels). Quantize it in place; sampling calls it.
    scheduler:       the diffusers scheduler the model was trained with (1000 steps, linear β).
    decoder:         callable latents ``[B, C, s, s]`` -> images ``[B, C_img, H, W]`` float in [-1, 1]:
                     the identity for pixel-space models, the SD-VAE (``z / scaling_factor``) for DiT-XL/2.
    num_classes:     conditional classes (10 / 1000); class ids are ``0 .. num_classes-1``.
    null_class:      the id of the unconditional ("dropped label") embedding row, ``num_classes`` in
                     diffusers' ``LabelEmbedding``; ``None`` if the model has no such row (no CFG).
    image_size:      decoded image side in pixels (16 for the embedded model, 256/512 for DiT-XL/2).
    latent_channels: ``C`` (1 embedded, 4 DiT-XL/2).
    latent_size:     ``s`` (16 embedded, 32/64 DiT-XL/2).
    name:            human-readable; random models say so.
    sha256:          sha256 of the weights file(s) when known (``{relative path: hex}``), else ``None``.
    source:          where the weights came from.
    image_channels:  channels of decoded images (1 embedded, 3 DiT-XL/2).
    conditioning:    ``None`` for a class-conditional DiT (called with ``class_labels=y``); else
                     ``conditioning(batch_size, generator) -> dict`` of the forward's keyword arguments
                     besides the latents and ``timestep`` (PixArt's caption embeddings, …), drawn once per
                     batch of trajectories; the model is then sampled without guidance (no null class).
    """

    transformer: torch.nn.Module
    scheduler: object
    decoder: Callable[[torch.Tensor], torch.Tensor]
    num_classes: int
    null_class: int | None
    image_size: int
    latent_channels: int
    latent_size: int
    name: str
    sha256: dict | None = None
    source: str = ""
    image_channels: int = 1
    vae: object | None = field(default=None, repr=False)
    conditioning: Callable[[int, torch.Generator], dict] | None = field(default=None, repr=False)

    @property
    def learned_sigma(self) -> bool:
        """True when the transformer outputs 2 × latent channels (ε and the variance interpolation)."""
        return int(self.transformer.config.out_channels) == 2 * self.latent_channels


def identity_decoder(latents: torch.Tensor) -> torch.Tensor:
    """Pixel-space models: the latents *are* the images (``[B, C, H, W]`` in [-1, 1])."""
    return latents


class VaeDecoder:
    """SD-VAE decoder: latents ``[B, 4, s, s]`` -> images ``[B, 3, 8s, 8s]`` in [-1, 1] (``z / 0.18215``)."""

    def __init__(self, vae, batch_size: int = 16):
        self.vae = vae
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.batch_size = batch_size

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            dtype = next(self.vae.parameters()).dtype
            outs = [
                self.vae.decode(latents[i : i + self.batch_size].to(dtype) / self.scaling_factor).sample.float()
                for i in range(0, len(latents), self.batch_size)
            ]
        return torch.cat(outs)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def default_embedded_dir() -> Path:
    """``$HQDIT_EMBEDDED`` if set, else ``<data>/embedded`` (``$HQDIT_DATA`` or the repository's ``data/``)."""
    env = os.environ.get(ENV_EMBEDDED)
    if env:
        return Path(env)
    return Path(DATA_DIR) / "embedded"


def verify_manifest(folder: str | Path, prefixes: tuple[str, ...] = ("transformer/", "scheduler/")) -> dict:
    """Check the sha256 of every file listed in ``folder/MANIFEST.json`` whose path starts with one
    of ``prefixes``; return ``{relative path: sha256}``.

    Raises:
        MissingWeightsError: no manifest, or a listed file is missing.
        WeightsError: a file's size or sha256 differs from the manifest (corrupted or truncated).
    """
    folder = Path(folder)
    man_path = folder / "MANIFEST.json"
    if not man_path.is_file():
        raise MissingWeightsError(
            f"embedded model manifest not found: {man_path}. The embedded model is shipped in data/embedded/ of "
            f"the repository (override with ${ENV_EMBEDDED} or $HQDIT_DATA); restore it with "
            "`git checkout -- data/embedded` or retrain it with `hqdit train-embedded --out data/embedded`."
        )
    manifest = json.loads(man_path.read_text())
    checked = {}
    for rel, info in manifest.get("files", {}).items():
        if not rel.startswith(prefixes):
            continue
        p = folder / rel
        if not p.is_file():
            raise MissingWeightsError(f"{p} is listed in {man_path} but missing; restore it with `git checkout -- {folder}`")
        size = p.stat().st_size
        if "bytes" in info and size != info["bytes"]:
            raise WeightsError(
                f"{p} has {size} bytes, the manifest says {info['bytes']}: the file is truncated or corrupted. "
                f"Restore it with `git checkout -- {p}` or retrain with: {manifest.get('command', 'hqdit train-embedded')}"
            )
        digest = sha256_file(p)
        if digest != info["sha256"]:
            raise WeightsError(
                f"sha256 mismatch for {p}: expected {info['sha256']}, got {digest} — the file is corrupted or was "
                f"changed. Restore it with `git checkout -- {p}` or retrain with: {manifest.get('command', 'hqdit train-embedded')}"
            )
        checked[rel] = digest
    if not any(k.startswith("transformer/") for k in checked) and "transformer/" in prefixes:
        raise WeightsError(f"{man_path} lists no transformer weights")
    return checked


def _null_class_of(transformer) -> tuple[int, int | None]:
    num_classes = int(transformer.config.num_embeds_ada_norm)
    rows = transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
    return num_classes, (num_classes if rows == num_classes + 1 else None)


def _load_transformer_folder(folder: Path, torch_dtype):
    from diffusers import DiTTransformer2DModel  # deferred: diffusers takes seconds to import

    if not (folder / "config.json").is_file():
        raise MissingWeightsError(f"no transformer config.json in {folder}\n{DOWNLOAD_HELP}")
    try:
        class_name = json.loads((folder / "config.json").read_text()).get("_class_name", "DiTTransformer2DModel")
    except (OSError, ValueError) as err:
        raise WeightsError(f"{folder / 'config.json'} is unreadable ({err}); download the model again.") from err
    if class_name != "DiTTransformer2DModel":
        raise WeightsError(
            f"{folder} holds a {class_name}; load_dit and the hqdit commands run class-conditional "
            "DiTTransformer2DModel folders only (quantize other transformers through the Python API: "
            "calibrate(transformer, conditioning=...), then quantize_ -- see the book page 'Quantize your own DiT')")
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not weights:
        raise MissingWeightsError(f"no weights (*.safetensors) in {folder}\n{DOWNLOAD_HELP}")
    try:
        model, info = DiTTransformer2DModel.from_pretrained(str(folder), torch_dtype=torch_dtype,
                                                            low_cpu_mem_usage=False, output_loading_info=True)
    except Exception as err:  # safetensors / json / shape errors all mean: these weights are unusable
        raise WeightsError(f"cannot load the DiT transformer from {folder}: {type(err).__name__}: {err} "
                           "(corrupted or truncated file, or weights that do not fit config.json?); download it "
                           f"again.\n{DOWNLOAD_HELP}") from err
    # diffusers only logs missing keys and initialises them at random: refuse such a model
    bad = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        raise WeightsError(
            f"the weights in {folder} do not fit its config.json: missing keys {bad['missing_keys'][:8]}, unexpected "
            f"keys {bad['unexpected_keys'][:8]}, mismatched shapes {bad['mismatched_keys'][:8]}. The download is "
            f"incomplete or of another model; download it again.\n{DOWNLOAD_HELP}")
    return model.eval()


def check_device(device: "str | torch.device") -> torch.device:
    """``device`` as a ``torch.device`` if this machine has it, else :class:`RuntimeError` saying what to use."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r} was asked for, but this machine has no usable CUDA GPU "
                               "(torch.cuda.is_available() is False). Pass device='cpu' / --device cpu, or run "
                               "on a machine with an NVIDIA GPU and a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {str(device)!r} does not exist: this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 …)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {str(device)!r} was asked for, but MPS is not available here; use device='cpu'")
    return dev


def _ddpm_scheduler(num_train_timesteps: int = 1000):
    from diffusers import DDPMScheduler  # deferred: diffusers takes seconds to import

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=1e-4, beta_end=0.02,
                         beta_schedule="linear", clip_sample=False, prediction_type="epsilon",
                         variance_type="fixed_small")


def _load_scheduler(folder: Path):
    from diffusers import DDPMScheduler  # deferred: diffusers takes seconds to import

    if (folder / "scheduler_config.json").is_file():
        return DDPMScheduler.from_config(DDPMScheduler.load_config(str(folder)))
    return _ddpm_scheduler()


def _load_vae(vae, torch_dtype):
    from diffusers import AutoencoderKL  # deferred: diffusers takes seconds to import

    if vae is not None and not isinstance(vae, (str, os.PathLike)):
        return vae  # an already-built AutoencoderKL
    path = vae or os.environ.get(ENV_VAE)
    if not path:
        raise MissingWeightsError(
            "the SD-VAE decoder for DiT-XL/2 is needed: pass vae='path/to/sd-vae-ft-ema' or set "
            f"${ENV_VAE}. Download it on a machine with internet: "
            "huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema"
        )
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MissingWeightsError(
            f"no VAE found at {path} (expected config.json + diffusion_pytorch_model.safetensors of "
            f"stabilityai/sd-vae-ft-ema; looked at the vae argument / ${ENV_VAE}). Download it on a machine "
            "with internet: huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema"
        )
    try:
        return AutoencoderKL.from_pretrained(str(path), torch_dtype=torch_dtype).eval()
    except Exception as err:
        raise WeightsError(f"cannot load the VAE from {path}: {type(err).__name__}: {err}") from err


def _bundle_from_transformer(transformer, scheduler, *, vae=None, name: str, source: str, sha256=None) -> DiTBundle:
    cfg = transformer.config
    num_classes, null_class = _null_class_of(transformer)
    latent_channels = int(cfg.in_channels)
    latent_size = int(cfg.sample_size)
    if vae is None:
        decoder, image_size, image_channels = identity_decoder, latent_size, latent_channels
    else:
        decoder = VaeDecoder(vae)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        image_size, image_channels = latent_size * factor, int(vae.config.out_channels)
    return DiTBundle(transformer=transformer, scheduler=scheduler, decoder=decoder, num_classes=num_classes,
                     null_class=null_class, image_size=image_size, latent_channels=latent_channels,
                     latent_size=latent_size, name=name, sha256=sha256, source=source,
                     image_channels=image_channels, vae=vae)


#: Caption tokens of the random conditioning :func:`as_bundle` gives a PixArt transformer (our choice).
PIXART_CAPTION_TOKENS = 8


def pixart_conditioning(transformer) -> Callable[[int, torch.Generator], dict]:
    """Random conditioning for a diffusers ``PixArtTransformer2DModel``: ``encoder_hidden_states``
    [B, :data:`PIXART_CAPTION_TOKENS`, caption width] of standard normal values (the caption width is
    ``config.caption_channels``, or ``cross_attention_dim`` without a caption projection) and
    ``added_cond_kwargs`` (``resolution`` [B, 2] = the image side in pixels, 8 per latent pixel, and
    ``aspect_ratio`` [B, 1] = 1 when the model uses them, else ``None``). Random captions are our choice:
    they exercise every layer, not a text encoder's statistics."""
    cfg = transformer.config
    width = int(cfg.caption_channels or cfg.cross_attention_dim)
    extra = bool(getattr(transformer, "use_additional_conditions", False))
    side = 8.0 * int(cfg.sample_size)

    def conditioning(batch_size: int, generator: torch.Generator) -> dict:
        text = torch.randn((batch_size, PIXART_CAPTION_TOKENS, width), generator=generator)
        added = ({"resolution": torch.full((batch_size, 2), side), "aspect_ratio": torch.ones(batch_size, 1)}
                 if extra else {"resolution": None, "aspect_ratio": None})
        return {"encoder_hidden_states": text, "added_cond_kwargs": added}
    return conditioning


def as_bundle(model, scheduler=None, *, conditioning: Callable[[int, torch.Generator], dict] | None = None
              ) -> DiTBundle:
    """What calibration and sampling need, from a bare diffusers transformer (a :class:`DiTBundle` passes
    through, with ``scheduler``/``conditioning`` replaced when given).

    Args:
        model: a ``DiTTransformer2DModel`` (class-conditional: class labels ``0 .. num_embeds_ada_norm-1``,
            guidance through its null class), a ``PixArtTransformer2DModel`` (random captions,
            :func:`pixart_conditioning`), or any transformer called as ``model(x [B, C, s, s], timestep=t [B],
            **conditioning(B, generator)).sample`` -> ``[B, C or 2C, s, s]`` whose config has ``in_channels``
            and ``sample_size``. float32, float16 or bfloat16, on any device.
        scheduler: the diffusers scheduler it was trained with; default a 1000-step DDPM scheduler with the
            standard linear β from 1e-4 to 0.02 (DiT's).
        conditioning: ``callable(batch_size, generator) -> dict`` of forward keyword arguments besides the
            latents and ``timestep``; required for transformers other than DiT and PixArt.

    The bundle decodes with the identity (its "images" are the latents); use it to calibrate and to sample
    latents, not for pictures of a latent-space model.

    Raises:
        TypeError: a pipeline (pass ``pipe.transformer``), something that is no transformer, or a transformer
            of an unknown kind without ``conditioning``.
    """
    if isinstance(model, DiTBundle):
        changes = {k: v for k, v in (("scheduler", scheduler), ("conditioning", conditioning)) if v is not None}
        return dataclasses.replace(model, **changes) if changes else model
    kind = type(model).__name__
    if not isinstance(model, torch.nn.Module):
        hint = " — pass pipe.transformer" if hasattr(model, "transformer") else ""
        raise TypeError(f"expected a diffusers transformer (a torch.nn.Module) or a DiTBundle, got a {kind}{hint}")
    cfg = getattr(model, "config", None)
    if cfg is None or not {"in_channels", "sample_size"} <= set(cfg):
        raise TypeError(f"{kind} has no diffusers config with in_channels and sample_size; wrap it in a DiTBundle")
    num_classes, null_class = 1, None
    if conditioning is None and kind == "DiTTransformer2DModel":
        num_classes, null_class = _null_class_of(model)
    elif conditioning is None and kind == "PixArtTransformer2DModel":
        conditioning = pixart_conditioning(model)
    elif conditioning is None:
        raise TypeError(f"no conditioning is known for a {kind}: pass conditioning=callable(batch_size, generator) "
                        "-> dict of the forward's keyword arguments besides the latents and timestep")
    channels, size = int(cfg.in_channels), int(cfg.sample_size)
    return DiTBundle(transformer=model, scheduler=_ddpm_scheduler() if scheduler is None else scheduler,
                     decoder=identity_decoder, num_classes=num_classes, null_class=null_class, image_size=size,
                     latent_channels=channels, latent_size=size, name=f"given {kind}", source="given",
                     image_channels=channels, conditioning=conditioning)


# --------------------------------------------------------------------------------------------------
# original DiT checkpoints  <->  diffusers layout
# --------------------------------------------------------------------------------------------------
_BLOCK_MAP = {  # original per-block suffix -> diffusers per-block suffix (q/k/v handled separately)
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
#: Heads of the published DiT sizes, by width (S, B, L, XL); other widths use ``width // 72``.


def original_config_from_state_dict(sd: dict, num_attention_heads: int | None = None) -> dict:
    """Infer the ``DiTTransformer2DModel`` config from an original DiT state dict's shapes."""
    needed = ["x_embedder.proj.weight", "pos_embed", "final_layer.linear.weight", "y_embedder.embedding_table.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise WeightsError(f"not an original DiT checkpoint: missing keys {missing}; found e.g. {sorted(sd)[:8]}")
    w = sd["x_embedder.proj.weight"]
    hidden, in_ch, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    tokens = int(sd["pos_embed"].shape[1])
    grid = int(round(tokens ** 0.5))
    out_ch = int(sd["final_layer.linear.weight"].shape[0]) // (patch * patch)
    rows = int(sd["y_embedder.embedding_table.weight"].shape[0])
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    heads = num_attention_heads or HEADS_BY_WIDTH.get(hidden) or (hidden // 72 if hidden % 72 == 0 else None)
    if heads is None:
        raise WeightsError(f"cannot infer the number of attention heads for width {hidden}; pass num_attention_heads=")
    mlp_hidden = int(sd["blocks.0.mlp.fc1.weight"].shape[0])
    if mlp_hidden != 4 * hidden:
        raise WeightsError(f"MLP width {mlp_hidden} != 4 x {hidden}; diffusers' DiT block needs mlp_ratio 4")
    return dit_config(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, in_channels=in_ch,
                      out_channels=out_ch, input_size=grid * patch, num_classes=rows - 1 if rows > 1 else rows)


def convert_original_state_dict(sd: dict, num_layers: int) -> dict:
    """Original DiT keys (``x_embedder``, ``t_embedder``, ``y_embedder``, ``blocks.i``, ``final_layer``,
    ``pos_embed``) -> diffusers ``DiTTransformer2DModel`` keys.

    The fused ``attn.qkv`` is split into ``to_q/to_k/to_v``; the single timestep/class embedder of the
    original is copied into every block (diffusers keeps one per block; only block 0's copy feeds the
    final layer). ``pos_embed`` (fixed sin-cos) is returned under ``pos_embed.pos_embed``. Keys that do not
    belong to any rule are kept under their original name so the caller can report them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("x_embedder.proj."):
            out["pos_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k == "pos_embed":
            out["pos_embed.pos_embed"] = v
        elif k.startswith("t_embedder.mlp.") or k.startswith("y_embedder."):
            if k.startswith("t_embedder.mlp.0."):
                sub = "timestep_embedder.linear_1." + k.rsplit(".", 1)[1]
            elif k.startswith("t_embedder.mlp.2."):
                sub = "timestep_embedder.linear_2." + k.rsplit(".", 1)[1]
            elif k == "y_embedder.embedding_table.weight":
                sub = "class_embedder.embedding_table.weight"
            else:
                out[k] = v
                continue
            for i in range(num_layers):
                out[f"transformer_blocks.{i}.norm1.emb.{sub}"] = v
        elif (m := re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", k)):
            i, mod, kind = m.groups()
            pre = f"transformer_blocks.{i}."
            if mod == "attn.qkv":
                q, kk, vv = v.chunk(3, dim=0)
                out[pre + f"attn1.to_q.{kind}"], out[pre + f"attn1.to_k.{kind}"], out[pre + f"attn1.to_v.{kind}"] = q, kk, vv
            elif mod in _BLOCK_MAP:
                out[pre + f"{_BLOCK_MAP[mod]}.{kind}"] = v
            else:
                out[k] = v
        elif k.startswith("final_layer.adaLN_modulation.1."):
            out["proj_out_1." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("final_layer.linear."):
            out["proj_out_2." + k.rsplit(".", 1)[1]] = v
        else:
            out[k] = v
    return out


def to_original_state_dict(transformer) -> dict:
    """The inverse of :func:`convert_original_state_dict`: a diffusers DiT's weights in the original
    DiT key layout. Used to test the converter.

    The original has one timestep/class embedder; diffusers keeps a copy per block. All copies must be
    equal (true of converted and of ``hqdit train-embedded`` models), else :class:`WeightsError`."""
    sd = transformer.state_dict()
    e0 = "transformer_blocks.0.norm1.emb."
    for k in [k for k in sd if k.startswith("transformer_blocks.") and ".norm1.emb." in k]:
        ref = e0 + k.split(".norm1.emb.", 1)[1]
        if not torch.equal(sd[k], sd[ref]):
            raise WeightsError(f"{k} differs from {ref}: the per-block embedders are not shared, so the model has "
                               "no original-DiT equivalent")
    out = {"pos_embed": transformer.pos_embed.pos_embed.detach().clone()}
    out["x_embedder.proj.weight"] = sd["pos_embed.proj.weight"]
    out["x_embedder.proj.bias"] = sd["pos_embed.proj.bias"]
    e = "transformer_blocks.0.norm1.emb."
    out["t_embedder.mlp.0.weight"] = sd[e + "timestep_embedder.linear_1.weight"]
    out["t_embedder.mlp.0.bias"] = sd[e + "timestep_embedder.linear_1.bias"]
    out["t_embedder.mlp.2.weight"] = sd[e + "timestep_embedder.linear_2.weight"]
    out["t_embedder.mlp.2.bias"] = sd[e + "timestep_embedder.linear_2.bias"]
    out["y_embedder.embedding_table.weight"] = sd[e + "class_embedder.embedding_table.weight"]
    for i in range(len(transformer.transformer_blocks)):
        pre = f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([sd[pre + f"attn1.to_{c}.{kind}"] for c in "qkv"], 0)
            for orig, new in _BLOCK_MAP.items():
                out[f"blocks.{i}.{orig}.{kind}"] = sd[pre + f"{new}.{kind}"]
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = sd[f"proj_out_1.{kind}"]
        out[f"final_layer.linear.{kind}"] = sd[f"proj_out_2.{kind}"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def load_original_checkpoint(path: str | Path, num_attention_heads: int | None = None, torch_dtype=torch.float32):
    """Read an original DiT ``.pt`` (``torch.load(weights_only=True)``; a bare state dict, or one under
    ``"ema"``/``"model"``) and return a diffusers ``DiTTransformer2DModel`` with its weights.

    Raises :class:`WeightsError` listing missing/unexpected keys or mismatched shapes.
    """
    from diffusers import DiTTransformer2DModel  # deferred: diffusers takes seconds to import

    path = Path(path)
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read {path} with torch.load(weights_only=True): {load_error_reason(err)} "
                           f"(corrupted/truncated download, or not a DiT checkpoint); download it again.\n{DOWNLOAD_HELP}"
                           ) from err
    if isinstance(raw, dict) and "ema" in raw and isinstance(raw["ema"], dict):
        raw = raw["ema"]
    elif isinstance(raw, dict) and "model" in raw and isinstance(raw["model"], dict):
        raw = raw["model"]
    if not isinstance(raw, dict):
        raise WeightsError(f"{path} does not hold a state dict (got {type(raw).__name__})")
    config = original_config_from_state_dict(raw, num_attention_heads)
    converted = convert_original_state_dict(raw, config["num_layers"])
    pos = converted.pop("pos_embed.pos_embed", None)
    model = DiTTransformer2DModel(**config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    bad_shapes = [f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(converted)) if converted[k].shape != expected[k].shape]
    if missing or unexpected or bad_shapes:
        raise WeightsError(
            f"{path} does not match a DiT of config {config}:\n  missing keys: {missing}\n  unexpected keys: "
            f"{unexpected}\n  shape mismatches: {bad_shapes}"
        )
    model.load_state_dict(converted, strict=True)
    if pos is not None:
        buf = model.pos_embed.pos_embed
        if tuple(pos.shape) != tuple(buf.shape):
            raise WeightsError(f"{path}: pos_embed shape {tuple(pos.shape)} != model {tuple(buf.shape)}")
        buf.copy_(pos.to(buf.dtype))  # use the checkpoint's own (fixed) positional table
    if torch_dtype != torch.float32:
        model = model.to(torch_dtype)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# the one door
# --------------------------------------------------------------------------------------------------
def load_dit(source: str | os.PathLike | None = "embedded", *, vae=None, verify: bool = True,
             device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32,
             num_attention_heads: int | None = None) -> DiTBundle:
    """Load a DiT and everything needed to sample from it.

    Args:
        source: ``"embedded"`` (default; ``data/embedded`` or ``$HQDIT_EMBEDDED``), a diffusers folder
            (``transformer/`` [+ ``vae/``, ``scheduler/``]), or an original ``DiT-XL-2-*.pt``.
            ``None`` reads ``$HQDIT_DIT_WEIGHTS`` and falls back to ``"embedded"``.
        vae: for an original ``.pt`` (or a diffusers folder without ``vae/``): the ``sd-vae-ft-ema``
            folder or an ``AutoencoderKL``; default ``$HQDIT_VAE``.
        verify: check sha256 sums against ``MANIFEST.json`` when the folder has one.
        device, torch_dtype: where and in what precision to put the networks.
        num_attention_heads: only for ``.pt`` checkpoints of non-standard widths.

    Returns:
        :class:`DiTBundle`.

    Raises:
        MissingWeightsError: with the path looked at, the env var, and the download command.
        WeightsError: damaged files (sha256/size mismatch, unreadable) or key/shape mismatches.
        RuntimeError: ``device`` is not available on this machine (e.g. CUDA without a GPU).
    """
    check_device(device)
    if source is None:
        source = os.environ.get(ENV_WEIGHTS) or "embedded"
    src = str(source)
    if src == "embedded":
        folder = default_embedded_dir()
        sha = verify_manifest(folder) if verify else None
        if not verify and not (folder / "transformer").is_dir():
            raise MissingWeightsError(f"embedded model not found in {folder}; retrain: hqdit train-embedded --out data/embedded")
        bundle = _load_folder(folder, vae=None, torch_dtype=torch_dtype, sha=sha)
        bundle.name = "embedded DiT (digits 16x16, " + bundle.name.split("(", 1)[-1]
    else:
        path = Path(src).expanduser()
        if path.is_dir():
            sha = verify_manifest(path) if verify and (path / "MANIFEST.json").is_file() else None
            bundle = _load_folder(path, vae=vae, torch_dtype=torch_dtype, sha=sha)
        elif path.is_file():
            if path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
                raise WeightsError(f"{path}: expected a diffusers folder or an original DiT .pt checkpoint")
            model = load_original_checkpoint(path, num_attention_heads, torch_dtype)
            # latent DiTs (4 channels, DiT-XL/2) need the SD-VAE; other channel counts are pixel-space
            needs_vae = vae is not None or int(model.config.in_channels) == 4
            vae_model = _load_vae(vae, torch_dtype) if needs_vae else None
            sha = {path.name: sha256_file(path)} if verify else None
            bundle = _bundle_from_transformer(model, _ddpm_scheduler(), vae=vae_model,
                                              name=f"{path.stem} (original checkpoint, converted)",
                                              source=str(path), sha256=sha)
        else:
            raise MissingWeightsError(
                f"DiT weights not found: {path!s} (resolved {path.resolve()!s}) does not exist. Looked at the "
                f"`source` argument / --model (the env var ${ENV_WEIGHTS} is read when no source is given; "
                f"it is {os.environ.get(ENV_WEIGHTS)!r}). Expected a diffusers folder such as DiT-XL-2-256/ "
                f"(transformer/, vae/, scheduler/) or an original DiT-XL-2-256x256.pt / DiT-XL-2-512x512.pt.\n"
                + DOWNLOAD_HELP
            )
    bundle.transformer.to(device)
    if bundle.vae is not None:
        bundle.vae.to(device)
    return bundle


def _load_folder(folder: Path, *, vae, torch_dtype, sha) -> DiTBundle:
    tdir = folder / "transformer" if (folder / "transformer").is_dir() else folder
    transformer = _load_transformer_folder(tdir, torch_dtype)
    scheduler = _load_scheduler(folder / "scheduler")
    vae_model = None
    if (folder / "vae").is_dir() and vae is None:
        vae_model = _load_vae(str(folder / "vae"), torch_dtype)
    elif vae is not None:
        vae_model = _load_vae(vae, torch_dtype)
    c = transformer.config
    name = (f"{c.num_layers} blocks x {c.num_attention_heads * c.attention_head_dim} wide, "
            f"{c.num_attention_heads} heads x {c.attention_head_dim}, patch {c.patch_size})")
    return _bundle_from_transformer(transformer, scheduler, vae=vae_model, name=f"{folder.name} ({name}",
                                    source=str(folder), sha256=sha)


# --------------------------------------------------------------------------------------------------
# random models for tests and benchmarks
# --------------------------------------------------------------------------------------------------
def share_embedder_weights(transformer) -> None:
    """Copy block 0's timestep/class embedder weights into every block (as in the original DiT, where
    one embedder serves all blocks). Modules stay separate; only values are made equal."""
    src = transformer.transformer_blocks[0].norm1.emb.state_dict()
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(src)


def _random_bundle(config: dict, seed: int, name: str, image_channels: int | None = None) -> DiTBundle:
    from diffusers import DiTTransformer2DModel  # deferred: diffusers takes seconds to import

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DiTTransformer2DModel(**config).eval()
    share_embedder_weights(model)
    b = _bundle_from_transformer(model, _ddpm_scheduler(), vae=None, name=name, source="random")
    if image_channels is not None:
        b.image_channels = image_channels
    return b


#: ``DiTTransformer2DModel`` config of DiT-XL/2-256 (diffusers port): 28 blocks × 1152 (16 heads × 72), patch 2.
DIT_XL2_256_CONFIG = DiT_XL_2()


def dit_xl2_meta():
    """DiT-XL/2-256's transformer on the meta device: shapes only, no weights, no memory (for counting)."""
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        return DiTTransformer2DModel(**DIT_XL2_256_CONFIG).eval()


def dit_xl2_shaped_random(seed: int = 0, num_layers: int = 28) -> DiTBundle:
    """An **untrained, random** model with DiT-XL/2-256's shapes: 28 blocks, width 1152, 16 heads × 72,
    patch 2, 4 latent channels, 32×32 latents, 1000 classes + null class 1000, learned-sigma output
    (8 channels). diffusers' default initialisation (not zeroed), so outputs are non-trivial; one
    embedder's values copied into all blocks, as in a converted DiT-XL/2.
    ~750 M parameters (diffusers keeps one timestep/class embedder per block), ~3 GB in fp32.

    Its decoder is the identity on the 4 latent channels (there is no VAE): use it for shapes, memory
    and timing, never for images. ``num_layers`` can be lowered for quicker shape checks.
    """
    cfg = DiT_XL_2(depth=num_layers)
    return _random_bundle(cfg, seed, f"RANDOM untrained DiT-XL/2-shaped model (seed {seed}, {num_layers} blocks)")


def tiny_dit(seed: int = 0, *, width: int = 72, heads: int = 1, num_layers: int = 2, in_channels: int = 1,
             sample_size: int = 8, patch_size: int = 2, num_classes: int = 4) -> DiTBundle:
    """A tiny **random** DiT for unit tests (default: 2 blocks × 72 wide, 8×8 pixels, 4 classes + null)."""
    cfg = dit_config(depth=num_layers, hidden_size=width, num_heads=heads, patch_size=patch_size,
                     in_channels=in_channels, input_size=sample_size, num_classes=num_classes)
    return _random_bundle(cfg, seed, f"RANDOM tiny DiT (seed {seed}, {num_layers} blocks x {width})")
