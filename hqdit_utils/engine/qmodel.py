"""``quantize_(model, recipe, calibration)``: swap a DiT's linears for fake-quantized ones, in place.

Per selected layer, six steps (which choices are the paper's and which are ours:
book/choices.md#choices-order):

1. **calibration rows** ``X`` [n, in] (the calibration reservoir, pooled over timesteps,
   deterministically subsampled to ``recipe.max_calib_rows``) and the FP32 weight ``W`` [out, in];
2. **smoothing** (SmoothQuant baseline only): ``X ← X / s``, ``W ← W · s``;
3. **rotation** (``recipe.rotation``): ``W ← W Q`` offline, ``X ← X Q`` (and online at run time), with a
   random Hadamard ``Q`` — *before* format selection and clipping;
4. **weight format** (fixed, or per layer by :func:`~hqdit_utils.engine.format_select.choose_format`) and
   per-row α from the clipping search;
5. **weight rounding**: round-to-nearest, or GPTQ with the Hessian of the (rotated) ``X`` and the per-row
   α fixed in step 4 (``recipe.gptq``) — computed ONCE and stored in the module;
6. **activation format and α** (static per tensor, optionally per timestep group) or γ (dynamic per
   token), searched with the already-quantized weight when the loss is the layer-output error.

The run-time module is :class:`~hqdit_utils.engine.qlinear.QuantLinear`; :func:`save_quantized` /
:func:`load_quantized` write and rebuild its buffers.
"""
from __future__ import annotations

import json
import math
import os
import time
import types
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import lowbit
from .calibration import Calibration, LayerCalibration, warn_other_weights, weight_fingerprint
from .clipping import ClipResult, alpha_to_scale, clip_activation, clip_weight, gamma_grid
from ..errors import QuantizationError
from .export import load_packed, save_packed
from ..files import MANIFEST, IntegrityError, sha256_file, strict_json, verify_files, write_json_atomic, write_manifest
from .format_select import FormatChoice, FormatPlan, LayerFormat, choose_format, ratio_statistics
from .formats import NoFormat, parse_format
from .gptq import GPTQ
from .hadamard import HadamardSpec, is_supported, rotate_input, rotate_weight
from .layers import LayerSelectionError, select_linears
from .qlinear import QuantAttnProcessor, QuantLinear, SharedInput, TimestepContext
from .quantizer import (block_fake_quantize, block_weight_scales, fake_quantize, round_to_grid, sqnr_db,
                        token_fake_quantize)
from .recipes import AUTO, QuantRecipe, get_recipe

__all__ = ["QuantizationError", "LayerReport", "QuantReport", "quantize_", "check_rotation", "is_quantized", "save_quantized",
           "load_quantized", "save_pretrained_quantized", "is_pretrained_folder", "folder_tag"]


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One quantized layer. SQNRs in dB on the calibration rows: ``weight_sqnr`` of W_q vs W (rotated
    basis), ``act_sqnr`` of Q(X) vs X, ``output_sqnr`` of Q(X) W_qᵀ vs X Wᵀ (the layer output, bias
    excluded). γ = α / max; ``weight_gamma`` is the mean over output channels."""

    layer: str
    in_features: int
    out_features: int
    weight_format: str
    act_format: str
    act_mode: str
    weight_gamma: float
    act_gamma: float
    act_alpha: float
    weight_sqnr: float
    act_sqnr: float
    output_sqnr: float
    rotated: bool
    gptq: bool
    calib_rows: int
    seconds: float
    gptq_info: dict = field(default_factory=dict)
    execution: str = ""  # "int" (exact integer path, lowbit.py) or "sim: <why not>"
    kernel: str = ""  # the int8 GEMM of the integer path, measured fastest here (lowbit.choose_kernel); "" if sim


@dataclass
class QuantReport:
    """What :func:`quantize_` did: the recipe, one :class:`LayerReport` per layer, the :class:`FormatPlan`."""

    recipe: QuantRecipe
    layers: list[LayerReport]
    plan: FormatPlan
    seconds: float
    meta: dict = field(default_factory=dict)

    def to_pandas(self):
        df = pd.DataFrame([{k: v for k, v in asdict(r).items() if k != "gptq_info"} for r in self.layers])
        return df.set_index("layer") if len(df) else df

    def summary(self) -> dict:
        """Means of the SQNRs (finite values only) and the format histograms.

        A mean is ``inf`` when every layer is exact (identity recipe) and ``nan`` when no layer was measured
        (e.g. dynamic block formats quantized without calibration rows)."""
        def mean(key):
            vals = [getattr(r, key) for r in self.layers]
            finite = [v for v in vals if math.isfinite(v)]
            if finite:
                return float(np.mean(finite))
            return float("inf") if any(math.isinf(v) for v in vals) else float("nan")
        return {"recipe": self.recipe.name, "layers": len(self.layers), "weight_sqnr": mean("weight_sqnr"),
                "act_sqnr": mean("act_sqnr"), "output_sqnr": mean("output_sqnr"),
                "weight_formats": self.plan.histogram("weight"), "act_formats": self.plan.histogram("act"),
                "seconds": self.seconds}

    def __repr__(self) -> str:
        s = self.summary()
        return (f"QuantReport(recipe={s['recipe']!r}, layers={s['layers']}, mean SQNR W/A/out = "
                f"{s['weight_sqnr']:.2f}/{s['act_sqnr']:.2f}/{s['output_sqnr']:.2f} dB, {s['seconds']:.1f} s)")


# --------------------------------------------------------------------------------------------------
# quantize_
# --------------------------------------------------------------------------------------------------
def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules()) or hasattr(model, "_hqdit_recipe")


@dataclass
class LayerInputs:
    """Step 1's calibration rows of one layer input, in the basis the quantizers see (after steps 2–3).

    rows: [n, in] float32 (``[0, in]`` without calibration); tags: [n] int64 timestep of each row;
    extreme / extreme_tags: the top max-abs rows of every timestep [m, in] and their timesteps [m]
    (they fix a static α = γ·max exactly). ``tags``/``extreme*`` are ``None`` without calibration.
    """

    rows: torch.Tensor
    tags: torch.Tensor | None = None
    extreme: torch.Tensor | None = None
    extreme_tags: torch.Tensor | None = None
    calibrated: bool = False


@dataclass
class QuantizedWeight:
    """Steps 4–5: the quantized weight [out, in], its format, mean γ over rows, the MSE of every
    candidate format searched, the weight's ratio statistics and what GPTQ reported."""

    weight: torch.Tensor
    format: str
    gamma: float
    mse: dict
    stats: dict
    gptq_info: dict = field(default_factory=dict)


