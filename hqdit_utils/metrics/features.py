"""Feature extractors: one interface, three implementations.

Every metric in this package is computed from three outputs of a feature network applied to uint8
NHWC images:

============  =======================  ===========================  ================================
key           shape                    Inception-v3 (ADM)           used by
============  =======================  ===========================  ================================
``pool``      ``[N, D]`` float32       pool_3, D = 2048             FID, precision/recall
``spatial``   ``[N, C, h, w]`` float32  mixed_6/conv, 192×17×17     sFID (first 7 channels, NHWC)
``logits``    ``[N, K]`` float32       1008 logits without bias     Inception Score
============  =======================  ===========================  ================================

* :class:`InceptionExtractor` — torch-fidelity's TF-exact port of the 2015-12-05 Inception-v3 that
  the ADM evaluator uses, read from a **local** weights file (never downloaded at run time). Only its
  numbers are comparable with published FID/sFID/IS/precision/recall.
* :class:`ProxyExtractor` — the embedded model's small digit classifier
  (:mod:`hqdit_utils.metrics.proxy_net`); its metrics are *proxy* metrics, printed with a star
  (FID*, sFID*, IS*, P*, R*).
* :class:`CallableExtractor` — any user function returning that dict (also starred).

``extractor.name`` and ``extractor.weights_checksum`` (sha256) travel with every
:class:`~hqdit_utils.metrics.adm.MetricReport`, so every number says which network made it.
"""
from __future__ import annotations

import abc
import io
import os
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from ..files import load_error_reason, sha256_file, state_dict_sha256
from ..images import check_images
from ..dit.models import check_device
from .proxy_net import WEIGHTS_FILE, default_proxy_dir, load_proxy_net
from .sfid import TORCH_FIDELITY_SPATIAL_MODULE

#: File name of torch-fidelity's Inception-v3 weights (a re-upload of pytorch-fid's
#: ``pt_inception-2015-12-05-6726825d.pth``: the same bytes, see torch-fidelity's v0.2.0 release notes).
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
#: Where to download it (torch-fidelity's release; pytorch-fid's ``fid_weights`` release has the same file).
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
#: sha256 of the file. The "6726825d" in its name is the prefix of this digest (torch.hub's naming rule);
#: the full digest and size are those of the Git-LFS copies of the same file on the Hugging Face Hub.
INCEPTION_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
#: Size of the file in bytes (~95.6 MB).
INCEPTION_WEIGHTS_SIZE = 95_628_359
#: Environment variable naming the weights file.
INCEPTION_WEIGHTS_ENV = "HQDIT_INCEPTION_WEIGHTS"

#: Keys an extractor may return; ``pool`` is required.
FEATURE_KEYS = ("pool", "spatial", "logits")


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


class FeatureExtractor(abc.ABC):
    """A feature network: ``extractor(images)`` → ``{"pool", "spatial", "logits"}``.

    Attributes:
        name: identifies the network in reports (e.g. ``"inception-v3-tf-2015-12-05"``).
        weights_checksum: sha256 of its weights (file or state dict), ``None`` if unknown.
        proxy: ``True`` unless the numbers are ADM-comparable Inception metrics; proxy metrics are
            printed with a star.
        image_channels: channel count the network needs, or ``None`` if it checks inputs itself.
    """

    name: str
    weights_checksum: str | None = None
    proxy: bool = True
    image_channels: int | None = None

    def __call__(self, images) -> dict[str, np.ndarray]:
        """Features of one batch.

        Args:
            images: uint8 ``[N, H, W, C]`` (see :func:`check_images`).

        Returns:
            dict with float32 ``pool`` ``[N, D]`` and, when the network provides them, ``spatial``
            ``[N, C', h, w]`` and ``logits`` ``[N, K]``.

        Raises:
            TypeError / ValueError: bad images (:func:`check_images`), or outputs with a wrong shape
            or NaN/inf values (naming the extractor).
        """
        images = check_images(images, self.image_channels)
        raw = self._extract(images)
        unknown = set(raw) - set(FEATURE_KEYS)
        if "pool" not in raw or unknown:
            raise ValueError(f"feature extractor {self.name!r} must return 'pool' (+ optional 'spatial', 'logits'); got keys {sorted(raw)}")
        n = len(images)
        out = {}
        for key, ndim in (("pool", 2), ("spatial", 4), ("logits", 2)):
            if raw.get(key) is None:
                continue
            value = _to_numpy(raw[key])
            if value.ndim != ndim or value.shape[0] != n:
                raise ValueError(f"feature extractor {self.name!r}: {key!r} must have {ndim} dims and {n} rows; got shape {value.shape}")
            if not np.isfinite(value).all():
                bad = int((~np.isfinite(value.reshape(n, -1))).any(axis=1).sum())
                raise ValueError(f"feature extractor {self.name!r} returned NaN/inf {key!r} features for {bad} of {n} images")
            out[key] = value
        return out

    @abc.abstractmethod
    def _extract(self, images: np.ndarray) -> Mapping[str, object]:
        """Raw features of validated uint8 NHWC images (tensors or arrays)."""

    def __repr__(self) -> str:
        checksum = (self.weights_checksum or "unknown")[:12]
        return f"{type(self).__name__}(name={self.name!r}, sha256={checksum}…, proxy={self.proxy})"


