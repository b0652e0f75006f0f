"""The proxy feature network of the embedded model: a small CNN classifier of 16×16 digits.

The embedded DiT (``data/embedded/``) draws 16×16 grey-scale digits, for which Inception-v3 features
are meaningless. The starred metrics (FID*, sFID*, IS*, precision*/recall*) therefore use this
classifier, trained by ``hqdit train-embedded`` on the same training split as the DiT, in the role
Inception-v3 plays for ImageNet:

==============  ==========================  =====================================================
output          shape                       Inception-v3 analogue
==============  ==========================  =====================================================
``pool``        ``[N, 128]`` float32        ``pool_3`` (2048-d) -> FID*, precision*/recall*
``spatial``     ``[N, 64, 8, 8]`` float32   ``mixed_6/conv`` (first 7 channels, 17×17) -> sFID*
                                            (pooled to 4×4 by ``ProxyExtractor``)
``logits``      ``[N, 10]`` float32         the 1008-way logits -> IS*
==============  ==========================  =====================================================

Input: ``uint8`` images in NHWC layout ``[N, 16, 16, 1]`` with values 0..255 — exactly the arrays the
sampler (:func:`hqdit_utils.dit.sampling.sample`) returns and the ADM ``.npz`` files store. A float
tensor NCHW in [-1, 1] is also accepted (see :func:`preprocess`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import DATA_DIR
from ..files import atomic_path, strict_json, write_text_atomic

#: Image side (pixels) the network expects.
IMAGE_SIZE = 16
#: Number of classes (the ten digits).
NUM_CLASSES = 10
#: Dimension of the pooled feature vector ``pool``.
POOL_DIM = 128
#: Channels and side of the intermediate spatial map ``spatial``.
SPATIAL_CHANNELS = 64
SPATIAL_SIZE = 8

#: File names inside the proxy folder.
WEIGHTS_FILE = "proxy_net.safetensors"
CONFIG_FILE = "config.json"


def default_proxy_dir() -> Path:
    """``$HQDIT_PROXY`` if set, else ``<data>/embedded/proxy`` of the repository."""
    env = os.environ.get("HQDIT_PROXY")
    if env:
        return Path(env)
    return Path(DATA_DIR) / "embedded" / "proxy"


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Convert sampler output to the network's input.

    Args:
        images: ``uint8`` tensor (or numpy array) ``[N, 16, 16, 1]`` (NHWC, values 0..255), or
            ``uint8`` ``[N, 16, 16]``; a floating tensor is taken to be NCHW ``[N, 1, 16, 16]`` already
            in [-1, 1] and returned as float32 unchanged.

    Returns:
        float32 tensor ``[N, 1, 16, 16]`` with values in [-1, 1]: ``x / 127.5 - 1`` — the inverse of the
        sampler's ``round((x + 1) * 127.5)``, so the network sees what the DiT was trained on.
    """
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(images)
    if images.is_floating_point():
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"float input must be NCHW [N, 1, 16, 16] in [-1, 1]; got shape {tuple(images.shape)}")
        return images.float()
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images (0..255) or float NCHW in [-1, 1]; got dtype {images.dtype}")
    if images.dim() == 3:
        images = images[..., None]
    if images.dim() != 4 or images.shape[-1] != 1:
        raise ValueError(f"expected uint8 NHWC images [N, {IMAGE_SIZE}, {IMAGE_SIZE}, 1]; got shape {tuple(images.shape)}")
    if images.shape[1] != IMAGE_SIZE or images.shape[2] != IMAGE_SIZE:
        raise ValueError(f"the proxy network expects {IMAGE_SIZE}x{IMAGE_SIZE} images; got {tuple(images.shape[1:3])}")
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class ProxyNet(nn.Module):
    """Five 3×3 convolutions (GroupNorm + SiLU), two 2×2 max-pools, global average pooling, one linear layer.

    ::

        [N,1,16,16] -> conv32 -> conv32 -> maxpool -> conv64 -> conv64 = spatial [N,64,8,8]
                    -> maxpool -> conv128 -> mean over 4×4 = pool [N,128] -> linear = logits [N,10]

    ``forward`` takes uint8 NHWC images (or float NCHW in [-1, 1]) and returns a dict with
    ``pool``, ``spatial`` and ``logits`` (all float32).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.stage1 = nn.Sequential(block(1, w), block(w, w))
        self.stage2 = nn.Sequential(block(w, 2 * w), block(2 * w, 2 * w))
        self.stage3 = block(2 * w, 4 * w)
        self.head = nn.Linear(4 * w, num_classes)
        self.num_classes = num_classes
        self.width = width

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = preprocess(images).to(self.head.weight.device)
        x = self.stage1(x)
        x = F.max_pool2d(x, 2)  # 16 -> 8
        spatial = self.stage2(x)  # [N, 2w, 8, 8]
        x = F.max_pool2d(spatial, 2)  # 8 -> 4
        x = self.stage3(x)
        pool = x.mean(dim=(2, 3))  # [N, 4w]
        logits = self.head(pool)
        return {"pool": pool, "spatial": spatial, "logits": logits}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Predicted class ``[N]`` (int64) of uint8 NHWC images, evaluated in batches."""
        was_training = self.training
        self.eval()
        out = [self(images[i : i + batch_size])["logits"].argmax(1).cpu() for i in range(0, len(images), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def save_proxy_net(net: ProxyNet, directory: str | Path, extra: dict | None = None) -> Path:
    """Write ``proxy_net.safetensors`` + ``config.json`` into ``directory`` (atomically per file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))
    cfg = {"class": "ProxyNet", "num_classes": net.num_classes, "width": net.width, "image_size": IMAGE_SIZE}
    cfg.update(extra or {})
    write_text_atomic(directory / CONFIG_FILE, strict_json(cfg, indent=2) + "\n")
    return directory / WEIGHTS_FILE


def load_proxy_net(path: str | Path | None = None, device: str | torch.device = "cpu") -> ProxyNet:
    """Load the shipped proxy classifier in eval mode.

    Args:
        path: the proxy folder (holding ``proxy_net.safetensors`` and ``config.json``) or the
            ``.safetensors`` file itself; default ``$HQDIT_PROXY`` or ``data/embedded/proxy``.
    Raises:
        FileNotFoundError: naming the file and the command that (re)creates it.
        RuntimeError: when the file is unreadable or its tensors do not fit the architecture.
    """
    path = Path(path) if path is not None else default_proxy_dir()
    weights = path if path.suffix == ".safetensors" else path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"proxy classifier weights not found: {weights} (looked in the argument `path` or $HQDIT_PROXY, "
            f"default data/embedded/proxy). Recreate them with: hqdit train-embedded --out data/embedded"
        )
    cfg_file = weights.parent / CONFIG_FILE
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    net = ProxyNet(num_classes=int(cfg.get("num_classes", NUM_CLASSES)), width=int(cfg.get("width", 32)))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise RuntimeError(f"cannot read proxy classifier weights {weights}: {err} (corrupted or truncated file?)") from err
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"proxy classifier {weights} does not fit ProxyNet: missing keys {missing}, unexpected keys {unexpected}")
    return net.to(device).eval()