@dataclass
class QuantizedActivation:
    """Step 6: the activation quantizer (``module_kwargs`` for :class:`QuantLinear`), the quantized rows
    ``rows_q`` [n, in], format, γ, α (static: the calibrated clip value; NaN when dynamic), the MSE of
    every candidate format searched, and the rows' ratio statistics."""

    module_kwargs: dict
    rows_q: torch.Tensor
    format: str
    gamma: float
    alpha: float
    mse: dict
    stats: dict


class _SharedInputCache:
    """Work shared by consecutive layers that read the same calibration record (``to_q``/``to_k``/``to_v``):
    the GPTQ Hessian and, unless it depends on the layer's own weight, the activation quantizer.
    One slot: those layers are consecutive in module order."""

    def __init__(self) -> None:
        self.key, self.hessian, self.activation = None, None, None

    def switch(self, key) -> None:
        if key is None or key != self.key:
            self.hessian, self.activation = None, None
        self.key = key


@dataclass
class _Setting:
    """What every layer of one :func:`quantize_` call shares."""

    recipe: QuantRecipe
    grid: torch.Tensor
    ts_groups: "tuple[list[list[int]], torch.Tensor] | None"
    ts_ctx: TimestepContext | None
    cache: _SharedInputCache = field(default_factory=_SharedInputCache)


def _subsample(rows: torch.Tensor, m: int) -> torch.Tensor:
    if len(rows) <= m:
        return rows
    idx = torch.linspace(0, len(rows) - 1, m).round().long()
    return rows[idx]


def _timestep_groups(timesteps: list[int], groups: int) -> tuple[list[list[int]], torch.Tensor]:
    ts = sorted(timesteps)
    parts = [list(p) for p in np.array_split(np.array(ts), min(groups, len(ts))) if len(p)]
    edges = [(parts[i][-1] + parts[i + 1][0]) / 2 for i in range(len(parts) - 1)]
    return [[int(t) for t in p] for p in parts], torch.tensor(edges, dtype=torch.float64)


def _grid(recipe: QuantRecipe) -> torch.Tensor:
    n, lo, hi = recipe.clip_grid
    return gamma_grid(int(n), float(lo), float(hi))


def _check_arguments(model, recipe, calibration, execution: str = "auto") -> QuantRecipe:
    """The recipe (resolved from its name), after checking that each argument is of the kind its place needs."""
    usage = "call quantize_(model, recipe, calibration)"
    if execution not in lowbit.MODES:
        raise QuantizationError(f"execution must be one of {lowbit.MODES}, got {execution!r}")
    if isinstance(recipe, Calibration) or isinstance(calibration, (QuantRecipe, str)):
        raise QuantizationError(f"quantize_ got a {type(recipe).__name__} as recipe and a "
                                f"{type(calibration).__name__} as calibration: the arguments are swapped; {usage}")
    if not isinstance(model, nn.Module):
        what = type(model).__name__
        if hasattr(model, "transformer"):
            raise QuantizationError(f"quantize_ quantizes the transformer (an nn.Module), got a {what}: pass "
                                    "pipe.transformer / bundle.transformer")
        raise QuantizationError(f"quantize_ needs the transformer (an nn.Module), got a {what}; {usage}")
    if calibration is not None and not isinstance(calibration, Calibration):
        raise QuantizationError(f"calibration must be a Calibration (from calibrate) or None, got a "
                                f"{type(calibration).__name__}; {usage}")
    recipe = get_recipe(recipe)
    if recipe.rotation and recipe.rotation_seed is None:
        raise QuantizationError(f"recipe {recipe.name!r} ties its rotation seed to a run's seed (rotation_seed=None): "
                                "quantize it through experiments.quantized_copy with a CalibrationSpec, or give it a "
                                "seed: recipe.replace(rotation_seed=0)")
    return recipe


def _check_rotation(selected: dict[str, nn.Linear], recipe: QuantRecipe) -> None:
    """Every selected layer's input width has the Hadamard rotation the recipe asks for, else an error naming
    the layer and the recipe field to set (``rotation_block``: a supported order dividing every width)."""
    if not recipe.rotation:
        return
    widths = sorted({lin.in_features for lin in selected.values()})
    common = math.gcd(*widths)
    fits = [d for d in range(common, 1, -1) if common % d == 0 and is_supported(d)]
    for name, lin in selected.items():
        try:
            HadamardSpec(lin.in_features, seed=recipe.rotation_seed, block=recipe.rotation_block)
        except ValueError as err:
            fix = (f"set the recipe field rotation_block, e.g. recipe.replace(rotation_block={fits[0]}) or "
                   f"hqdit quantize --rotation-block {fits[0]} (a Hadamard order dividing every selected width "
                   f"{widths})" if fits else
                   f"no Hadamard order > 1 divides every selected width {widths}: use a recipe without rotation")
            raise QuantizationError(f"layer {name!r} (in_features={lin.in_features}): recipe {recipe.name!r} rotates "
                                    f"with rotation_block={recipe.rotation_block}, which does not fit "
                                    f"({str(err).split(':')[0]}); "
                                    f"{fix}") from None


def check_rotation(model: nn.Module, recipe: "QuantRecipe | str") -> None:
    """:class:`QuantizationError` naming the first layer of ``model`` that ``recipe`` selects whose input width
    its rotation does not fit, and the ``rotation_block`` to set. Cheap: run it before a long calibration."""
    recipe = get_recipe(recipe)
    if recipe.rotation:
        try:
            _check_rotation(select_linears(model, recipe.layers, recipe.exclude), recipe)
        except LayerSelectionError as err:
            raise QuantizationError(f"recipe {recipe.name!r}: {err}") from None