def default_inception_weights() -> Path:
    """Where the weights are looked for when no path is given: ``$HQDIT_INCEPTION_WEIGHTS``, else
    torch-fidelity's own download cache ``<torch hub dir>/checkpoints/<file>``."""
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env:
        return Path(env)
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _missing_weights_message(path: Path) -> str:
    return (
        f"Inception-v3 weights not found at {path}.\n"
        f"Needed: {INCEPTION_WEIGHTS_FILE} ({INCEPTION_WEIGHTS_SIZE:,} bytes, sha256 {INCEPTION_WEIGHTS_SHA256}) — "
        "torch-fidelity's PyTorch port of the TF Inception graph used by the ADM evaluator.\n"
        f"Get it (on a machine with internet access):\n    curl -L -o {INCEPTION_WEIGHTS_FILE} {INCEPTION_WEIGHTS_URL}\n"
        "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth is the same file.) Then either put it at\n"
        f"    {Path(torch.hub.get_dir()) / 'checkpoints' / INCEPTION_WEIGHTS_FILE}\n"
        f"or anywhere and pass its path: `weights=` / `hqdit evaluate --inception-weights PATH` / ${INCEPTION_WEIGHTS_ENV}.\n"
        "For the embedded model use the proxy network instead (ProxyExtractor, `hqdit evaluate --proxy`)."
    )


def _build_inception(state_dict: dict | None) -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with ``state_dict`` (``None``: PyTorch's random init).

    torch-fidelity reads weights itself, by unpickling them without restriction (or from the internet);
    we hand it an empty dict instead and load the (safely read) state dict ourselves, strictly.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # deferred: optional, heavy (TensorFlow-compatible Inception)

    class _Inception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state, strict=True, assign=False):  # called by the parent's __init__
            if state_dict is None:
                return None
            return super().load_state_dict(state_dict, strict=True)

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return _Inception("hqdit-inception-v3", ["2048", "logits_unbiased"], feature_extractor_weights_path=empty)


