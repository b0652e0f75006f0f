"""load_dit: the embedded model (sha256 against the manifest), damaged files, missing DiT-XL/2 weights,
the original-checkpoint converter, diffusers folders and the random constructors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hqdit_utils.dit import models
from hqdit_utils.files import sha256_file
from hqdit_utils.dit.models import (
    MissingWeightsError,
    WeightsError,
    dit_xl2_shaped_random,
    load_dit,
    tiny_dit,
    to_original_state_dict,
)

EMBEDDED = models.default_embedded_dir()


def _outputs(model, seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    c, s = model.config.in_channels, model.config.sample_size
    x = torch.randn((n, c, s, s), generator=g)
    t = torch.tensor([0, 500, 999][:n])
    y = torch.tensor([0, 1, model.config.num_embeds_ada_norm][:n])  # includes the null class
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def test_embedded_loads_and_matches_manifest():
    b = load_dit("embedded")
    manifest = json.loads((EMBEDDED / "MANIFEST.json").read_text())
    weights = [k for k in manifest["files"] if k.startswith("transformer/") and k.endswith(".safetensors")]
    assert weights and b.sha256 is not None
    for k in weights:
        assert b.sha256[k] == manifest["files"][k]["sha256"] == sha256_file(EMBEDDED / k)
    assert (b.num_classes, b.null_class, b.image_size, b.latent_channels, b.latent_size) == (10, 10, 16, 1, 16)
    assert b.learned_sigma and b.transformer.config.out_channels == 2
    assert b.transformer.config.attention_head_dim == 72 and b.transformer.config.num_attention_heads * 72 == 144
    assert b.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 11
    x = torch.zeros(1, 1, 16, 16)
    assert torch.equal(b.decoder(x), x)  # pixel space: identity decoder


def _copy_embedded(tmp_path: Path) -> Path:
    dst = tmp_path / "embedded"
    shutil.copytree(EMBEDDED, dst)
    return dst


def _weights_file(folder: Path) -> Path:
    return next((folder / "transformer").glob("*.safetensors"))


def test_corrupted_embedded_weights_give_clear_error(tmp_path, monkeypatch):
    folder = _copy_embedded(tmp_path)
    w = _weights_file(folder)
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    monkeypatch.setenv(models.ENV_EMBEDDED, str(folder))
    with pytest.raises(WeightsError, match="sha256 mismatch.*corrupted"):
        load_dit("embedded")


def test_truncated_embedded_weights_give_clear_error(tmp_path, monkeypatch):
    folder = _copy_embedded(tmp_path)
    w = _weights_file(folder)
    w.write_bytes(w.read_bytes()[:1000])
    monkeypatch.setenv(models.ENV_EMBEDDED, str(folder))
    with pytest.raises(WeightsError, match="truncated"):
        load_dit("embedded")
    # without the manifest check the loader itself still refuses the file, with a readable message
    with pytest.raises(WeightsError, match="cannot load the DiT transformer"):
        load_dit(str(folder), verify=False)


def test_missing_embedded_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv(models.ENV_EMBEDDED, str(tmp_path / "nowhere"))
    with pytest.raises(MissingWeightsError, match="hqdit train-embedded"):
        load_dit("embedded")


def test_missing_dit_xl2_names_file_place_and_download(tmp_path, monkeypatch):
    monkeypatch.delenv(models.ENV_WEIGHTS, raising=False)
    with pytest.raises(MissingWeightsError) as err:
        load_dit(str(tmp_path / "DiT-XL-2-256x256.pt"))
    msg = str(err.value)
    for needle in ["DiT-XL-2-256x256.pt", str(tmp_path), "HQDIT_DIT_WEIGHTS",
                   "huggingface-cli download facebook/DiT-XL-2-256",
                   "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", "sd-vae-ft-ema"]:
        assert needle in msg, needle
    # None reads the environment variable
    monkeypatch.setenv(models.ENV_WEIGHTS, str(tmp_path / "DiT-XL-2-512"))
    with pytest.raises(MissingWeightsError, match="DiT-XL-2-512"):
        load_dit(None)


def test_original_checkpoint_roundtrip(tmp_path):
    src = tiny_dit(seed=3, width=144, heads=2, num_layers=2).transformer
    sd = to_original_state_dict(src)
    # the original DiT key layout
    for k in ["x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
              "y_embedder.embedding_table.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.bias",
              "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.1.adaLN_modulation.1.weight",
              "final_layer.adaLN_modulation.1.weight", "final_layer.linear.bias"]:
        assert k in sd, k
    assert not any(k.startswith("transformer_blocks") for k in sd)
    path = tmp_path / "DiT-tiny.pt"
    torch.save({"model": sd, "ema": sd}, path)
    b = load_dit(str(path))  # width 144 -> 2 heads of 72 inferred
    got = b.transformer
    assert got.config.num_attention_heads == 2 and got.config.num_layers == 2
    ref_sd, got_sd = src.state_dict(), got.state_dict()
    assert set(ref_sd) == set(got_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    assert torch.equal(_outputs(src), _outputs(got))
    assert b.decoder is models.identity_decoder and b.null_class == 4 and b.sha256["DiT-tiny.pt"]


def test_original_checkpoint_key_mismatch_lists_keys(tmp_path):
    sd = to_original_state_dict(tiny_dit().transformer)
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        load_dit(str(path), num_attention_heads=1)
    assert "transformer_blocks.1.ff.net.2.bias" in str(err.value) and "blocks.1.extra.weight" in str(err.value)


def test_garbage_checkpoint(tmp_path):
    path = tmp_path / "DiT-XL-2-256x256.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="weights_only"):
        load_dit(str(path))


def test_latent_checkpoint_without_vae_asks_for_it(tmp_path, monkeypatch):
    monkeypatch.delenv(models.ENV_VAE, raising=False)
    sd = to_original_state_dict(tiny_dit(in_channels=4).transformer)
    path = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save(sd, path)
    with pytest.raises(MissingWeightsError, match="sd-vae-ft-ema.*HQDIT_VAE|HQDIT_VAE.*sd-vae-ft-ema"):
        load_dit(str(path), num_attention_heads=1)


def test_diffusers_folder(tmp_path):
    b = tiny_dit(seed=1)
    b.transformer.save_pretrained(str(tmp_path / "transformer"))
    b.scheduler.save_pretrained(str(tmp_path / "scheduler"))
    got = load_dit(str(tmp_path))
    assert torch.equal(_outputs(b.transformer), _outputs(got.transformer))
    assert got.num_classes == 4 and got.null_class == 4 and got.image_size == 8
    assert got.scheduler.config.num_train_timesteps == 1000 and got.scheduler.config.beta_end == pytest.approx(0.02)


def test_dit_xl2_shaped_random_shapes():
    b = dit_xl2_shaped_random(seed=0, num_layers=1)  # full depth (28) is the default; 1 keeps the test fast
    c = b.transformer.config
    assert "RANDOM" in b.name and "untrained" in b.name
    assert (c.num_attention_heads, c.attention_head_dim, c.in_channels, c.out_channels, c.sample_size) == (16, 72, 4, 8, 32)
    assert (b.num_classes, b.null_class, b.latent_size) == (1000, 1000, 32)
    assert b.transformer.transformer_blocks[0].attn1.to_q.weight.shape == (1152, 1152)
    a = dit_xl2_shaped_random(seed=0, num_layers=1).transformer.state_dict()
    for k, v in b.transformer.state_dict().items():
        assert torch.equal(v, a[k])  # seeded


def test_original_checkpoint_with_vae_folder_samples_rgb(tmp_path, monkeypatch):
    """The DiT-XL/2 path end to end on tiny stand-ins: original .pt + a separate VAE folder."""
    from diffusers import AutoencoderKL

    from hqdit_utils.dit.sampling import sample

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16)
    vae.save_pretrained(str(tmp_path / "sd-vae-ft-ema"))
    sd = to_original_state_dict(tiny_dit(in_channels=4).transformer)
    torch.save(sd, tmp_path / "DiT-XL-2-256x256.pt")
    monkeypatch.setenv(models.ENV_VAE, str(tmp_path / "sd-vae-ft-ema"))
    b = load_dit(str(tmp_path / "DiT-XL-2-256x256.pt"), num_attention_heads=1)
    assert (b.latent_channels, b.latent_size, b.image_size, b.image_channels) == (4, 8, 16, 3)
    imgs = sample(b, [0, 3], num_steps=2, cfg_scale=1.5, seeds=[0, 1], progress=False)
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == torch.uint8


def test_named_dit_configs_are_the_configs_written_out_before():
    """``dit_config`` and its named sizes give exactly the dicts the package wrote out by hand before (the
    embedded model's weights and every run's key depend on them)."""
    from hqdit_utils.dit_configs import DiT_XL_2
    from hqdit_utils.runs.train_embedded import embedded_dit_config

    common = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", norm_elementwise_affine=False)
    assert DiT_XL_2() == dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                              num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000, **common)
    assert embedded_dit_config() == dict(num_attention_heads=2, attention_head_dim=72, in_channels=1, out_channels=2,
                                         num_layers=6, sample_size=16, patch_size=2, num_embeds_ada_norm=10, **common)
    assert DiT_XL_2(depth=1)["num_layers"] == 1