def _check_call(model: nn.Module, recipe: QuantRecipe, calibration: Calibration | None) -> dict[str, nn.Linear]:
    """The layers ``recipe`` selects in ``model``, after checking that the call makes sense."""
    if is_quantized(model):
        raise QuantizationError("the model is already quantized (it contains QuantLinear modules); quantize a "
                                "fresh FP32 copy instead of quantizing twice")
    if not recipe.layers:
        raise QuantizationError(f"recipe {recipe.name!r} names no layer (layers=())")
    try:
        selected = select_linears(model, recipe.layers, recipe.exclude)
    except LayerSelectionError as err:
        raise QuantizationError(f"recipe {recipe.name!r}: {err}") from None
    if recipe.needs_calibration and calibration is None:
        raise QuantizationError(f"recipe {recipe.name!r} needs calibration data: pass calibrate(bundle, "
                                f"layers={recipe.layers}) as `calibration`")
    _check_rotation(selected, recipe)
    if calibration is not None:
        calibration.check_fits(selected)
    if calibration is not None and recipe.needs_calibration:
        missing = [n for n in selected if n not in calibration]
        if missing:
            raise QuantizationError(f"calibration has no data for {len(missing)} selected layer(s), e.g. "
                                    f"{missing[:3]}; capture with the recipe's layer patterns {recipe.layers}")
    if recipe.timestep_groups > 1 and calibration is None:
        raise QuantizationError("timestep_groups needs calibration")
    return selected


def _calibration_rows(name: str, rec: LayerCalibration | None, recipe: QuantRecipe, d: int) -> LayerInputs:
    """Step 1: the layer's calibration rows, subsampled to ``recipe.max_calib_rows``."""
    if rec is None:
        return LayerInputs(torch.zeros(0, d))
    rows_all, tags_all = rec.rows_by_timestep()
    idx = _subsample(torch.arange(len(rows_all)), recipe.max_calib_rows)
    rows, tags = rows_all[idx].to(torch.float32), tags_all[idx]
    if len(rows) == 0:
        raise QuantizationError(f"layer {name!r}: the calibration holds no rows (rows_per_timestep=0?)")
    return LayerInputs(rows, tags, *rec.extreme_rows(), calibrated=True)


def _smooth(W: torch.Tensor, x: LayerInputs, rec: LayerCalibration | None, recipe: QuantRecipe):
    """Step 2 (SmoothQuant): ``W·s``, ``X/s`` with s_j = max|x_j|^a / max|W_j|^(1-a); returns
    (W, inputs, 1/s [in] or ``None`` when off)."""
    if recipe.smoothquant_alpha is None:
        return W, x, None
    a = recipe.smoothquant_alpha
    xmax = rec.pooled().channel_absmax.to(torch.float32).clamp(min=1e-5)
    wmax = W.abs().amax(dim=0).clamp(min=1e-5)
    s = (xmax.pow(a) / wmax.pow(1 - a)).clamp(min=1e-5)
    x = LayerInputs(x.rows / s[None, :], x.tags, x.extreme / s[None, :], x.extreme_tags, x.calibrated)
    return W * s[None, :], x, 1.0 / s


def _rotate(W: torch.Tensor, x: LayerInputs, recipe: QuantRecipe):
    """Step 3: ``W Q`` and ``X Q`` with a random Hadamard ``Q``; returns (W, inputs, spec or ``None``)."""
    if not recipe.rotation:
        return W, x, None
    rot = HadamardSpec(W.shape[1], seed=recipe.rotation_seed, block=recipe.rotation_block)
    ext = x.extreme
    if ext is not None and len(ext):
        ext = rotate_input(ext, rot)
    return rotate_weight(W, rot), LayerInputs(rotate_input(x.rows, rot), x.tags, ext, x.extreme_tags,
                                              x.calibrated), rot


def _weight_format(W: torch.Tensor, X: torch.Tensor, setting: _Setting, stats: dict) -> tuple[FormatChoice, ClipResult]:
    """Step 4: the weight's format (fixed or :func:`choose_format`) and its clipping search result."""
    recipe, grid = setting.recipe, setting.grid
    method = recipe.weight_clip
    if recipe.weight_granularity == "tensor":
        def clip(name):
            return clip_activation(W, name, granularity="tensor", method="mse" if method == "output" else method,
                                   grid=grid, p=recipe.clip_p, search=recipe.clip_search, stride=recipe.clip_stride)
    else:
        kw = {"inputs": X} if method == "output" else {}

        def clip(name):
            return clip_weight(W, name, method=method, grid=grid, p=recipe.clip_p, search=recipe.clip_search,
                               stride=recipe.clip_stride, **kw)
    if recipe.weight_format == AUTO:
        choice = choose_format(recipe.weight_candidates, clip, rule=recipe.format_rule, stats=stats,
                               statistic=recipe.ratio_statistic, thresholds=recipe.ratio_thresholds)
    else:
        choice = FormatChoice(recipe.weight_format, None, {}, {})
    return choice, choice.clip if choice.clip is not None else clip(choice.format)


def _gptq_with_hessian(W: torch.Tensor, X: torch.Tensor, setting: _Setting, shared: bool) -> GPTQ:
    """A :class:`GPTQ` for ``W`` with the Hessian of ``X`` (shared by layers reading the same input)."""
    cache = setting.cache
    g = GPTQ(W)
    if shared and cache.hessian is not None:
        g.set_hessian(*cache.hessian)  # to_q/to_k/to_v share their input, hence their Hessian
    else:
        g.add_batch(X)
        if shared:
            cache.hessian = (g.hessian, g.nsamples)
    return g


def _round_weight(W: torch.Tensor, X: torch.Tensor, fmt, cr: ClipResult, setting: _Setting, shared: bool):
    """Step 5: round ``W`` onto ``fmt``'s grid with the per-row scales of ``cr`` — GPTQ (Hessian of ``X``,
    shared by layers reading the same input) or round-to-nearest. Returns (W_q, GPTQ info)."""
    recipe = setting.recipe
    scale = cr.scale(fmt)
    if not recipe.gptq or isinstance(fmt, NoFormat):
        return fake_quantize(W, fmt, scale), {}
    g = _gptq_with_hessian(W, X, setting, shared)
    res = g.quantize(fmt, scale.reshape(-1) if scale.dim() else scale.expand(W.shape[0]),
                     blocksize=recipe.gptq_blocksize, percdamp=recipe.gptq_percdamp)
    return res.weight, {k: v for k, v in vars(res).items() if k != "weight" and isinstance(v, (int, float, str, bool))}