class InceptionExtractor(FeatureExtractor):
    """The ADM evaluator's Inception-v3, through torch-fidelity, from a local weights file.

    Outputs for uint8 ``[N, H, W, 3]`` images of any size (resized to 299×299 with TF1's bilinear rule,
    as the TF graph does): ``pool`` ``[N, 2048]`` (pool_3), ``spatial`` ``[N, 192, 17, 17]`` (the output of
    ``Mixed_6d.branch1x1`` = TF ``mixed_6/conv:0``, see :mod:`.sfid`), ``logits`` ``[N, 1008]`` (pool_3
    times the final layer's weights, no bias — ADM's Inception Score input).

    Args:
        weights: path to ``weights-inception-2015-12-05-6726825d.pth``; default
            :func:`default_inception_weights` (``$HQDIT_INCEPTION_WEIGHTS`` or torch's hub cache).
        device: where the network runs.
        verify: check the file's sha256 against :data:`INCEPTION_WEIGHTS_SHA256` (a different file
            gives numbers that are not comparable with published ones; pass ``False`` to use it anyway,
            its own sha256 is then reported and the metrics are starred).

    Raises:
        FileNotFoundError: the weights file is missing (the message says what to download and where to put it).
        ValueError: the file's sha256 differs and ``verify`` is on, or it cannot be read safely (truncated, or
            pickled objects other than tensors).
    """

    image_channels = 3

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu", verify: bool = True):
        path = Path(weights) if weights is not None else default_inception_weights()
        if not path.is_file():
            raise FileNotFoundError(_missing_weights_message(path))
        checksum = sha256_file(path)
        if checksum != INCEPTION_WEIGHTS_SHA256 and verify:
            raise ValueError(
                f"{path} has sha256 {checksum}, not the expected {INCEPTION_WEIGHTS_SHA256} of {INCEPTION_WEIGHTS_FILE} "
                f"({INCEPTION_WEIGHTS_SIZE:,} bytes; this file has {path.stat().st_size:,}). Re-download it from "
                f"{INCEPTION_WEIGHTS_URL}, or pass verify=False to use these weights with starred (non-ADM) metrics."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated file, or pickled objects other than tensors: refused unread
            raise ValueError(f"cannot read Inception weights {path} with torch.load(weights_only=True) "
                             f"({load_error_reason(err)}); re-download them from {INCEPTION_WEIGHTS_URL}") from err
        self._init(_build_inception(state), device, checksum, proxy=checksum != INCEPTION_WEIGHTS_SHA256)
        self.name = "inception-v3-tf-2015-12-05" + ("" if checksum == INCEPTION_WEIGHTS_SHA256 else "-unverified")

    @classmethod
    def with_random_weights(cls, seed: int = 0, device: str | torch.device = "cpu") -> "InceptionExtractor":
        """The same network with random weights — for shape and plumbing tests only (metrics are starred)."""
        torch.manual_seed(seed)
        self = cls.__new__(cls)
        net = _build_inception(None)
        self._init(net, device, state_dict_sha256(net), proxy=True)
        self.name = f"inception-v3-RANDOM-seed{seed}"
        return self

    def _init(self, net: torch.nn.Module, device, checksum: str, proxy: bool) -> None:
        self.device = check_device(device)
        self.net = net.to(self.device).eval()
        self.weights_checksum = checksum
        self.proxy = proxy
        self._spatial: torch.Tensor | None = None
        self.net.get_submodule(TORCH_FIDELITY_SPATIAL_MODULE).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = output

    @torch.inference_mode()
    def _extract(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(self.device)  # uint8 NCHW
        pool, logits = self.net(x)
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "spatial": spatial, "logits": logits}


def _proxy_weights_file(path: str | Path | None) -> Path:
    """The safetensors file :func:`~.proxy_net.load_proxy_net` reads for ``path``."""
    p = Path(path) if path is not None else default_proxy_dir()
    return p if p.suffix == ".safetensors" else p / WEIGHTS_FILE


class ProxyExtractor(FeatureExtractor):
    """The embedded model's proxy classifier as a feature extractor (starred metrics).

    The network (``proxy_net.ProxyNet``) takes uint8 ``[N, 16, 16, 1]`` digits and returns ``pool``
    ``[N, 128]`` (FID*, P*/R*), ``spatial`` ``[N, 64, 4, 4]`` (sFID*: first 7 channels, NHWC → 112-d)
    and ``logits`` ``[N, 10]`` (IS*).

    The network's 8×8 map is average-pooled to 4×4 (:data:`SPATIAL_SIDE`) before sFID* sees it (our
    choice): 7 × 8 × 8 = 448 features would exceed both the 360 held-out reference images and the few
    hundred samples of a book run, so both covariance matrices would be singular; 112 features keep them
    full-rank.

    Args:
        net: a module with that interface; default: :func:`proxy_net.load_proxy_net` (``path``).
        path: proxy folder or ``.safetensors`` file when ``net`` is not given (default
            ``$HQDIT_PROXY`` or ``data/embedded/proxy``).
        device: where the network runs.
        name: report name.

    ``weights_checksum`` is the sha256 of the safetensors file (as listed in ``data/embedded/MANIFEST.json``)
    when loaded from disk, else of ``net``'s state dict.
    """

    def __init__(self, net: torch.nn.Module | None = None, *, path: str | Path | None = None,
                 device: str | torch.device = "cpu", name: str = "proxy-digits-cnn"):
        if net is not None and path is not None:
            raise ValueError("give either `net` or `path`, not both")
        self.device = check_device(device)
        if net is None:
            net = load_proxy_net(path, device=self.device)
            self.weights_checksum = sha256_file(_proxy_weights_file(path))
        else:
            self.weights_checksum = state_dict_sha256(net)
        self.net = net.to(self.device).eval()
        self.name = name

    #: Side of the spatial map handed to sFID* (pooled from the network's 8×8).
    SPATIAL_SIDE = 4

    @torch.inference_mode()
    def _extract(self, images: np.ndarray) -> Mapping[str, torch.Tensor]:
        out = dict(self.net(torch.from_numpy(np.ascontiguousarray(images)).to(self.device)))
        out["spatial"] = torch.nn.functional.adaptive_avg_pool2d(out["spatial"], self.SPATIAL_SIDE)
        return out


class CallableExtractor(FeatureExtractor):
    """Wrap any function ``fn(images uint8 [N, H, W, C]) -> {"pool": [N, D], "spatial"?: [N, C, h, w], "logits"?: [N, K]}``
    (numpy arrays or tensors). Missing ``spatial``/``logits`` make sFID/IS unavailable (reported as NaN).

    Args:
        fn: the feature function.
        name: report name.
        weights_checksum: sha256 of whatever defines ``fn``, if known.
        proxy: whether its metrics are starred (default ``True``: only the ADM Inception is not a proxy).
    """

    def __init__(self, fn: Callable[[np.ndarray], Mapping[str, object]], name: str,
                 weights_checksum: str | None = None, proxy: bool = True):
        self.fn = fn
        self.name = name
        self.weights_checksum = weights_checksum
        self.proxy = proxy

    def _extract(self, images: np.ndarray) -> Mapping[str, object]:
        return self.fn(images)
