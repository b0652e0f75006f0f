"""Layer-level measurements for the chapters on outlier rotation (04) and GPTQ on FP grids (05).

Everything here works on one linear layer at a time: its FP32 weight ``W`` [out, in] and calibration
rows ``X`` [n, in] of its input (the calibration reservoir, :mod:`hqdit_utils.engine.calibration`). Nothing is
quantized inside the model; the functions answer "what would this layer's error be if …".

Quantizer conventions of these measurements (ours, chosen to isolate one effect at a time; they are
*not* the full HQ-DiT recipe of :mod:`hqdit_utils.engine.qmodel`, which adds format selection and clipping):

* weights: one max-abs scale per output row (``α = max|W_row|``), round to nearest on the grid;
* activations: one static max-abs scale per tensor (``α = max|X|`` over all calibration rows);
* rotation: ``Q = diag(s) · H / √n`` (:class:`Rotation`), a random Hadamard matrix of the full input
  order with the random signs applied *before* the mixing, to the weight rows (offline) and to the
  activation rows (online); the quantizers see ``W Q`` and ``X Q``. (With the signs *after* the
  mixing, ``H · diag(s)``, the signs change no magnitude and so no quantization error — see
  :class:`Rotation`.)

Errors are measured on the matmul ``X Wᵀ`` (the bias is never quantized and cancels out of every error).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import pandas as pd
import torch

from ..engine.formats import parse_format
from ..engine.gptq import GPTQ, rtn_quantize
from ..engine.hadamard import HadamardSpec, fast_hadamard_transform, hadamard_factors, hadamard_signs
from ..engine.layers import BLOCK_LINEARS, layer_kind
from ..engine.quantizer import fake_quantize, round_to_grid, sqnr_db
from ..timing import time_call

__all__ = [
    "BlockLinear", "block_linears", "crest_factor", "outlier_profile", "Rotation", "rotation_spec", "rotate_pair",
    "w4a4_errors", "rotation_table", "time_call", "rotation_cost", "split_rows", "output_error",
    "gptq_rtn_table", "energy_rank", "damping_sweep", "error_feedback_2d", "quantized_share", "ATTENTION_MATMULS",
]

@dataclass
class BlockLinear:
    """One block linear with its calibration inputs.

    Attributes:
        name: short name, ``"b{block}.{kind}"`` (e.g. ``"b3.fc2"``).
        block: block index; kind: one of :data:`~hqdit_utils.engine.layers.BLOCK_LINEARS`.
        weight: [out, in] float32 (a copy; ``qkv`` concatenates q, k, v).
        bias: [out] or ``None``.
        inputs: [n, in] float32 calibration rows of the layer input (all recorded timesteps).
        timesteps: [n] int64, the timestep each row was recorded at.
    """

    name: str
    block: int
    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    inputs: torch.Tensor
    timesteps: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def block_linears(model, calibration, kinds: Sequence[str] = tuple(BLOCK_LINEARS), *,
                  blocks: Iterable[int] | None = None) -> list[BlockLinear]:
    """The block linears of a diffusers DiT with their calibration rows, in block order.

    Args:
        model: a ``DiTTransformer2DModel`` (``bundle.transformer``).
        calibration: a :class:`~hqdit_utils.engine.calibration.Calibration` recorded with the default layer set.
        kinds: which of ``"qkv"``, ``"proj"``, ``"fc1"``, ``"fc2"``.
        blocks: block indices (default: all).
    """
    unknown = set(kinds) - set(BLOCK_LINEARS)
    if unknown:
        raise ValueError(f"unknown layer kinds {sorted(unknown)}; choose from {list(BLOCK_LINEARS)}")
    n_blocks = len(model.transformer_blocks)
    out = []
    for b in (range(n_blocks) if blocks is None else blocks):
        blk = model.transformer_blocks[b]
        for kind in kinds:
            mods = [blk.get_submodule(leaf) for leaf in BLOCK_LINEARS[kind]]
            w = torch.cat([m.weight.detach() for m in mods]).to(torch.float32).clone()
            bias = None
            if all(m.bias is not None for m in mods):
                bias = torch.cat([m.bias.detach() for m in mods]).to(torch.float32).clone()
            rec = calibration[f"transformer_blocks.{b}.{BLOCK_LINEARS[kind][0]}"]
            x, tags = rec.rows_by_timestep()
            out.append(BlockLinear(f"b{b}.{kind}", b, kind, w, bias, x.to(torch.float32), tags))
    return out


# --------------------------------------------------------------------------------------------------
# Rotation and W4A4 errors
# --------------------------------------------------------------------------------------------------
def crest_factor(x: torch.Tensor, dim: int | None = None) -> "float | torch.Tensor":
    """Crest factor ``max|x| / rms(x)``: over the whole tensor (``dim=None``, a float) or along ``dim``
    (a tensor, one value per slice). It is the number of "RMS units" a max-abs quantizer must reach, so
    it sets how coarse the grid is around the typical value: 1 for a ±c vector, √n for a one-hot one."""
    xd = x.detach().to(torch.float64)
    if dim is None:
        rms = xd.pow(2).mean().sqrt()
        return float(xd.abs().max() / rms) if rms > 0 else float("nan")
    rms = xd.pow(2).mean(dim=dim).sqrt()
    return xd.abs().amax(dim=dim) / rms


@dataclass(frozen=True)
class Rotation:
    """A random Hadamard rotation ``Q`` of order ``n`` with the ±1 signs on a chosen side.

    ``signs="before"``: ``Q = D H / √k`` — ``x Q`` flips the signs of the input channels, *then* mixes
    them (the randomised Hadamard transform of QuIP#/QuaRot, written for row vectors).
    ``signs="after"``: ``Q = H D / √k`` — mix first, flip the outputs' signs afterwards. Both are
    orthogonal, but only "before" randomises what the quantizer sees: with "after", ``|x Q| = |x H| / √k``
    element for element, and a sign-symmetric grid rounds ``-v`` to ``-round(v)``, so the signs change
    nothing. ``H`` is the ±1 Hadamard matrix of order ``n`` (``block=None``) or block-diagonal with
    blocks of order ``k = block``; ``D = diag(hadamard_signs(n, seed))`` (``seed=None``: no signs).

    Built from :func:`~hqdit_utils.engine.hadamard.fast_hadamard_transform` with no signs plus an explicit
    sign vector, so it does not depend on which side ``hadamard.random_hadamard`` puts its signs.
    """

    n: int
    seed: int | None = 0
    signs: str = "before"
    block: int | None = None

    def __post_init__(self) -> None:
        if self.signs not in ("before", "after"):
            raise ValueError(f"signs must be 'before' or 'after', got {self.signs!r}")
        HadamardSpec(self.n, seed=None, block=self.block)  # validates the order / block

    @property
    def _plain(self) -> HadamardSpec:
        return HadamardSpec(self.n, seed=None, block=self.block)

    def sign_vector(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return hadamard_signs(self.n, self.seed).to(dtype)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """``t Q`` for ``t`` [..., n] (fast transform)."""
        s = self.sign_vector(t.dtype).to(t.device)
        if self.signs == "before":
            return fast_hadamard_transform(t * s, self._plain)
        return fast_hadamard_transform(t, self._plain) * s

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``Q`` [n, n]."""
        h = self._plain.matrix(torch.float64)
        s = self.sign_vector(torch.float64)
        q = s[:, None] * h if self.signs == "before" else h * s[None, :]
        return q.to(dtype)


def outlier_profile(x: torch.Tensor) -> dict:
    """Where the large values of ``x`` [n, d] (rows = tokens) sit: ``tensor_crest`` (max/RMS of the whole
    tensor), ``row_crest`` (mean over rows of each row's own max/RMS: outliers *within* a token, which a
    rotation of the channels can spread) and ``token_ratio`` (largest row RMS / RMS of the tensor: whole
    tokens that are larger than the rest, which no rotation of the channels can change, since it keeps
    every row's norm)."""
    xd = x.detach().to(torch.float64)
    row_rms = xd.pow(2).mean(dim=1).sqrt()
    return {"tensor_crest": crest_factor(xd), "row_crest": float(crest_factor(xd, dim=1).mean()),
            "token_ratio": float(row_rms.max() / xd.pow(2).mean().sqrt())}


def rotation_spec(n: int, seed: int | None = 0, block: int | None = None, signs: str = "before") -> Rotation:
    """The random Hadamard rotation of order ``n`` used by these measurements (full order unless ``block``;
    signs before the mixing unless ``signs="after"``)."""
    return Rotation(n, seed=seed, signs=signs, block=block)


def rotate_pair(weight: torch.Tensor, x: torch.Tensor, rot: "Rotation | None"):
    """``(W Q, X Q)``; ``(W, X)`` for ``rot=None`` (``y = X Wᵀ = (X Q)(W Q)ᵀ`` since ``Q Qᵀ = I``)."""
    if rot is None:
        return weight, x
    return rot.apply(weight), rot.apply(x)


def w4a4_errors(weight: torch.Tensor, x: torch.Tensor, fmt: "str | Sequence[str]", rot: "Rotation | None" = None
                ) -> "dict | list[dict]":
    """Quantize a layer's weight (per-row max-abs) and input (per-tensor max-abs) onto ``fmt``, optionally
    after rotating both by ``rot``, and return SQNRs (dB) of the activation, the weight and the
    matmul output ``X Wᵀ`` (weight and activation quantized together), plus the crest factors the
    quantizers saw (activation: whole tensor; weight: mean over rows). With a sequence of formats, a
    list of dicts (the rotation and the reference output are computed once)."""
    w, xr = rotate_pair(weight.to(torch.float32), x.to(torch.float32), rot)
    y = x.to(torch.float64) @ weight.to(torch.float64).t()
    crests = {"act_crest": crest_factor(xr), "weight_crest": float(crest_factor(w, dim=1).mean())}
    out = []
    for f in ([fmt] if isinstance(fmt, str) else list(fmt)):
        wq = fake_quantize(w, f, axis=0)
        xq = fake_quantize(xr, f)
        yq = xq.to(torch.float64) @ wq.to(torch.float64).t()
        out.append({**crests, "act_sqnr_db": sqnr_db(xr, xq), "weight_sqnr_db": sqnr_db(w, wq),
                    "out_sqnr_db": sqnr_db(y, yq)})
    return out[0] if isinstance(fmt, str) else out


def rotation_table(layers: Sequence[BlockLinear], formats: Sequence[str] = ("fp4_e2m1", "int4"), *,
                   seed: int | None = 0, block: int | None = None, signs: str = "before",
                   rotations: Sequence[bool] = (False, True)):
    """One row per (layer, format, rotated): crest factors and W4A4 SQNRs (:func:`w4a4_errors`) without
    and/or with (``rotations``) the random Hadamard rotation (:func:`rotation_spec` with ``seed``,
    ``block``, ``signs``). Returns a pandas DataFrame."""
    rows = []
    for lay in layers:
        rot = rotation_spec(lay.in_features, seed, block, signs)
        for rotated in rotations:
            results = w4a4_errors(lay.weight, lay.inputs, list(formats), rot if rotated else None)
            for fmt, r in zip(formats, results):
                rows.append({"layer": lay.name, "block": lay.block, "kind": lay.kind, "format": str(parse_format(fmt)),
                             "rotated": rotated, **r})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Run-time cost of the online rotation
# --------------------------------------------------------------------------------------------------


def rotation_cost(widths: Sequence[int], rows: int = 256, *, out_features: Sequence[int] | None = None,
                  threads: int | None = 1, min_time: float = 0.05, repeats: int = 5, seed: int = 0):
    """Time the online rotation ``x → x Q`` of ``rows`` rows of each width, dense (``x @ Q``) and fast
    (:meth:`Rotation.apply`, the Kronecker-structured transform plus the sign flips), against the linear layer that consumes it
    (``x @ Wᵀ`` with ``W`` [out, n], ``out`` from ``out_features`` or ``n``).

    Runs with ``threads`` torch threads (restored afterwards; ``None`` keeps the current setting).
    Returns a DataFrame with times in µs, the rotation's share of the linear's time, and multiply-add
    counts per row (dense ``n²``; fast ``n·b + n·log2 p`` additions/multiplications, ``n = p·b``).
    """
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        out_rows = []
        for i, n in enumerate(widths):
            out = n if out_features is None else out_features[i]
            x = torch.randn(rows, n, generator=g)
            w = torch.randn(out, n, generator=g)
            rot = Rotation(n, seed=seed)
            q = rot.matrix()
            p, b, _ = hadamard_factors(n)
            t_dense = time_call(lambda: x @ q, min_time=min_time, repeats=repeats)
            t_fast = time_call(lambda: rot.apply(x), min_time=min_time, repeats=repeats)
            t_lin = time_call(lambda: x @ w.t(), min_time=min_time, repeats=repeats)
            out_rows.append({
                "width n": n, "factors p × b": f"{p} × {b}", "linear n→out": f"{n}→{out}",
                "dense x@Q µs": t_dense * 1e6, "fast µs": t_fast * 1e6, "linear µs": t_lin * 1e6,
                "fast / linear": t_fast / t_lin, "dense / linear": t_dense / t_lin,
                "ops/row dense": n * n, "ops/row fast": n * b + n * int(math.log2(p)) if p > 1 else n * b,
            })
        return pd.DataFrame(out_rows).set_index("width n")
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------------
# GPTQ vs round-to-nearest
# --------------------------------------------------------------------------------------------------
class _threads:
    """Context manager: run with ``n`` torch threads (``None``: leave the setting alone), then restore."""

    def __init__(self, n: int | None):
        self.n, self.old = n, None

    def __enter__(self):
        if self.n is not None:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            torch.set_num_threads(self.old)


def split_rows(x: torch.Tensor, eval_fraction: float = 0.5, seed: int = 0):
    """A seeded random split of the rows of ``x`` into ``(fit, eval)`` (disjoint, deterministic)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError("eval_fraction must be in (0, 1)")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_eval = max(1, int(round(eval_fraction * x.shape[0])))
    return x[perm[n_eval:]], x[perm[:n_eval]]


def output_error(x: torch.Tensor, weight: torch.Tensor, weight_q: torch.Tensor) -> float:
    """Relative squared error of the matmul output, ``‖X Wᵀ − X Ŵᵀ‖² / ‖X Wᵀ‖²`` (float64)."""
    xd = x.to(torch.float64)
    y = xd @ weight.to(torch.float64).t()
    d = xd @ (weight.to(torch.float64) - weight_q.to(torch.float64)).t()
    return float(d.pow(2).sum() / y.pow(2).sum())


def gptq_rtn_table(layers: Sequence[BlockLinear], formats: Sequence[str] = ("fp4_e2m1", "int4"), *,
                   rotations: Sequence[bool] = (False, True), percdamp: float = 0.01, blocksize: int = 128,
                   eval_fraction: float = 0.5, seed: int = 0, threads: int | None = None):
    """Weight-only quantization of each layer with round-to-nearest and with GPTQ, same per-row max-abs
    scale, optionally after the random Hadamard rotation. GPTQ's Hessian comes from a seeded
    ``1 - eval_fraction`` share of the calibration rows; errors (:func:`output_error`) are measured on
    the held-out rest (and on the fit rows, to expose over-fitting). Returns a DataFrame, one row per
    (layer, format, rotated), with both errors, the reduction in %, and the run time of each method.
    ``threads``: torch threads while it runs (restored afterwards; ``None`` keeps the current setting).
    GPTQ's column sweep is a sequence of small operations, which one thread runs fastest."""
    with _threads(threads):
        return _gptq_rtn_table(layers, formats, rotations, percdamp, blocksize, eval_fraction, seed)


def _gptq_rtn_table(layers, formats, rotations, percdamp, blocksize, eval_fraction, seed):
    rows = []
    for lay in layers:
        x_fit, x_eval = split_rows(lay.inputs, eval_fraction, seed)
        rot = rotation_spec(lay.in_features, seed)
        for rotated in rotations:
            w, xf = rotate_pair(lay.weight, x_fit, rot if rotated else None)
            _, xe = rotate_pair(lay.weight, x_eval, rot if rotated else None)
            t0 = time.perf_counter()
            gp = GPTQ(w).add_batch(xf)
            t_h = time.perf_counter() - t0
            for fmt in formats:
                t0 = time.perf_counter()
                w_rtn = rtn_quantize(w, fmt)
                t_rtn = time.perf_counter() - t0
                t0 = time.perf_counter()
                res = gp.quantize(fmt, blocksize=blocksize, percdamp=percdamp)
                t_gptq = time.perf_counter() - t0 + t_h
                e_rtn, e_gptq = output_error(xe, w, w_rtn), output_error(xe, w, res.weight)
                rows.append({
                    "layer": lay.name, "block": lay.block, "kind": lay.kind, "format": str(parse_format(fmt)),
                    "rotated": rotated, "rtn_err": e_rtn, "gptq_err": e_gptq,
                    "reduction_pct": 100.0 * (1.0 - e_gptq / e_rtn) if e_rtn > 0 else float("nan"),
                    "rtn_fit_err": output_error(xf, w, w_rtn), "gptq_fit_err": output_error(xf, w, res.weight),
                    "rtn_ms": 1e3 * t_rtn, "gptq_ms": 1e3 * t_gptq, "retries": res.retries,
                    "fit_rows": xf.shape[0], "eval_rows": xe.shape[0],
                })
    return pd.DataFrame(rows)


def energy_rank(x: torch.Tensor, energy: "float | Sequence[float]" = 0.99) -> "int | list[int]":
    """How many principal directions of the rows of ``x`` [n, d] (uncentred, i.e. of ``XᵀX``) hold the
    fraction ``energy`` of ``Σ x²`` (one int, or a list for a sequence of fractions). Small values mean
    the inputs live near a low-dimensional subspace — the situation in which GPTQ's error feedback can
    hide rounding error in the directions the inputs do not use."""
    energies = [energy] if isinstance(energy, (int, float)) else list(energy)
    if not all(0.0 < e <= 1.0 for e in energies):
        raise ValueError("energy must be in (0, 1]")
    xd = x.detach().to(torch.float64)
    s2 = torch.linalg.eigvalsh(xd.t() @ xd).clamp_min(0.0).flip(0)  # squared singular values, descending
    if s2.sum() == 0:
        out = [0] * len(energies)
    else:
        frac = torch.cumsum(s2, 0) / s2.sum()
        q = torch.tensor([e - 1e-12 for e in energies], dtype=torch.float64)
        out = [min(int(k) + 1, len(s2)) for k in torch.searchsorted(frac, q)]
    return out[0] if isinstance(energy, (int, float)) else out


def damping_sweep(layer: BlockLinear, fmt: str, percdamps: Sequence[float], *, fit_rows: int | None = None,
                  rotated: bool = True, blocksize: int = 128, eval_fraction: float = 0.5, seed: int = 0,
                  threads: int | None = None):
    """GPTQ on one layer for each damping ``percdamp`` (λ = percdamp · mean diag H), Hessian from the
    first ``fit_rows`` of the seeded fit split (all of it by default). Returns a DataFrame indexed by
    ``percdamp`` with the output error on the fit rows and on the held-out rows, and RTN's for reference.
    ``threads`` as in :func:`gptq_rtn_table`."""
    with _threads(threads):
        return _damping_sweep(layer, fmt, percdamps, fit_rows, rotated, blocksize, eval_fraction, seed)


def _damping_sweep(layer, fmt, percdamps, fit_rows, rotated, blocksize, eval_fraction, seed):
    x_fit, x_eval = split_rows(layer.inputs, eval_fraction, seed)
    if fit_rows is not None:
        x_fit = x_fit[:fit_rows]
    rot = rotation_spec(layer.in_features, seed) if rotated else None
    w, xf = rotate_pair(layer.weight, x_fit, rot)
    _, xe = rotate_pair(layer.weight, x_eval, rot)
    gp = GPTQ(w).add_batch(xf)
    w_rtn = rtn_quantize(w, fmt)
    rows = []
    for pd_ in percdamps:
        res = gp.quantize(fmt, blocksize=blocksize, percdamp=pd_)
        rows.append({"percdamp": pd_, "gptq_fit_err": output_error(xf, w, res.weight),
                     "gptq_eval_err": output_error(xe, w, res.weight),
                     "rtn_fit_err": output_error(xf, w, w_rtn), "rtn_eval_err": output_error(xe, w, w_rtn),
                     "retries": res.retries})
    return pd.DataFrame(rows).set_index("percdamp")


def error_feedback_2d(w: Sequence[float], hessian: torch.Tensor, fmt: str, scale: float = 1.0) -> dict:
    """GPTQ on a single weight row of two entries, step by step, for a figure.

    ``w`` = (w1, w2); ``hessian`` [2, 2] positive definite; the grid is ``fmt``'s grid times ``scale``.
    Returns (float64 tensors of shape [2]):

    * ``"w"``: the weight; ``"rtn"``: both entries rounded independently;
    * ``"updated"``: after rounding w1 to q1, w2 moved by the error feedback
      ``w2 + (w1 − q1)·H12/H22`` (the best continuous w2 given q1) — GPTQ's update with no damping;
    * ``"gptq"``: (q1, round(updated w2)); ``"best"``: the grid pair with the lowest loss (brute force);
    * ``"loss"``: a dict of the proxy loss ``(w − q)ᵀ H (w − q)`` of each point.
    """
    h = torch.as_tensor(hessian, dtype=torch.float64)
    if h.shape != (2, 2):
        raise ValueError("hessian must be 2 × 2")
    w = torch.as_tensor(w, dtype=torch.float64)

    def rnd(v):
        return (round_to_grid(torch.as_tensor(v / scale, dtype=torch.float32), fmt).to(torch.float64) * scale)

    rtn = rnd(w)
    q1 = rnd(w[0])
    w2_new = w[1] + (w[0] - q1) * h[0, 1] / h[1, 1]
    updated = torch.stack([q1, w2_new])
    gptq = torch.stack([q1, rnd(w2_new)])
    grid = parse_format(fmt).grid().to(torch.float64) * scale
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    cand = torch.stack([a.flatten(), b.flatten()], dim=1)
    d = w[None, :] - cand
    losses = ((d @ h) * d).sum(dim=1)
    best = cand[int(torch.argmin(losses))]

    def loss(q):
        e = w - q
        return float(e @ h @ e)

    pts = {"w": w, "rtn": rtn, "updated": updated, "gptq": gptq, "best": best}
    return {**pts, "loss": {k: loss(v) for k, v in pts.items()}}


# --------------------------------------------------------------------------------------------------
# what "W4A4" covers: share of weights and of multiply-adds in 4 bits
# --------------------------------------------------------------------------------------------------
#: Rows of the table, in order: kinds of computation in a diffusers DiT.
_ROWS = ("block linears (qkv, proj)", "block linears (fc1, fc2)", "adaLN modulation linears",
         "embedders (timestep, class, patch)", "final layer")
#: A block linear's kind (:func:`~hqdit_utils.engine.layers.layer_kind`) → its row.
_BLOCK_ROWS = {**dict.fromkeys(("to_q", "to_k", "to_v", "to_out"), _ROWS[0]), "fc1": _ROWS[1], "fc2": _ROWS[1],
               "adaln": _ROWS[2]}
#: Outside the block linears: a part of the module name → its row (first match wins).
_OTHER_ROWS = (("norm1.emb", _ROWS[3]), ("pos_embed", _ROWS[3]), ("proj_out", _ROWS[4]))
ATTENTION_MATMULS = "attention matmuls (QKᵀ, PV)"


def _kind(module: str) -> str:
    """The row of the module named ``module`` (a parameter counts in its module's row)."""
    if module.startswith("transformer_blocks.") and layer_kind(module) in _BLOCK_ROWS:
        return _BLOCK_ROWS[layer_kind(module)]
    return next((k for pat, k in _OTHER_ROWS if pat in module), "other")


def quantized_share(transformer, recipe="hqdit-w4a4", *, shared_embedders: bool = True):
    """Which share of a DiT's weights and of its multiply-adds a recipe puts in 4 (or its) bits.

    Counted, not typed: a weight-free twin of ``transformer`` (same diffusers config, built on the meta
    device, so DiT-XL/2's shapes cost nothing) runs one forward for one image at the model's own token
    count, with hooks that count every ``nn.Linear`` / ``nn.Conv2d`` multiply-add (``in · out`` per token)
    and the attention matmuls QKᵀ and PV (``2 · tokens² · width`` per block). A linear counts as
    quantized when ``recipe`` selects it (:func:`~hqdit_utils.engine.layers.select_linears`); the attention
    matmuls when the recipe sets ``quantize_attention``. Weights are the linears' weight matrices
    (their biases, norms and embedding tables stay FP32 and count as FP32 parameters).

    ``shared_embedders``: count the timestep/class embedder once, as the original DiT has it (diffusers
    keeps one copy per block; the embedded model ties them in training).

    Returns a ``pandas.DataFrame`` indexed by kind (block linears, adaLN modulation linears, embedders,
    final layer, attention matmuls) with ``parameters``, ``MACs``, ``quantized parameters``, ``quantized
    MACs``, plus a ``total`` row; ``df.attrs`` holds ``weight share``, ``MAC share`` and ``tokens``.
    """
    import pandas as pd
    import torch.nn as nn

    from ..engine.layers import select_linears
    from ..engine.recipes import get_recipe

    recipe = get_recipe(recipe)
    cls = type(transformer)
    with torch.device("meta"):
        twin = cls.from_config(transformer.config).eval()
    if recipe.is_identity and not recipe.quantize_attention:
        quantized = set()
    else:
        quantized = set(select_linears(twin, recipe.layers, recipe.exclude))
    attn_q = recipe.quantize_attention and recipe.attn_format != "fp32"

    def skip(name: str) -> bool:  # per-block embedder copies beyond the first
        return (shared_embedders and ".norm1.emb" in name
                and not name.startswith("transformer_blocks.0."))

    rows: dict = {}

    def add(kind, params=0, macs=0, q=False):
        r = rows.setdefault(kind, {"parameters": 0, "MACs": 0, "quantized parameters": 0, "quantized MACs": 0})
        r["parameters"] += params
        r["MACs"] += macs
        if q:
            r["quantized parameters"] += params
            r["quantized MACs"] += macs

    counted_params: set = set()
    hooks = []
    for name, mod in twin.named_modules():
        if skip(name):
            continue
        if isinstance(mod, nn.Linear):
            def hook(m, inp, out, name=name):
                tokens = int(torch.tensor(inp[0].shape[:-1]).prod())
                add(_kind(name), 0, tokens * m.in_features * m.out_features, name in quantized)
            hooks.append(mod.register_forward_hook(hook))
            add(_kind(name), mod.weight.numel(), 0, name in quantized)
            counted_params.add(id(mod.weight))
        elif isinstance(mod, nn.Conv2d):
            def hook(m, inp, out):
                k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
                add(_kind("pos_embed"), 0, out[0].numel() * k, False)
            hooks.append(mod.register_forward_hook(hook))
        elif hasattr(mod, "heads") and hasattr(mod, "to_q") and hasattr(mod, "inner_dim"):
            def hook(m, inp, out):
                x = inp[0] if inp else None
                tokens = x.shape[1] if x is not None else 0
                add(ATTENTION_MATMULS, 0, 2 * tokens * tokens * m.inner_dim, attn_q)
            hooks.append(mod.register_forward_hook(hook))
    # every other parameter (biases, norms, embedding tables) stays FP32
    for name, p in twin.named_parameters():
        if id(p) not in counted_params and not skip(name):
            add(_kind(name.rpartition(".")[0]), p.numel(), 0, False)
    cfg = transformer.config
    size, ch = cfg.sample_size, cfg.in_channels
    with torch.no_grad():
        twin(torch.empty(1, ch, size, size, device="meta"), timestep=torch.zeros(1, dtype=torch.long, device="meta"),
             class_labels=torch.zeros(1, dtype=torch.long, device="meta"))
    for h in hooks:
        h.remove()
    df = pd.DataFrame(rows).T
    order = [*_ROWS, ATTENTION_MATMULS, "other"]
    df = df.loc[[k for k in dict.fromkeys(order) if k in df.index]]
    df.loc["total"] = df.sum()
    df = df.astype("int64")
    df.attrs["weight share"] = float(df.loc["total", "quantized parameters"] / df.loc["total", "parameters"])
    df.attrs["MAC share"] = float(df.loc["total", "quantized MACs"] / df.loc["total", "MACs"])
    df.attrs["tokens"] = (size // cfg.patch_size) ** 2
    return df


def w4a4_scope(transformer, recipe="hqdit-w4a4") -> str:
    """The text of the book's "W4A4 here means …" box, with every share computed by :func:`quantized_share`
    for ``transformer`` (the model on the page) and for DiT-XL/2 (shapes only). Markdown, one paragraph."""
    from ..dit.models import dit_xl2_meta

    here = quantized_share(transformer, recipe)
    xl = quantized_share(dit_xl2_meta(), recipe)
    ada = lambda d: d.loc["adaLN modulation linears", "parameters"] / d.loc["total", "parameters"]  # noqa: E731
    att = lambda d: d.loc[ATTENTION_MATMULS, "MACs"] / d.loc["total", "MACs"]  # noqa: E731
    return (
        "**4-bit**: the weights and the input activations of the four token-wise linears of every block "
        "(`qkv`, `proj`, `fc1`, `fc2`; the HQ-DiT recipe also rotates their inputs). **FP32**: the adaLN "
        "modulation linears, the timestep/class/patch embedders, the final layer, all biases and norms, and "
        "the attention matmuls QKᵀ and PV (their inputs Q, K, V, P are not quantized unless a row says so). "
        f"Counted by `analysis.quantized_share`: on the embedded model ({here.attrs['tokens']} tokens) that is "
        f"**{here.attrs['weight share']:.0%} of the parameters and {here.attrs['MAC share']:.0%} of the "
        f"multiply-adds** of one forward pass (adaLN linears: {ada(here):.0%} of the parameters; attention "
        f"matmuls: {att(here):.0%} of the multiply-adds); on DiT-XL/2 at 256 px ({xl.attrs['tokens']} tokens) "
        f"**{xl.attrs['weight share']:.0%} of the parameters and {xl.attrs['MAC share']:.0%} of the "
        f"multiply-adds** (adaLN linears: {ada(xl):.0%} of the parameters; attention matmuls: {att(xl):.0%} "
        "of the multiply-adds). The VAE decoder of DiT-XL/2 is not counted.")