def _quantize_weight(W: torch.Tensor, X: torch.Tensor, setting: _Setting, shared: bool) -> QuantizedWeight:
    """Steps 4–5 for one weight [out, in] (block formats: MX/NVFP4 block scales, no search)."""
    recipe = setting.recipe
    stats = ratio_statistics(W, channel_axis=0)
    if recipe.weight_granularity == "block":
        wf = recipe.weight_format
        fmt = parse_format(wf)
        if recipe.gptq and not isinstance(fmt, NoFormat):
            # GPTQ with block scales (ours): the scales of block_fake_quantize (E8M0 / E4M3-rounded) are
            # fixed first from the weight, then GPTQ rounds each block onto them (groupsize = block).
            res = _gptq_with_hessian(W, X, setting, shared).quantize(
                fmt, block_weight_scales(W, fmt, recipe.block_size, recipe.scale_format),
                groupsize=recipe.block_size, blocksize=recipe.gptq_blocksize, percdamp=recipe.gptq_percdamp)
            info = {k: v for k, v in vars(res).items() if k != "weight" and isinstance(v, (int, float, str, bool))}
            return QuantizedWeight(res.weight, wf, 1.0, {}, stats, info)
        return QuantizedWeight(block_fake_quantize(W, fmt, recipe.block_size, recipe.scale_format),
                               wf, 1.0, {}, stats)
    choice, cr = _weight_format(W, X, setting, stats)
    Wq, info = _round_weight(W, X, parse_format(choice.format), cr, setting, shared)
    return QuantizedWeight(Wq, choice.format, float(cr.gamma.float().mean()), choice.mse, stats, info)


def _dynamic_activation(name: str, recipe: QuantRecipe, X: torch.Tensor) -> QuantizedActivation:
    """Step 6 without calibration rows (dynamic recipes): the quantizer from the recipe alone."""
    af = recipe.act_format
    if af == AUTO:
        raise QuantizationError(f"layer {name!r}: format selection needs calibration rows")
    if isinstance(parse_format(af), NoFormat):
        kw = {"act_mode": "none", "act_format": "fp32"}
    elif recipe.act_granularity == "block":
        kw = {"act_mode": "block", "act_format": af, "block_size": recipe.block_size, "scale_format": recipe.scale_format}
    else:
        kw = {"act_mode": "token", "act_format": af, "act_gamma": 1.0}
    return QuantizedActivation(kw, X, kw["act_format"], 1.0, float("nan"), {}, {})


def _quantize_activation(x: LayerInputs, Wq: torch.Tensor, setting: _Setting) -> QuantizedActivation:
    """Step 6: the activation format (fixed or :func:`choose_format`) and its α (static, per tensor or per
    timestep group) or γ (dynamic per token), on the calibration rows ``x.rows``."""
    recipe, X = setting.recipe, x.rows
    stats = ratio_statistics(X, channel_axis=1)
    af = recipe.act_format
    if af != AUTO and isinstance(parse_format(af), NoFormat):
        return QuantizedActivation({"act_mode": "none", "act_format": "fp32"}, X, "fp32", 1.0, float("nan"), {}, stats)
    if recipe.act_granularity == "block":
        kw = {"act_mode": "block", "act_format": af, "block_size": recipe.block_size, "scale_format": recipe.scale_format}
        Xq = block_fake_quantize(X, parse_format(af), recipe.block_size, recipe.scale_format)
        return QuantizedActivation(kw, Xq, af, 1.0, float("nan"), {}, stats)
    gran = recipe.act_granularity
    ckw = {"weight": Wq} if recipe.act_clip == "output" else {}

    def clip(name, rows=X, group=None):
        kw = dict(ckw)
        if gran == "tensor" and x.extreme is not None and len(x.extreme):
            e = x.extreme if group is None else x.extreme[torch.isin(x.extreme_tags, torch.tensor(group))]
            if len(e):
                kw["amax"] = e.abs().amax()  # the calibration-wide max (extreme rows), not the sample's
        return clip_activation(rows, name, granularity=gran, method=recipe.act_clip, grid=setting.grid,
                               p=recipe.clip_p, search=recipe.clip_search, stride=recipe.clip_stride, **kw)
    if af == AUTO:
        choice = choose_format(recipe.act_candidates, clip, rule=recipe.format_rule, stats=stats,
                               statistic=recipe.ratio_statistic, thresholds=recipe.ratio_thresholds)
    else:
        choice = FormatChoice(af, None, {}, {})
    af, fmt = choice.format, parse_format(choice.format)
    if gran == "token" or setting.ts_groups is None:
        cr = choice.clip if choice.clip is not None else clip(af)
        if gran == "token":
            g = float(cr.gamma)
            return QuantizedActivation({"act_mode": "token", "act_format": af, "act_gamma": g},
                                       token_fake_quantize(X, fmt, g), af, g, float(cr.alpha), choice.mse, stats)
        s = alpha_to_scale(cr.alpha, fmt).reshape(1)
        return QuantizedActivation({"act_mode": "static", "act_format": af, "act_scale": s},
                                   fake_quantize(X, fmt, s[0]), af, float(cr.gamma), float(cr.alpha), choice.mse, stats)
    groups, edges = setting.ts_groups  # static, one α per group of consecutive timesteps
    scales, gammas = [], []
    for grp in groups:
        sel = X[torch.isin(x.tags, torch.tensor(grp))]
        if len(sel) == 0:
            raise QuantizationError(f"no calibration rows for timestep group {grp}")
        cr = clip(af, sel, grp)
        scales.append(float(alpha_to_scale(cr.alpha, fmt)))
        gammas.append(float(cr.gamma))
    s = torch.tensor(scales)
    sx = s[torch.searchsorted(edges, x.tags.double())][:, None]
    Xq = round_to_grid(X / sx, fmt) * sx
    return QuantizedActivation({"act_mode": "static", "act_format": af, "act_scale": s, "ts_edges": edges}, Xq, af,
                               float(np.mean(gammas)), float(s.max() * fmt.max_value), choice.mse, stats)


def _identity_layer(name: str, lin: nn.Linear, x: LayerInputs, t0: float):
    ql = QuantLinear.from_linear(lin, name)
    report = LayerReport(name, lin.in_features, lin.out_features, "fp32", "fp32", "none", 1.0, 1.0, float("nan"),
                         math.inf, math.inf, math.inf, False, False, len(x.rows) if x.calibrated else 0,
                         time.perf_counter() - t0)
    return ql, report, LayerFormat("fp32", "fp32")


