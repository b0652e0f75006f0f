"""Inception Score with the ADM evaluator's conventions.

IS = exp( E_x KL( p(y|x) || p(y) ) ), where p(y|x) is the classifier's softmax for image x and p(y)
the mean softmax over the images of one split. It is 1 when every image gets the same prediction
(for instance a uniform one) and K when the images are confidently and evenly spread over K classes.

ADM conventions (``guided-diffusion/evaluations/evaluator.py``, ``compute_inception_score``):

* the logits are pool_3 (2048-d) times the ``softmax/logits/MatMul`` weights **without the bias**
  — torch-fidelity's ``logits_unbiased`` feature (1008 classes); :class:`~.features.InceptionExtractor`
  returns exactly these as ``logits``;
* the samples are cut into consecutive splits of ``split_size = 5000`` images (the last one may be
  shorter; 50,000 samples give 10 splits, 1,000 samples one split); the score is the mean over
  splits of exp(mean KL). (The "10 equal splits" of improved-GAN's script is a different convention
  and gives different numbers for other sample counts.)

Terms with p(y|x) = 0 contribute 0 (the limit of p log p), so exactly one-hot probabilities work.
"""
from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, xlogy

#: ADM's split size.
ADM_SPLIT_SIZE = 5000


def inception_score(logits=None, *, probs=None, split_size: int = ADM_SPLIT_SIZE) -> float:
    """Inception Score of ``N`` images from their class logits or probabilities.

    Args:
        logits: ``[N, K]`` unnormalised class scores (softmax is applied in float64), or
        probs: ``[N, K]`` class probabilities (rows summing to 1); give exactly one of the two.
        split_size: images per split (ADM: 5000; consecutive, last split may be shorter).

    Returns:
        the mean over splits of exp(mean KL(p(y|x) || p(y))), a float in [1, K].

    Raises:
        ValueError: neither or both inputs, wrong shape, no images, NaN/inf, or rows that are not
            probability distributions.
    """
    if (logits is None) == (probs is None):
        raise ValueError("give exactly one of `logits` or `probs`")
    x = np.asarray(logits if logits is not None else probs, dtype=np.float64)
    name = "logits" if logits is not None else "probs"
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [N, classes]; got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf")
    if split_size < 1:
        raise ValueError(f"split_size must be >= 1; got {split_size}")
    if logits is not None:
        p = np.exp(log_softmax(x, axis=1))
    else:
        if (x < 0).any() or not np.allclose(x.sum(axis=1), 1.0, atol=1e-4):
            raise ValueError("probs must be non-negative with rows summing to 1 (pass `logits=` for raw scores)")
        p = x
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        # p log p - p log p(y), with 0 log 0 = 0; p(y) > 0 wherever p > 0.
        kl = (xlogy(part, part) - xlogy(part, np.broadcast_to(marginal, part.shape))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))
