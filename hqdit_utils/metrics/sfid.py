"""sFID: the Fréchet distance of *spatial* features, as the ADM evaluator computes it.

FID compares globally pooled features, so it barely sees spatial structure. Nash et al. (2021)
introduced sFID, and the ADM evaluator (``guided-diffusion/evaluations/evaluator.py``) fixed the
recipe every diffusion paper since reports, HQ-DiT included:

1. take the TF Inception graph's tensor ``mixed_6/conv:0`` — NHWC ``[N, 17, 17, 192]`` for the 299×299
   input the graph resizes every image to;
2. keep its first 7 channels: ``[N, 17, 17, 7]``;
3. flatten each image's map **in NHWC order** (numpy ``reshape(N, -1)`` of the TF tensor) into
   17 · 17 · 7 = 2023 numbers;
4. fit a Gaussian to the 2023-d vectors and take the Fréchet distance (:mod:`.frechet`).

Which torch-fidelity module is ``mixed_6/conv:0``?
---------------------------------------------------
**``Mixed_6d.branch1x1``** (its output after BatchNorm and ReLU, ``[N, 192, 17, 17]``), equivalently
the first 192 channels of ``Mixed_6d``'s output, because ``InceptionC`` concatenates ``branch1x1``
first. The evidence:

* torch-fidelity built its weights from that very graph (``classify_image_graph_def.pb`` of
  ``inception-2015-12-05.tgz``, the file the ADM evaluator loads), and its conversion script
  ``utils/util_convert_inception_weights.py`` maps ``mixed_6/conv/conv2d_params`` →
  ``Mixed_6d.branch1x1.conv`` and ``mixed_6/conv/batchnorm`` → ``Mixed_6d.branch1x1.bn``. Inside the
  scope ``mixed_6/conv`` the weights (``conv2d_params``), the convolution and the batch norm are ops of
  their own, so the op named ``mixed_6/conv`` itself is the one that closes the unit — the ReLU — and
  ``mixed_6/conv:0`` is ``relu(bn(conv(x)))``, exactly what ``BasicConv2d`` returns.
* The graph numbers its Inception blocks from zero — ``mixed, mixed_1, …, mixed_10`` are torchvision's
  ``Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c`` — so ``mixed_6`` is the *seventh* block,
  ``Mixed_6d``; and inside a block ``conv`` is the 1×1 branch while ``tower``, ``tower_1``, ``tower_2`` are
  the 7×7, double-7×7 and pool branches.
* guided-diffusion issue #109 reached the same answer ("the first 192 channels of mixed_6d"), and the
  PyTorch port in lavinal712/ADM-evaluation-suite-pytorch matched the TF evaluator's sFID only after
  PR #2 switched to torch-fidelity's network *and* fixed the tensor layout (below).

The two known ways a port gets sFID wrong
-----------------------------------------
* **Wrong block.** Reading "mixed_6" as "a Mixed_6 block" and taking ``Mixed_6a`` (the 35→17
  reduction) or ``Mixed_6e`` (the last 17×17 block, whose pooled output is torch-fidelity's "768"
  feature) gives a 2023-d vector of *different* features: a plausible-looking number that matches no
  published table. The shape (17×17) is the same for all of them, so nothing fails.
* **NCHW flattening.** PyTorch returns ``[N, C, H, W]``; ``x[:, :7].reshape(N, -1)`` orders the 2023
  numbers channel-major, TF's ``[N, H, W, C]`` orders them position-major. The Fréchet distance is
  invariant to a permutation of coordinates applied to *both* sides, so a port that flattens NCHW
  everywhere agrees with itself — and is silently wrong as soon as one side is the ADM reference
  batch's precomputed ``mu_s, sigma_s`` (``VIRTUAL_imagenet256_labeled.npz``), which were computed in
  NHWC order. Comparing NCHW sample statistics with NHWC reference statistics gives an sFID of
  hundreds (the port above reported sFID ≈ 299 for a model whose published sFID is single-digit, in
  guided-diffusion issue #159, before the layout fix). ``tests/test_metrics.py`` shows both facts.

:func:`spatial_features` implements steps 2–3 for any ``[N, C, h, w]`` map, so the embedded proxy
network (8×8 maps) goes through the same code path as Inception (17×17).
"""
from __future__ import annotations

import numpy as np

#: The TF tensor the ADM evaluator reads for sFID.
TF_SPATIAL_TENSOR = "mixed_6/conv:0"
#: The torch-fidelity ``FeatureExtractorInceptionV3`` sub-module whose output is that tensor (NCHW).
TORCH_FIDELITY_SPATIAL_MODULE = "Mixed_6d.branch1x1"
#: Channels of the spatial map kept by the evaluator (``spatial[..., :7]``).
SFID_CHANNELS = 7
#: Length of Inception's sFID vector: 17 · 17 · 7.
INCEPTION_SFID_DIM = 17 * 17 * SFID_CHANNELS


def spatial_features(spatial_map, channels: int = SFID_CHANNELS) -> np.ndarray:
    """Flatten the first ``channels`` channels of a spatial map in NHWC order, as the ADM evaluator does.

    Args:
        spatial_map: ``[N, C, h, w]`` (NCHW, the layout PyTorch modules produce), float; ``C >= channels``.
        channels: how many leading channels to keep (7 for sFID).

    Returns:
        float32 ``[N, h · w · channels]``: element ``(y · w + x) · channels + c`` is channel ``c`` at
        row ``y``, column ``x`` — the order of TF's ``spatial[..., :channels].reshape(N, -1)``.
        For Inception (``[N, 192, 17, 17]``) that is ``[N, 2023]``.
    """
    x = np.asarray(spatial_map)
    if x.ndim != 4:
        raise ValueError(f"spatial map must be NCHW [N, C, h, w]; got shape {x.shape}")
    if x.shape[1] < channels:
        raise ValueError(f"spatial map has {x.shape[1]} channels, fewer than the {channels} sFID keeps")
    return np.ascontiguousarray(x[:, :channels].transpose(0, 2, 3, 1), dtype=np.float32).reshape(x.shape[0], -1)