def _quantize_layer(name: str, lin: nn.Linear, rec: LayerCalibration | None, setting: _Setting):
    """The six steps of the module docstring for one linear; returns (QuantLinear, LayerReport,
    LayerFormat, key of the input it shares with its neighbours or ``None``)."""
    t0, recipe = time.perf_counter(), setting.recipe
    W = lin.weight.detach().to(torch.float32)
    x = _calibration_rows(name, rec, recipe, W.shape[1])  # 1
    if recipe.is_identity:
        return (*_identity_layer(name, lin, x, t0), None)
    W, x, smooth_inv = _smooth(W, x, rec, recipe)  # 2
    W, x, rot = _rotate(W, x, recipe)  # 3
    if recipe.gptq and len(x.rows) == 0:
        raise QuantizationError(f"layer {name!r}: GPTQ needs calibration rows")
    share_key = id(rec) if (rec is not None and recipe.smoothquant_alpha is None) else None
    setting.cache.switch(share_key)
    wq = _quantize_weight(W, x.rows, setting, share_key is not None)  # 4, 5
    # layers reading the same tensor (to_q/to_k/to_v) share the activation search unless it depends on
    # the layer's own weight (layer-output loss, SmoothQuant)
    same_act = share_key is not None and recipe.act_clip != "output" and recipe.format_rule != "output"
    if not len(x.rows):  # 6
        act = _dynamic_activation(name, recipe, x.rows)
    elif same_act and setting.cache.activation is not None:
        act = setting.cache.activation
    else:
        act = _quantize_activation(x, wq.weight, setting)
        if same_act:
            setting.cache.activation = act
    ql = QuantLinear(W.shape[1], W.shape[0], weight=wq.weight.to(lin.weight.dtype),
                     bias=None if lin.bias is None else lin.bias.data, weight_format=wq.format,
                     rotation=rot, smooth_inv=smooth_inv, name=name, **act.module_kwargs)
    ql.ts_ctx = setting.ts_ctx
    return ql, _layer_report(name, W, x.rows, wq, act, rot is not None, recipe.gptq, t0), \
        LayerFormat(wq.format, act.format, wq.mse, act.mse, wq.stats, act.stats, wq.gamma, act.gamma), \
        share_key if same_act else None


def _layer_report(name, W, X, wq: QuantizedWeight, act: QuantizedActivation, rotated: bool, gptq: bool,
                  t0: float) -> "LayerReport":
    if len(X):
        out_sqnr, a_sqnr = sqnr_db(X @ W.T, act.rows_q @ wq.weight.T), sqnr_db(X, act.rows_q)
    else:
        out_sqnr = a_sqnr = float("nan")
    return LayerReport(layer=name, in_features=W.shape[1], out_features=W.shape[0], weight_format=wq.format,
                       act_format=act.module_kwargs["act_format"], act_mode=act.module_kwargs["act_mode"],
                       weight_gamma=wq.gamma, act_gamma=act.gamma, act_alpha=act.alpha,
                       weight_sqnr=sqnr_db(W, wq.weight), act_sqnr=a_sqnr, output_sqnr=out_sqnr, rotated=rotated,
                       gptq=gptq, calib_rows=len(X), seconds=time.perf_counter() - t0, gptq_info=wq.gptq_info)


def _install(model: nn.Module, modules: dict[str, QuantLinear], *, shared: "list[list[str]]",
             processors: dict, ts_ctx: TimestepContext | None, recipe_name: str | None, weights: dict | None,
             execution: str) -> dict[str, str]:
    """The one installer of a quantized model, for :func:`quantize_` and :func:`load_quantized`: swap the
    QuantLinears in (``modules``: layer name → module), link the layers of each group of ``shared`` (names of
    layers reading one input with one quantizer: ``to_q``/``to_k``/``to_v``), set the attention ``processors``
    (attention name → :class:`QuantAttnProcessor`) and the timestep hook of ``ts_ctx``, record the recipe, the
    FP32 weights' fingerprints and ``execution``, and put every layer on its execution path
    (:func:`~hqdit_utils.engine.lowbit.set_execution`); returns ``{layer: "int" | "sim: <why not>"}``."""
    for names in shared:
        if len(names) > 1:
            group = SharedInput(len(names))
            for name in names:
                modules[name].shared = group
    for name, ql in modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ql)
    for name, processor in processors.items():
        model.get_submodule(name).set_processor(processor)
    if ts_ctx is not None:
        model._hqdit_ts_hook = model.register_forward_pre_hook(ts_ctx.hook, with_kwargs=True)
    model._hqdit_recipe = recipe_name
    if weights:
        model._hqdit_weights = weights
    model._hqdit_execution = execution
    _attach_save_pretrained(model)
    return lowbit.set_execution(model, execution)


def _attention_processors(recipe: QuantRecipe, modules: dict[str, QuantLinear],
                          calibration: Calibration | None) -> dict:
    """``{attention name: QuantAttnProcessor}`` of a recipe that quantizes the attention matmuls, else ``{}``."""
    if not recipe.quantize_attention:
        return {}
    fmt = parse_format(recipe.attn_format)
    return {name[: -len(".to_q")]: QuantAttnProcessor(recipe.attn_format,
                                                       _attn_scales(calibration, name[: -len(".to_q")], fmt))
            for name in modules if name.endswith(".to_q")}


def _attn_scales(calibration: Calibration | None, attn_name: str, fmt) -> dict:
    out = {}
    for kind in ("q", "k", "v"):
        key = f"{attn_name}.{kind}"
        if calibration is not None and key in calibration:
            out[kind] = float(alpha_to_scale(calibration[key].pooled().absmax, fmt))
    return out


