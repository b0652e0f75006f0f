"""The training code of the embedded model on a tiny configuration (CI never retrains the real one),
the proxy classifier's interface, and the shipped manifest."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from hqdit_utils.runs import digits
from hqdit_utils.runs import train_embedded as te
from hqdit_utils.metrics.proxy_net import POOL_DIM, ProxyNet, load_proxy_net, preprocess
from hqdit_utils.dit.models import default_embedded_dir, load_dit

TINY = dict(width=72, num_layers=1, batch_size=16, steps=24, warmup_steps=4, log_every=4, lr=2e-3,
            checkpoint_every_s=1e9, proxy_epochs=1)


@pytest.fixture(scope="module")
def data():
    return digits.load_digits16()


def test_data_and_split(data):
    assert data.images.shape == (1797, 1, 16, 16) and data.images.min() == -1 and data.images.max() == 1
    assert len(data.train_idx) + len(data.heldout_idx) == 1797
    assert not set(data.train_idx.tolist()) & set(data.heldout_idx.tolist())
    again = digits.load_digits16()
    assert torch.equal(again.heldout_idx, data.heldout_idx)  # fixed split
    counts = torch.bincount(data.labels[data.heldout_idx], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 per class


def test_random_shift_moves_by_at_most_one_pixel():
    x = torch.full((64, 1, 16, 16), -1.0)
    x[:, :, 8, 8] = 1.0
    y = te.random_shift(x, torch.Generator().manual_seed(0), 1)
    pos = torch.nonzero(y[:, 0] == 1.0)[:, 1:]
    assert len(pos) == 64 and (pos - 8).abs().max() == 1 and len({tuple(p.tolist()) for p in pos}) > 4


def test_lr_schedule():
    cfg = te.TrainConfig(steps=1000, warmup_steps=100, lr=1e-3)
    assert te.lr_at(0, cfg) == pytest.approx(1e-5)
    assert te.lr_at(99, cfg) == pytest.approx(1e-3)
    assert te.lr_at(999, cfg) < 0.05 * 1e-3


def test_tiny_training_loss_decreases_and_resume_is_exact(tmp_path, data):
    cfg = te.TrainConfig(**TINY)
    ema_a, raw_a, st_a = te.train_dit(data, cfg, tmp_path / "a", progress=False, adaptive_threads=False)
    curve = st_a["loss_curve"]
    assert st_a["step"] == 24 and len(curve) == 6
    assert curve[-1][1] < 0.8 * curve[0][1], curve
    # interrupted after 10 steps, resumed by calling again with the same configuration
    _, _, st_b1 = te.train_dit(data, cfg, tmp_path / "b", progress=False, stop_after_steps=10, adaptive_threads=False)
    assert st_b1["step"] == 10 and (tmp_path / "b" / "train_state.pt").is_file()
    ema_b, raw_b, st_b = te.train_dit(data, cfg, tmp_path / "b", progress=False, adaptive_threads=False)
    assert st_b["step"] == 24
    for (k, va), vb in zip(raw_a.state_dict().items(), raw_b.state_dict().values()):
        assert torch.equal(va, vb), k
    for (k, va), vb in zip(ema_a.state_dict().items(), ema_b.state_dict().values()):
        assert torch.equal(va, vb), k
    # a different configuration refuses to resume someone else's checkpoint
    with pytest.raises(RuntimeError, match="different configuration"):
        te.train_dit(data, te.TrainConfig(**{**TINY, "lr": 1e-4}), tmp_path / "b", progress=False)


def test_shared_embedder_saved_untied(tmp_path):
    cfg = te.TrainConfig(**{**TINY, "num_layers": 2})
    model = te.build_dit(cfg.dit_config(), seed=0, tie=True)
    blocks = model.transformer_blocks
    assert blocks[0].norm1.emb is blocks[-1].norm1.emb
    plain = te.untied_copy(model, cfg.dit_config())
    assert plain.transformer_blocks[0].norm1.emb is not plain.transformer_blocks[-1].norm1.emb
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(model(x, timestep=t, class_labels=y).sample, plain(x, timestep=t, class_labels=y).sample)
    ema = te.build_dit(cfg.dit_config(), seed=1, tie=True)
    te.export_model(ema, cfg, tmp_path)
    b = load_dit(str(tmp_path))
    assert b.null_class == 10 and b.image_size == 16 and b.scheduler.config.beta_schedule == "linear"


def test_proxy_interface_and_training(data):
    net = ProxyNet()
    imgs = digits.to_uint8_nhwc(data.images[:5])
    assert imgs.dtype == torch.uint8 and imgs.shape == (5, 16, 16, 1)
    assert torch.allclose(preprocess(imgs), data.images[:5], atol=1 / 127.5)
    out = net(imgs)
    assert out["pool"].shape == (5, POOL_DIM) and out["spatial"].shape == (5, 64, 8, 8) and out["logits"].shape == (5, 10)
    with pytest.raises(TypeError):
        net(imgs.float().permute(0, 3, 1, 2).long())
    _net, info = te.train_proxy(data, te.TrainConfig(proxy_epochs=1), progress=False)
    assert 0.0 <= info["heldout_accuracy"] <= 1.0 and info["heldout_images"] == 360


def test_shipped_proxy_and_manifest(data):
    man = json.loads((default_embedded_dir() / "MANIFEST.json").read_text())
    for key in ["dataset", "model", "training", "proxy_classifier", "command", "files", "class_consistency"]:
        assert key in man, key
    assert man["command"].startswith("hqdit train-embedded")
    assert man["total_bytes"] < 25e6
    assert man["dataset"]["heldout_indices"] == data.heldout_idx.tolist()
    assert man["class_consistency"]["fraction"] >= 0.9
    net = load_proxy_net()
    acc = (net.predict(digits.to_uint8_nhwc(data.images[data.heldout_idx])) == data.labels[data.heldout_idx]).float().mean()
    assert acc.item() == pytest.approx(man["proxy_classifier"]["heldout_accuracy"], abs=1e-6)
    assert acc.item() >= 0.95


def test_cli_registers_commands():
    from hqdit_utils.commands.cli import build_parser

    args = build_parser("train-embedded").parse_args(["train-embedded", "--out", "x", "--steps", "3"])
    assert args.steps == 3 and callable(args.func)
    args = build_parser("sample").parse_args(["sample", "--out", "x.npz", "--n", "4"])
    assert args.n == 4 and callable(args.func)


def test_defaults_reproduce_the_shipped_model():
    """`hqdit train-embedded` with no options trains the shipped model: its manifest's configuration is the
    default TrainConfig (fails if a default or the shipped model changes without the other)."""
    manifest = json.loads((default_embedded_dir() / "MANIFEST.json").read_text())
    assert manifest["training"]["config"] == asdict(te.TrainConfig())
    assert manifest["training"]["steps"] == te.TrainConfig().steps