@torch.no_grad()
def quantize_(model: nn.Module, recipe: "QuantRecipe | str", calibration: Calibration | None = None, *,
              execution: str = "auto", verbose: bool = False) -> QuantReport:
    """Quantize ``model`` in place according to ``recipe`` and return a :class:`QuantReport`.

    Every selected linear goes through the six steps of the module docstring (calibration rows,
    smoothing, rotation, weight format and α, weight rounding, activation format and α); the model is
    changed only after every layer succeeded.

    Args:
        model: a diffusers DiT transformer (or any module with ``nn.Linear`` children).
        recipe: a :class:`~hqdit_utils.engine.recipes.QuantRecipe` or its name.
        calibration: from :func:`~hqdit_utils.engine.calibration.calibrate`; required unless the recipe needs none
            (``recipe.needs_calibration``), and it must cover the recipe's layers.
        execution: ``"auto"`` (the exact integer path wherever it is exact and fast), ``"int"`` or ``"sim"``
            (:func:`~hqdit_utils.engine.lowbit.set_execution`); the model carries it through save and load.
    Raises:
        QuantizationError: the model is already quantized, the recipe selects no layer, a pattern matches
            nothing, calibration data are missing, the arguments are of the wrong kind (a pipeline or a
            ``DiTBundle`` instead of its ``.transformer``; recipe and calibration swapped), or a layer's width
            has no Hadamard rotation of the recipe's ``rotation_block``.
        CalibrationError: the calibration was recorded on a model of other shapes (names the layer and both).
        Every check runs before any module is swapped: on error the model is unchanged.
    Warns:
        UserWarning: the calibration was recorded on a model with the same shapes but other weights.

    dtypes and devices: the model may be float32, float16 or bfloat16 (weights are quantized in float32 and
    stored in the model's dtype) and on any device; the exact integer path runs on the CPU only, other devices
    use the simulated path. Forward works with autograd enabled; ``.to(device / dtype)`` moves every buffer.
    """
    recipe = _check_arguments(model, recipe, calibration, execution)
    t_start = time.perf_counter()
    selected = _check_call(model, recipe, calibration)
    ts_ctx = TimestepContext() if recipe.timestep_groups > 1 else None
    ts_groups = _timestep_groups(calibration.timesteps, recipe.timestep_groups) if ts_ctx is not None else None
    setting = _Setting(recipe, _grid(recipe), ts_groups, ts_ctx)
    plan = FormatPlan(candidates=list(recipe.weight_candidates), meta={"recipe": recipe.name})
    modules: dict[str, QuantLinear] = {}
    shared_groups: dict = {}  # layers reading the same tensor with the same input quantizer (to_q/to_k/to_v)
    reports: list[LayerReport] = []
    for name, lin in selected.items():
        rec = calibration[name] if (calibration is not None and name in calibration) else None
        ql, report, plan.layers[name], group = _quantize_layer(name, lin, rec, setting)
        modules[name] = ql
        reports.append(report)
        if group is not None:
            shared_groups.setdefault(group, []).append(name)
        if verbose:
            print(f"{name}: W {report.weight_format} A {report.act_format} SQNR out {report.output_sqnr:.2f} dB "
                  f"({report.seconds:.2f} s)")
    weights = {name: weight_fingerprint(lin) for name, lin in selected.items()}  # checked on reload
    paths = _install(model, modules, shared=list(shared_groups.values()),
                     processors=_attention_processors(recipe, modules, calibration), ts_ctx=ts_ctx,
                     recipe_name=recipe.name, weights=weights, execution=execution)
    for r in reports:
        r.execution = paths.get(r.layer, "")
        st = model.get_submodule(r.layer).lowbit
        r.kernel = st.kernel if r.execution == "int" else ""
    return QuantReport(recipe, reports, plan, time.perf_counter() - t_start,
                       {"calibration": None if calibration is None else dict(calibration.meta)})


# --------------------------------------------------------------------------------------------------
# Saving and loading the quantized state
# --------------------------------------------------------------------------------------------------
#: How to reload a quantized folder, named in every message about one.
LOADER = "hqdit_utils.load_quantized"
#: ``quant_method`` of the ``quantization_config`` that :func:`save_pretrained_quantized` writes into
#: ``config.json``. Diffusers' ``from_pretrained`` refuses an unknown method with "Unknown quantization type,
#: got <this> - …", so the name says how to load the folder.
QUANT_METHOD = f"hqdit (load with {LOADER})"
#: The file of a ``save_pretrained`` folder that holds the parameters and buffers outside the quantized layers.
BASE_FILE = "base_weights.safetensors"


def save_quantized(model: nn.Module, out_dir, report: QuantReport | None = None, *, packed: bool = False) -> Path:
    """Write ``quant_state.safetensors`` (every QuantLinear's buffers), ``quant_config.json`` (their
    configs, the recipe and the weight fingerprints of the FP32 layers they replaced), with a report
    ``plan.json`` and ``report.csv``, and last ``MANIFEST.json`` (sha256 and size of every file of ``out_dir``,
    verified by :func:`load_quantized`) into ``out_dir``.

    ``packed=True``: the weights of integer-path layers go to ``packed_weights.safetensors`` as 4-bit codes two
    per byte + float32 row scales (``lowbit.packed_weights``) instead of float tensors; :func:`load_quantized`
    rebuilds those layers' integer path bit for bit. A file added to ``out_dir`` later (``run.json`` of
    ``hqdit quantize``) is covered by calling :func:`~hqdit_utils.files.write_manifest` again."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    coded = lowbit.packed_weights(model) if packed else {}
    (out / lowbit.PACKED_FILE).unlink(missing_ok=True)
    if coded:
        save_packed(coded, out / lowbit.PACKED_FILE)
    tensors, configs = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if m.weight is None and name not in coded:
                raise QuantizationError(f"save_quantized: {name} holds codes only; save with packed=True")
            configs[name] = m.config()
            for k, v in m.state_dict().items():
                if not (k == "weight" and name in coded):
                    tensors[f"{name}.{k}"] = v.contiguous()
    if not configs:
        raise QuantizationError("save_quantized: the model holds no QuantLinear")
    save_file(tensors, str(out / "quant_state.safetensors"))
    shared: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.shared is not None:
            shared.setdefault(id(m.shared), []).append(name)
    attention = {name: {"format": str(m.processor.fmt), "scales": dict(m.processor.scales)}
                 for name, m in model.named_modules() if isinstance(getattr(m, "processor", None), QuantAttnProcessor)}
    meta = {"recipe": getattr(model, "_hqdit_recipe", None), "layers": configs,
            "shared_inputs": list(shared.values()), "attention": attention,
            "weights": getattr(model, "_hqdit_weights", None),
            "execution": getattr(model, "_hqdit_execution", "auto")}
    if report is not None:
        meta["recipe_fields"] = report.recipe.to_dict()
        report.plan.save(out / "plan.json")
        report.to_pandas().to_csv(out / "report.csv")
    (out / "quant_config.json").write_text(strict_json(meta))
    write_manifest(out, {"written_by": "hqdit_utils.engine.qmodel.save_quantized", "recipe": meta["recipe"]})
    return out


def save_pretrained_quantized(model: nn.Module, save_directory, **kwargs) -> Path:
    """``model.save_pretrained(save_directory)`` of a quantized diffusers transformer (:func:`quantize_` and
    :func:`load_quantized` install it on the model, so ``pipe.save_pretrained`` uses it too).

    Writes ``config.json`` (the model's config plus a ``quantization_config`` whose ``quant_method``,
    :data:`QUANT_METHOD`, a plain ``from_pretrained`` refuses in one line naming :data:`LOADER`),
    ``base_weights.safetensors`` (every parameter and buffer outside the quantized layers) and what :func:`save_quantized` writes (``packed=True``), ``MANIFEST.json`` last.
    ``load_quantized(save_directory)`` rebuilds the same quantized model, bit for bit. ``kwargs`` of diffusers'
    ``save_pretrained`` are accepted and ignored (safetensors only), except ``push_to_hub``, which is refused.
    """
    if kwargs.get("push_to_hub"):
        raise QuantizationError("save_pretrained of an hqdit-quantized model does not push to the Hub: save it, "
                                "then upload the folder (huggingface-cli upload)")
    if not kwargs.get("is_main_process", True):
        return Path(save_directory)
    out = Path(save_directory)
    if out.is_file():
        raise QuantizationError(f"save_pretrained: {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("diffusion_pytorch_model*"):  # float weights of an earlier save would be loaded instead
        stale.unlink()
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    base = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
            if not any(k.startswith(q + ".") for q in quantized)}
    save_file(base, str(out / BASE_FILE))
    model.save_config(out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "recipe": getattr(model, "_hqdit_recipe", None)}
    write_json_atomic(out / "config.json", config)
    return save_quantized(model, out, packed=True)


def _attach_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` (of a diffusers model) :func:`save_pretrained_quantized`: an instance
    attribute, so the class's float-weights save can no longer write a quantized model as a plain one."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(save_pretrained_quantized, model)


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _check_manifest(out: Path, redo: str) -> bool:
    """Verify every file listed in ``out/MANIFEST.json`` (``QuantizationError`` naming the first damaged one);
    ``False`` for a folder written before manifests existed (loaded with a warning)."""
    man = out / MANIFEST
    if not man.is_file():
        warnings.warn(f"{out} has no {MANIFEST} (written by an older hqdit_utils): its files cannot be checked for "
                      f"damage; save it again (save_quantized / hqdit quantize) to add one", UserWarning, stacklevel=3)
        return False
    try:
        files = json.loads(man.read_text())["files"]
        verify_files(out, files)
    except (ValueError, KeyError, TypeError) as err:
        what = str(err) if isinstance(err, IntegrityError) else f"{man} is damaged ({type(err).__name__}: {err})"
        raise QuantizationError(f"{what}; {redo}") from None
    missing = {"quant_config.json", "quant_state.safetensors"} - set(files)
    if missing:
        raise QuantizationError(f"{man} does not list {sorted(missing)}; {redo}")
    return True


def folder_tag(out_dir) -> str:
    """``sha256 <16 hex digits>`` naming a quantized folder: of its ``MANIFEST.json`` (which holds every file's
    sha256, so the tag changes with any file), or of ``quant_state.safetensors`` in an older folder."""
    out = Path(out_dir)
    if (out / MANIFEST).is_file():
        return f"sha256 {sha256_file(out / MANIFEST)[:16]}"
    return f"sha256 {sha256_file(out / 'quant_state.safetensors')[:16]} (state file only: no {MANIFEST})"


def is_pretrained_folder(folder) -> bool:
    """Whether ``folder`` holds a quantized transformer written by ``save_pretrained`` (a ``config.json`` whose
    ``quantization_config`` names hqdit)."""
    cfg = Path(folder) / "config.json"
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") if cfg.is_file() else None
    except (ValueError, OSError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def _load_pretrained_folder(out: Path, execution: str | None = None) -> nn.Module:
    """The quantized transformer of a ``save_pretrained`` folder (:func:`save_pretrained_quantized`)."""
    redo = "save the quantized model again with model.save_pretrained(folder)"
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a folder: load_quantized(folder) takes a folder written by "
                                "save_pretrained of a quantized model, load_quantized(model, folder) one of save_quantized")
    if not is_pretrained_folder(out):
        raise QuantizationError(f"{out} holds no config.json with an hqdit quantization_config: a folder of "
                                "save_quantized or hqdit quantize loads into its FP32 model, load_quantized(model, "
                                f"{out})")
    _check_manifest(out, redo)
    import diffusers  # deferred: diffusers takes seconds to import

    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config")
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise QuantizationError(f"{out / 'config.json'} names the class {config.get('_class_name')!r}, which diffusers "
                                f"{diffusers.__version__} has not; {redo}")
    base = load_file(str(out / BASE_FILE))
    model = cls.from_config(config).eval()
    floats = [v.dtype for v in base.values() if v.is_floating_point()]
    if floats and floats[0] != torch.float32:
        model.to(floats[0])
    layers = json.loads((out / "quant_config.json").read_text())["layers"]
    missing, unexpected = model.load_state_dict(base, strict=False)
    stray = [k for k in missing if not any(k.startswith(q + ".") for q in layers)]
    if stray or unexpected:
        raise QuantizationError(f"{out / BASE_FILE} does not match {cls.__name__}: missing {stray[:4]}, unexpected "
                                f"{list(unexpected)[:4]}; {redo}")
    return _load_state(model, out, check_weights=False, verified=True, execution=execution)


def load_quantized(model: "nn.Module | str | os.PathLike", out_dir=None, *, execution: str | None = None) -> nn.Module:
    """Rebuild a quantized model: ``load_quantized(model, folder)`` into a fresh FP32 ``model`` (in place) from a
    folder of :func:`save_quantized` / ``hqdit quantize``; ``load_quantized(folder)`` from a folder of
    ``save_pretrained`` of a quantized diffusers transformer (the model is built from its ``config.json``).

    Rebuilt: the QuantLinears, the quantized attention processors (``quantize_attention``), the timestep hook of
    per-timestep-group scales, and the shared input of ``to_q``/``to_k``/``to_v`` (folders written before
    attention and shared inputs were recorded load their linears only). Every file listed in the folder's
    ``MANIFEST.json`` is checked first (sha256 and size). ``execution``: as :func:`quantize_`'s; ``None`` runs the
    layers as the folder records (``"auto"`` for folders written before it was recorded).

    Raises:
        FileNotFoundError: ``quant_config.json`` or ``quant_state.safetensors`` is missing.
        QuantizationError: a damaged file (named), missing or unexpected tensors, layers that ``model`` lacks, or
            the arguments swapped; the model is left unchanged.
    Warns:
        UserWarning: ``model``'s weights differ from those the folder was quantized from (same shapes), or the
            folder has no manifest (written by an older version: nothing to check it against).
    """
    if isinstance(model, (str, os.PathLike)):
        if isinstance(out_dir, nn.Module):
            raise QuantizationError(f"load_quantized got a path then a {type(out_dir).__name__}: the arguments are "
                                    "swapped; call load_quantized(model, folder)")
        if out_dir is not None:
            raise QuantizationError("load_quantized takes (model, folder) or (folder), got two paths")
        return _load_pretrained_folder(Path(model), execution)
    if not isinstance(model, nn.Module):
        raise QuantizationError(f"load_quantized needs the FP32 transformer (an nn.Module) and a folder, got a "
                                f"{type(model).__name__}; call load_quantized(model, folder) or load_quantized(folder)")
    if out_dir is None:
        raise QuantizationError("load_quantized(model) needs the folder too: load_quantized(model, folder)")
    if is_pretrained_folder(out_dir):
        raise QuantizationError(f"{out_dir} was written by save_pretrained and holds the whole model: load it with "
                                f"{LOADER}({str(out_dir)!r}), without a model")
    return _load_state(model, Path(out_dir), execution=execution)


def _load_state(model: nn.Module, out: Path, *, check_weights: bool = True, verified: bool = False,
                execution: str | None = None) -> nn.Module:
    redo = f"re-create it with `hqdit quantize --recipe NAME --out {out}` (or save_quantized)"
    cfg_file, state_file = out / "quant_config.json", out / "quant_state.safetensors"
    for f in (cfg_file, state_file):
        if not f.is_file():
            hint = (f"; it was written by save_pretrained: load it with {LOADER}({str(out)!r})"
                    if is_pretrained_folder(out) else "")
            raise FileNotFoundError(f"{f} not found: {out} is not a complete quantized-model folder; {redo}{hint}")
    if is_quantized(model):
        raise QuantizationError("load_quantized needs an unquantized model")
    if not verified:
        _check_manifest(out, redo)
    try:
        meta = json.loads(cfg_file.read_text())
        tensors = load_file(str(state_file))
        coded = load_packed(out / lowbit.PACKED_FILE) if (out / lowbit.PACKED_FILE).is_file() else {}
    except (SafetensorError, OSError, ValueError) as err:
        raise QuantizationError(f"cannot read {out} ({type(err).__name__}: {err}): a file is corrupted or "
                                f"truncated; {redo}") from err
    expected = set()
    for name, cfg in meta["layers"].items():
        expected |= {f"{name}.{k}" for k, on in (("weight", name not in coded), ("bias", cfg["has_bias"]),
                     ("act_scale", cfg["act_groups"]), ("smooth_inv", cfg["has_smooth"]), ("ts_edges", cfg["ts_groups"]))
                     if on}
        lin = _submodule(model, name)
        if not isinstance(lin, nn.Linear) or (lin.in_features, lin.out_features) != (cfg["in_features"], cfg["out_features"]):
            raise QuantizationError(f"{state_file} holds layer {name!r} [{cfg['out_features']}x{cfg['in_features']}], "
                                    f"which the model has not (found {type(lin).__name__}); load it into the model "
                                    "it was quantized from (load_dit(SOURCE).transformer)")
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    unexpected += sorted(f"{n} (packed)" for n in set(coded) - set(meta["layers"]))
    if missing or unexpected:
        raise QuantizationError(f"{state_file} does not match {cfg_file.name}: missing tensors {missing[:8]}, "
                                f"unexpected tensors {unexpected[:8]}; {redo}")
    if check_weights and meta.get("weights"):
        warn_other_weights(meta["weights"], {n: model.get_submodule(n) for n in meta["layers"]},
                           "the quantized state was made from", "its weights and scales belong to that model. Load "
                           "it into the model it was quantized from (load_dit(SOURCE).transformer) unless that is "
                           "intended", stacklevel=4)
    new_modules = {}
    for name, cfg in meta["layers"].items():
        rot = None
        if cfg["rotation"] is not None:
            rot = HadamardSpec(cfg["rotation"]["n"], seed=cfg["rotation"]["seed"], block=cfg["rotation"]["block"])
        get = lambda k: tensors.get(f"{name}.{k}")  # noqa: E731
        dtype = model.get_submodule(name).weight.dtype
        weight = get("weight") if name not in coded else lowbit.placeholder_weight(
            cfg["out_features"], cfg["in_features"], dtype)
        ql = QuantLinear(cfg["in_features"], cfg["out_features"], weight=weight, bias=get("bias"),
                         weight_format=cfg["weight_format"], act_format=cfg["act_format"], act_mode=cfg["act_mode"],
                         act_scale=get("act_scale"), act_gamma=cfg["act_gamma"], block_size=cfg["block_size"],
                         scale_format=cfg["scale_format"], rotation=rot, smooth_inv=get("smooth_inv"),
                         ts_edges=get("ts_edges"), name=name)
        if name in coded:
            try:
                lowbit.install_packed(ql, coded[name], dtype)
            except lowbit.LowbitError as err:
                raise QuantizationError(f"{out / lowbit.PACKED_FILE}: {err}; {redo}") from None
        new_modules[name] = ql
    attention = meta.get("attention", {})
    for name in attention:
        if not hasattr(_submodule(model, name), "set_processor"):
            raise QuantizationError(f"{cfg_file} quantizes the attention {name!r}, which the model has not; load it "
                                    "into the model it was quantized from (load_dit(SOURCE).transformer)")
    ts_ctx = None
    if any(ql.ts_edges is not None for ql in new_modules.values()):
        ts_ctx = TimestepContext()
        for ql in new_modules.values():
            ql.ts_ctx = ts_ctx
    _install(model, new_modules, shared=meta.get("shared_inputs", []),  # swaps only now: every layer was rebuilt
             processors={name: QuantAttnProcessor(a["format"], a["scales"]) for name, a in attention.items()},
             ts_ctx=ts_ctx, recipe_name=meta.get("recipe"), weights=meta.get("weights"),
             execution=execution or meta.get("execution", "auto"))
    return model
