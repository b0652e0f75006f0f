"""``quantize_(model, recipe, calibration)``: swap a DiT's linears for fake-quantized ones, in place.

Per selected layer (order of operations; which parts are the paper's: digest §3.7, the rest §9):

1. calibration rows ``X`` [n, in] (the capture reservoir, pooled over timesteps, deterministically
   subsampled to ``recipe.max_calib_rows``) and the FP32 weight ``W`` [out, in];
2. SmoothQuant (baseline only): ``X ← X / s``, ``W ← W · s``;
3. rotation (``recipe.rotation``): ``W ← W Q`` offline, ``X ← X Q`` (and online at run time), with a
   random Hadamard ``Q`` — *before* format selection and clipping (digest §9.4);
4. weight format (fixed, or per layer: MSE after clipping / layer-output error / ratio rule) and
   per-row α from the clipping search;
5. weight rounding: round-to-nearest, or GPTQ with the Hessian of the (rotated) ``X`` and per-row α fixed
   in step 4 (``recipe.gptq``) — computed ONCE and stored in the module;
6. activation format and α (static per tensor, optionally per timestep group) or γ (dynamic per token),
   searched with the already-quantized weight when the loss is the layer-output error.

:class:`QuantLinear` then computes ``F.linear(Q_a(rotate(x / s)), W_q, b)``: the weight is a stored,
already fake-quantized tensor (no per-call weight work), the activation is fake-quantized in ``forward``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .capture import Calibration, CalibrationError, select_linears
from .clipping import alpha_to_scale, clip_activation, clip_weight, gamma_grid
from .format_select import (DEFAULT_THRESHOLDS, FormatPlan, LayerFormat, ratio_rule, ratio_statistics,
                            select_format)
from .formats import NoFormat, parse_format
from .quantizer import _round_to_grid_, fake_quantize, round_to_grid, sqnr_db
from .recipes import AUTO, QuantRecipe, get_recipe

__all__ = ["QuantLinear", "SharedInput", "QuantAttnProcessor", "QuantizationError", "LayerReport", "QuantReport", "quantize_",
           "is_quantized", "save_quantized", "load_quantized"]


class QuantizationError(ValueError):
    """Misuse of :func:`quantize_` (already quantized, no layer selected, missing calibration …)."""


class _TimestepContext:
    """Holds the current timestep of the model call (set by a forward pre-hook on the model)."""

    def __init__(self) -> None:
        self.t: float | None = None

    def hook(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.t = None if t is None else float(torch.as_tensor(t).flatten()[0])
        return None


def _dynamic_token_quant(x: torch.Tensor, fmt, gamma: float) -> torch.Tensor:
    """Per-token (last-dim rows) dynamic quantization with α_t = γ·max|x_t|."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).to(torch.float32)
    s = torch.where(amax > 0, amax * (gamma / fmt.max_value), torch.ones_like(amax))
    return _round_to_grid_(x.to(torch.float32) / s, fmt).mul_(s).to(x.dtype)


def block_fake_quantize(x: torch.Tensor, fmt, block_size: int, scale_format) -> torch.Tensor:
    """Block-scaled fake quantization along the last dim; a last dim that is not a multiple of
    ``block_size`` is zero-padded for the scale computation (zeros do not change a block's max) and cut
    back. (The embedded model's width 144 is not a multiple of MX's 32.)"""
    d = x.shape[-1]
    pad = (-d) % block_size
    if pad == 0:
        return fake_quantize(x, fmt, block_size=block_size, scale_format=scale_format, check_finite=False)
    xp = F.pad(x, (0, pad))
    return fake_quantize(xp, fmt, block_size=block_size, scale_format=scale_format, check_finite=False)[..., :d]


class SharedInput:
    """The quantized input of a group of QuantLinears that read the *same* tensor with the same input
    transformation (``to_q``/``to_k``/``to_v``: same rotation, same activation quantizer): the first member
    called computes it, the others reuse it, the last one releases it. A different input tensor (or one
    modified in place, or another timestep) is recomputed, so results never change — only repeated work
    is skipped."""

    def __init__(self, members: int) -> None:
        self.members = members
        self._clear()

    def _clear(self) -> None:
        self.x, self.version, self.t, self.value, self.uses = None, -1, None, None, 0

    def get(self, layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
        if x.is_inference():  # no version counter, so an in-place change could not be seen: no reuse
            return layer.quantize_input(x)
        t = None if layer._ts_ctx is None else layer._ts_ctx.t
        if self.x is not x or self.version != x._version or self.t != t:
            self.x, self.version, self.t = x, x._version, t
            self.value, self.uses = layer.quantize_input(x), 0
        value = self.value
        self.uses += 1
        if self.uses >= self.members:  # every member has read it: do not keep tensors alive between calls
            self._clear()
        return value


class QuantLinear(nn.Module):
    """A fake-quantized replacement of ``nn.Linear``: ``y = Q_a(rotate(x · smooth_inv)) W_qᵀ + b``.

    Buffers (saved in ``state_dict``):
        weight: [out, in] the quantized weight (in the rotated basis when ``rotation`` is set) — computed
            once by :func:`quantize_`; ``bias``: [out] or absent.
        act_scale: [G] static activation scale(s) (``act_mode="static"``; G timestep groups, edges in
            ``ts_edges`` [G-1], ascending timestep values).
        smooth_inv: [in] per-channel 1/s of SmoothQuant (absent when off).

    Attributes:
        act_format: format name of the activation ("fp32": not quantized).
        act_mode: "none" | "static" | "token" (dynamic, α_t = ``act_gamma``·max|x_t|) | "block".
        rotation: a :class:`~hqdit_utils.hadamard.HadamardSpec` applied online to the input, or ``None``.
        weight_format: format name of ``weight`` (informative).
    """

    def __init__(self, in_features: int, out_features: int, *, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 weight_format: str = "fp32", act_format: str = "fp32", act_mode: str = "none",
                 act_scale: torch.Tensor | None = None, act_gamma: float = 1.0, block_size: int | None = None,
                 scale_format: str | None = None, rotation=None, smooth_inv: torch.Tensor | None = None,
                 ts_edges: torch.Tensor | None = None, name: str = "") -> None:
        super().__init__()
        if act_mode not in ("none", "static", "token", "block"):
            raise ValueError(f"act_mode must be none/static/token/block, got {act_mode!r}")
        if weight.shape != (out_features, in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({out_features}, {in_features})")
        if not torch.is_floating_point(weight):
            raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({out_features},)")
        if smooth_inv is not None and tuple(smooth_inv.shape) != (in_features,):
            raise ValueError(f"smooth_inv shape {tuple(smooth_inv.shape)} != ({in_features},)")
        if rotation is not None and rotation.n != in_features:
            raise ValueError(f"rotation of order {rotation.n} does not fit in_features={in_features}")
        if act_mode == "block" and not (isinstance(block_size, int) and block_size > 0):
            raise ValueError(f"act_mode='block' needs a positive integer block_size, got {block_size!r}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", weight.detach())
        if bias is not None:
            self.register_buffer("bias", bias.detach())
        else:
            self.bias = None
        self.weight_format = str(weight_format)
        self.act_format = str(act_format)
        self._act_fmt = parse_format(act_format)
        if isinstance(self._act_fmt, NoFormat):
            act_mode = "none"
        if act_mode == "static" and act_scale is None:
            raise ValueError("static activation quantization needs act_scale")
        self.act_mode = act_mode
        self.act_gamma = float(act_gamma)
        self.block_size, self.scale_format = block_size, scale_format
        self.rotation = rotation
        self.name = name
        if act_scale is not None:
            self.register_buffer("act_scale", torch.as_tensor(act_scale, dtype=torch.float32).reshape(-1).clone())
        else:
            self.act_scale = None
        if smooth_inv is not None:
            self.register_buffer("smooth_inv", smooth_inv.detach().to(torch.float32).clone())
        else:
            self.smooth_inv = None
        if ts_edges is not None:
            self.register_buffer("ts_edges", torch.as_tensor(ts_edges, dtype=torch.float64).reshape(-1).clone())
        else:
            self.ts_edges = None
        self._ts_ctx: _TimestepContext | None = None
        self._shared: SharedInput | None = None  # set by quantize_ for layers that read the same tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "") -> "QuantLinear":
        """An identity QuantLinear (no quantization): its output equals ``linear``'s bit for bit."""
        return cls(linear.in_features, linear.out_features, weight=linear.weight.data,
                   bias=None if linear.bias is None else linear.bias.data, name=name)

    def config(self) -> dict:
        """Everything but the tensors (JSON-serialisable) — with ``state_dict`` it rebuilds the module."""
        rot = None if self.rotation is None else {"n": self.rotation.n, "seed": self.rotation.seed,
                                                  "block": self.rotation.block}
        return {"in_features": self.in_features, "out_features": self.out_features,
                "weight_format": self.weight_format, "act_format": self.act_format, "act_mode": self.act_mode,
                "act_gamma": self.act_gamma, "block_size": self.block_size, "scale_format": self.scale_format,
                "rotation": rot, "has_bias": self.bias is not None, "has_smooth": self.smooth_inv is not None,
                "ts_groups": 0 if self.ts_edges is None else len(self.ts_edges) + 1,
                "act_groups": 0 if self.act_scale is None else len(self.act_scale), "name": self.name}

    def _current_scale(self) -> torch.Tensor:
        if self.ts_edges is None or len(self.act_scale) == 1:
            return self.act_scale[0]
        t = None if self._ts_ctx is None else self._ts_ctx.t
        if t is None:
            raise RuntimeError(f"{self.name}: per-timestep-group activation scales need the current timestep "
                               "(call the model with timestep=…; quantize_ installs the hook)")
        g = int(torch.searchsorted(self.ts_edges, torch.tensor([t], dtype=torch.float64))[0])
        return self.act_scale[g]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation as the matmul sees it: ``Q_a(rotate(x · smooth_inv))`` (same shape)."""
        if self.smooth_inv is not None:
            x = x * self.smooth_inv.to(x.dtype)
        if self.rotation is not None:
            from .hadamard import rotate_input

            x = rotate_input(x, self.rotation)
        mode = self.act_mode
        if mode == "none":
            return x
        if mode == "static":
            return fake_quantize(x, self._act_fmt, self._current_scale(), check_finite=False)
        if mode == "token":
            return _dynamic_token_quant(x, self._act_fmt, self.act_gamma)
        return block_fake_quantize(x, self._act_fmt, self.block_size, self.scale_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'QuantLinear'}: input of shape {tuple(x.shape)} does not fit "
                             f"in_features={self.in_features} (the last dimension must be {self.in_features})")
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"{self.name or 'QuantLinear'}: input dtype {x.dtype} differs from the weight's "
                             f"{self.weight.dtype}; cast the input (x.to({self.weight.dtype})) or the model (.to(dtype))")
        xq = self.quantize_input(x) if self._shared is None else self._shared.get(self, x)
        return F.linear(xq, self.weight, self.bias)

    def extra_repr(self) -> str:
        rot = "" if self.rotation is None else f", rotation=H{self.rotation.n}"
        return (f"in={self.in_features}, out={self.out_features}, W={self.weight_format}, "
                f"A={self.act_format}/{self.act_mode}{rot}")


class QuantAttnProcessor:
    """Attention with (optionally) quantized matmul inputs, for diffusers ``Attention`` (DiT self-attention).

    Computes ``softmax(Q Kᵀ/√d) V`` explicitly (instead of the fused SDPA kernel) so that Q, K, V and the
    softmax output P can be fake-quantized: Q, K, V per tensor with static scales ``scales["q"|"k"|"v"]``
    (``None``: dynamic per-tensor max-abs), P with α = 1 (probabilities ≤ 1). With ``fmt="fp32"`` nothing
    is quantized and the output matches the default processor to ~1e-6. ``observer(kind, tensor)`` is
    called with kind in q/k/v ([B·H·N, head_dim] rows) and p ([B·H·N, N_keys] rows) — used by calibration.
    """

    def __init__(self, fmt: str = "fp32", scales: dict | None = None, observer: Callable | None = None) -> None:
        self.fmt = parse_format(fmt)
        self.scales = dict(scales or {})
        self.observer = observer

    def _q(self, kind: str, t: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(kind, t.reshape(-1, t.shape[-1]))
        if isinstance(self.fmt, NoFormat):
            return t
        if kind == "p":
            return fake_quantize(t, self.fmt, 1.0 / self.fmt.max_value, check_finite=False)
        s = self.scales.get(kind)
        return fake_quantize(t, self.fmt, s, check_finite=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **kw):
        if (attn.spatial_norm is not None or attn.group_norm is not None or attention_mask is not None
                or hidden_states.ndim != 3 or encoder_hidden_states is not None):
            raise NotImplementedError("QuantAttnProcessor supports DiT self-attention on [B, N, C] inputs only")
        residual = hidden_states
        B, N, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        hd = k.shape[-1] // attn.heads
        q = q.view(B, -1, attn.heads, hd).transpose(1, 2)
        k = k.view(B, -1, attn.heads, hd).transpose(1, 2)
        v = v.view(B, -1, attn.heads, hd).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        q, k, v = self._q("q", q), self._q("k", k), self._q("v", v)
        p = torch.softmax((q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hd)), dim=-1)
        p = self._q("p", p)
        out = (p @ v).transpose(1, 2).reshape(B, -1, attn.heads * hd).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


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


@dataclass
class QuantReport:
    """What :func:`quantize_` did: the recipe, one :class:`LayerReport` per layer, the :class:`FormatPlan`."""

    recipe: QuantRecipe
    layers: list[LayerReport]
    plan: FormatPlan
    seconds: float
    meta: dict = field(default_factory=dict)

    def to_pandas(self):
        import pandas as pd

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


def block_weight_scales(W: torch.Tensor, fmt, block_size: int, scale_format) -> torch.Tensor:
    """The block scales ``[out, ceil(in / block_size)]`` that :func:`block_fake_quantize` uses for ``W``
    (zero padding of the last block does not change a block's max, nor NVFP4's tensor scale)."""
    from .quantizer import _block_scales

    pad = (-W.shape[1]) % block_size
    Wp = torch.nn.functional.pad(W.to(torch.float32), (0, pad)) if pad else W.to(torch.float32)
    xb = Wp.reshape(W.shape[0], Wp.shape[1] // block_size, block_size)
    return _block_scales(xb, parse_format(fmt), scale_format).squeeze(-1)


def _gptq_with_hessian(W, X, hessians: dict | None, key):
    from .gptq import GPTQ

    g = GPTQ(W)
    if hessians is not None and key is not None and key in hessians:
        g.set_hessian(*hessians[key])  # to_q/to_k/to_v share their input, hence their Hessian
    else:
        g.add_batch(X)
        if hessians is not None and key is not None:
            hessians[key] = (g.hessian, g.nsamples)
    return g


def _quantize_weight(W, X, recipe, grid, hessians: dict | None = None, key=None):
    """Returns (W_q, format name, mean γ, {candidate: mse}, stats, gptq info)."""
    stats = ratio_statistics(W, channel_axis=0)
    wf = recipe.weight_format
    info: dict = {}
    if recipe.weight_granularity == "block":
        fmt = parse_format(wf)
        if recipe.gptq and not isinstance(fmt, NoFormat):
            # GPTQ with block scales (ours): the scales of block_fake_quantize (E8M0 / E4M3-rounded) are
            # fixed first from the weight, then GPTQ rounds each block onto them (groupsize = block).
            g = _gptq_with_hessian(W, X, hessians, key)
            res = g.quantize(fmt, block_weight_scales(W, fmt, recipe.block_size, recipe.scale_format),
                             groupsize=recipe.block_size, blocksize=recipe.gptq_blocksize,
                             percdamp=recipe.gptq_percdamp)
            info = {k: v for k, v in vars(res).items() if k != "weight" and isinstance(v, (int, float, str, bool))}
            return res.weight, wf, 1.0, {}, stats, info
        return (block_fake_quantize(W, fmt, recipe.block_size, recipe.scale_format),
                wf, 1.0, {}, stats, info)
    mse: dict = {}
    method = recipe.weight_clip
    kw = {"inputs": X} if method == "output" else {}
    if recipe.weight_granularity == "tensor":
        def clip(name):
            return clip_activation(W, name, granularity="tensor", method="mse" if method == "output" else method,
                                   grid=grid, p=recipe.clip_p, search=recipe.clip_search, stride=recipe.clip_stride)
    else:
        def clip(name):
            return clip_weight(W, name, method=method, grid=grid, p=recipe.clip_p, search=recipe.clip_search,
                               stride=recipe.clip_stride, **kw)
    if wf == AUTO:
        cands = list(recipe.weight_candidates)
        if recipe.format_rule == "ratio":
            th = recipe.ratio_thresholds or DEFAULT_THRESHOLDS[recipe.ratio_statistic]
            wf = ratio_rule(stats[recipe.ratio_statistic], th, cands)
            cr = clip(wf)
        else:
            clips = {c: clip(c) for c in cands}
            mse = {c: r.mse for c, r in clips.items()}
            score = mse if recipe.format_rule == "mse" else {c: float(r.loss.sum()) for c, r in clips.items()}
            wf = min(cands, key=lambda c: score[c])
            cr = clips[wf]
    else:
        cr = clip(wf)
    fmt = parse_format(wf)
    scale = cr.scale(fmt)
    if recipe.gptq and not isinstance(fmt, NoFormat):
        g = _gptq_with_hessian(W, X, hessians, key)
        res = g.quantize(fmt, scale.reshape(-1) if scale.dim() else scale.expand(W.shape[0]),
                                             blocksize=recipe.gptq_blocksize, percdamp=recipe.gptq_percdamp)
        Wq = res.weight
        info = {k: v for k, v in vars(res).items() if k != "weight" and isinstance(v, (int, float, str, bool))}
    else:
        Wq = fake_quantize(W, fmt, scale)
    return Wq, wf, float(cr.gamma.float().mean()), mse, stats, info


def _quantize_act(X, Wq, recipe, grid, tags, ts_groups, ext=None, ext_tags=None):
    """Returns (QuantLinear kwargs, Q(X), format, γ, α, {candidate: mse}, stats)."""
    stats = ratio_statistics(X, channel_axis=1)
    af = recipe.act_format
    if isinstance(parse_format(af) if af != AUTO else None, NoFormat):
        return {"act_mode": "none", "act_format": "fp32"}, X, "fp32", 1.0, float("nan"), {}, stats
    if recipe.act_granularity == "block":
        fmt = parse_format(af)
        kw = {"act_mode": "block", "act_format": af, "block_size": recipe.block_size,
              "scale_format": recipe.scale_format}
        return kw, block_fake_quantize(X, fmt, recipe.block_size, recipe.scale_format), \
            af, 1.0, float("nan"), {}, stats
    gran = recipe.act_granularity
    method = recipe.act_clip
    ckw = {"weight": Wq} if method == "output" else {}
    mse: dict = {}
    clips: dict = {}  # candidate format -> its search on all rows X (reused for the chosen format)

    def clip(name, rows, group=None):
        kw = dict(ckw)
        if gran == "tensor" and ext is not None and len(ext):
            e = ext if group is None else ext[torch.isin(ext_tags, torch.tensor(group))]
            if len(e):
                kw["amax"] = e.abs().amax()  # the calibration-wide max (extreme rows), not the sample's
        return clip_activation(rows, name, granularity=gran, method=method, grid=grid, p=recipe.clip_p,
                               search=recipe.clip_search, stride=recipe.clip_stride, **kw)
    if af == AUTO:
        cands = list(recipe.act_candidates)
        if recipe.format_rule == "ratio":
            th = recipe.ratio_thresholds or DEFAULT_THRESHOLDS[recipe.ratio_statistic]
            af = ratio_rule(stats[recipe.ratio_statistic], th, cands)
        else:
            clips = {c: clip(c, X) for c in cands}
            mse = {c: r.mse for c, r in clips.items()}
            score = mse if recipe.format_rule == "mse" else {c: float(r.loss) for c, r in clips.items()}
            af = min(cands, key=lambda c: score[c])
    fmt = parse_format(af)
    if gran == "token":
        cr = clips.get(af) or clip(af, X)
        g = float(cr.gamma)
        return ({"act_mode": "token", "act_format": af, "act_gamma": g}, _dynamic_token_quant(X, fmt, g),
                af, g, float(cr.alpha), mse, stats)
    # static per tensor, optionally per timestep group
    if ts_groups is None:
        cr = clips.get(af) or clip(af, X)
        s = alpha_to_scale(cr.alpha, fmt).reshape(1)
        return ({"act_mode": "static", "act_format": af, "act_scale": s}, fake_quantize(X, fmt, s[0]),
                af, float(cr.gamma), float(cr.alpha), mse, stats)
    groups, edges = ts_groups
    scales, gammas = [], []
    for grp in groups:
        sel = X[torch.isin(tags, torch.tensor(grp))]
        if len(sel) == 0:
            raise QuantizationError(f"no calibration rows for timestep group {grp}")
        cr = clip(af, sel, grp)
        scales.append(float(alpha_to_scale(cr.alpha, fmt)))
        gammas.append(float(cr.gamma))
    s = torch.tensor(scales)
    sx = s[torch.searchsorted(edges, tags.double())][:, None]
    Xq = round_to_grid(X / sx, fmt) * sx
    return ({"act_mode": "static", "act_format": af, "act_scale": s, "ts_edges": edges}, Xq, af,
            float(np.mean(gammas)), float(s.max() * fmt.max_value), mse, stats)


def _attn_scales(calibration: Calibration | None, attn_name: str, fmt) -> dict:
    out = {}
    for kind in ("q", "k", "v"):
        key = f"{attn_name}.{kind}"
        if calibration is not None and key in calibration:
            out[kind] = float(alpha_to_scale(calibration[key].pooled().absmax, fmt))
    return out


@torch.no_grad()
def quantize_(model: nn.Module, recipe: "QuantRecipe | str", calibration: Calibration | None = None, *,
              verbose: bool = False) -> QuantReport:
    """Quantize ``model`` in place according to ``recipe`` and return a :class:`QuantReport`.

    Args:
        model: a diffusers DiT transformer (or any module with ``nn.Linear`` children).
        recipe: a :class:`~hqdit_utils.recipes.QuantRecipe` or its name.
        calibration: from :func:`~hqdit_utils.capture.calibrate`; required unless the recipe needs none
            (``recipe.needs_calibration``), and it must cover the recipe's layers.
    Raises:
        QuantizationError: the model is already quantized, the recipe selects no layer, a pattern matches
            nothing, or calibration data are missing.
    """
    recipe = get_recipe(recipe)
    t_start = time.perf_counter()
    if is_quantized(model):
        raise QuantizationError("the model is already quantized (it contains QuantLinear modules); quantize a "
                                "fresh FP32 copy instead of quantizing twice")
    if not recipe.layers:
        raise QuantizationError(f"recipe {recipe.name!r} names no layer (layers=())")
    try:
        selected = select_linears(model, recipe.layers, recipe.exclude)
    except CalibrationError as err:
        raise QuantizationError(f"recipe {recipe.name!r}: {err}") from None
    if recipe.needs_calibration and calibration is None:
        raise QuantizationError(f"recipe {recipe.name!r} needs calibration data: pass calibrate(bundle, "
                                f"layers={recipe.layers}) as `calibration`")
    if calibration is not None and recipe.needs_calibration:
        missing = [n for n in selected if n not in calibration]
        if missing:
            raise QuantizationError(f"calibration has no data for {len(missing)} selected layer(s), e.g. "
                                    f"{missing[:3]}; capture with the recipe's layer patterns {recipe.layers}")
    grid = _grid(recipe)
    plan = FormatPlan(candidates=list(recipe.weight_candidates), meta={"recipe": recipe.name})
    reports: list[LayerReport] = []
    ts_ctx = _TimestepContext() if recipe.timestep_groups > 1 else None
    ts_groups = None
    if ts_ctx is not None:
        if calibration is None:
            raise QuantizationError("timestep_groups needs calibration")
        ts_groups = _timestep_groups(calibration.timesteps, recipe.timestep_groups)
    new_modules: dict[str, QuantLinear] = {}
    groups: dict = {}  # layers reading the same tensor with the same input quantizer (to_q/to_k/to_v)
    act_cache: dict = {}
    hessians: dict = {}
    last_key = None
    for name, lin in selected.items():
        t0 = time.perf_counter()
        W = lin.weight.detach().to(torch.float32)
        d = W.shape[1]
        rec = calibration[name] if (calibration is not None and name in calibration) else None
        if rec is not None:
            rows_all, tags_all = rec.rows_by_timestep()
            idx = _subsample(torch.arange(len(rows_all)), recipe.max_calib_rows)
            X, tags = rows_all[idx].to(torch.float32), tags_all[idx]
            ext, ext_tags = rec.extreme_rows()
            if len(X) == 0:
                raise QuantizationError(f"layer {name!r}: the calibration holds no rows (rows_per_timestep=0?)")
        else:
            X, tags, ext, ext_tags = None, None, None, None
        if recipe.is_identity:
            ql = QuantLinear.from_linear(lin, name)
            new_modules[name] = ql
            plan.layers[name] = LayerFormat("fp32", "fp32")
            reports.append(LayerReport(name, d, W.shape[0], "fp32", "fp32", "none", 1.0, 1.0, float("nan"),
                                       math.inf, math.inf, math.inf, False, False, 0 if X is None else len(X),
                                       time.perf_counter() - t0))
            continue
        Xw = X if X is not None else torch.zeros(0, d)
        smooth_inv = None
        if recipe.smoothquant_alpha is not None:
            a = recipe.smoothquant_alpha
            xmax = rec.pooled().channel_absmax.to(torch.float32).clamp(min=1e-5)
            wmax = W.abs().amax(dim=0).clamp(min=1e-5)
            s = (xmax.pow(a) / wmax.pow(1 - a)).clamp(min=1e-5)
            W = W * s[None, :]
            Xw = Xw / s[None, :]
            ext = ext / s[None, :]
            smooth_inv = 1.0 / s
        rot = None
        if recipe.rotation:
            from .hadamard import HadamardSpec, rotate_input, rotate_weight

            rot = HadamardSpec(d, seed=recipe.rotation_seed, block=recipe.rotation_block)
            W = rotate_weight(W, rot)
            Xw = rotate_input(Xw, rot)
            if ext is not None and len(ext):
                ext = rotate_input(ext, rot)
        if recipe.gptq and len(Xw) == 0:
            raise QuantizationError(f"layer {name!r}: GPTQ needs calibration rows")
        share_key = id(rec) if (rec is not None and recipe.smoothquant_alpha is None) else None
        if share_key is None or share_key != last_key:  # one-slot caches: layers sharing an input are consecutive
            hessians.clear()
            act_cache.clear()
        last_key = share_key
        Wq, wf, wgamma, wmse, wstats, ginfo = _quantize_weight(W, Xw, recipe, grid, hessians, share_key)
        # layers reading the same tensor (to_q/to_k/to_v) share the activation search unless it depends on
        # the layer's own weight (layer-output loss, SmoothQuant)
        cache_key = None
        if recipe.smoothquant_alpha is None and recipe.act_clip != "output" and recipe.format_rule != "output":
            cache_key = share_key
        if len(Xw) and cache_key is not None and cache_key in act_cache:
            akw, Xq, af, agamma, aalpha, amse, astats = act_cache[cache_key]
        elif len(Xw):
            akw, Xq, af, agamma, aalpha, amse, astats = _quantize_act(
                Xw, Wq, recipe, grid, tags, ts_groups, ext, ext_tags)
            if cache_key is not None:
                act_cache[cache_key] = (akw, Xq, af, agamma, aalpha, amse, astats)
        else:  # dynamic activation recipes without calibration
            af = recipe.act_format
            if af == AUTO:
                raise QuantizationError(f"layer {name!r}: format selection needs calibration rows")
            fmt_a = parse_format(af)
            if isinstance(fmt_a, NoFormat):
                akw = {"act_mode": "none", "act_format": "fp32"}
            elif recipe.act_granularity == "block":
                akw = {"act_mode": "block", "act_format": af, "block_size": recipe.block_size,
                       "scale_format": recipe.scale_format}
            else:
                akw = {"act_mode": "token", "act_format": af, "act_gamma": 1.0}
            Xq, agamma, aalpha, amse, astats = Xw, 1.0, float("nan"), {}, {}
        ql = QuantLinear(d, W.shape[0], weight=Wq.to(lin.weight.dtype),
                         bias=None if lin.bias is None else lin.bias.data, weight_format=wf,
                         rotation=rot, smooth_inv=smooth_inv, name=name, **akw)
        ql._ts_ctx = ts_ctx
        if cache_key is not None:
            groups.setdefault(cache_key, []).append(ql)
        new_modules[name] = ql
        plan.layers[name] = LayerFormat(wf, akw["act_format"], wmse, amse, wstats, astats, wgamma, agamma)
        if len(Xw):
            ref = Xw @ W.T
            out_sqnr = sqnr_db(ref, Xq @ Wq.T)
            a_sqnr = sqnr_db(Xw, Xq)
        else:
            out_sqnr = a_sqnr = float("nan")
        reports.append(LayerReport(name, d, W.shape[0], wf, akw["act_format"], akw["act_mode"], wgamma, agamma,
                                   aalpha, sqnr_db(W, Wq), a_sqnr, out_sqnr, rot is not None, recipe.gptq,
                                   len(Xw), time.perf_counter() - t0, ginfo))
        if verbose:
            r = reports[-1]
            print(f"{name}: W {wf} A {r.act_format} SQNR out {r.output_sqnr:.2f} dB ({r.seconds:.2f} s)")
    for members in groups.values():
        if len(members) > 1:
            shared = SharedInput(len(members))
            for ql in members:
                ql._shared = shared
    # swap only after everything succeeded: a failure above leaves the model untouched
    for name, ql in new_modules.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ql)
    if recipe.quantize_attention:
        fmt = parse_format(recipe.attn_format)
        for name in selected:
            if name.endswith(".to_q"):
                attn_name = name[: -len(".to_q")]
                attn = model.get_submodule(attn_name)
                attn.set_processor(QuantAttnProcessor(recipe.attn_format, _attn_scales(calibration, attn_name, fmt)))
    if ts_ctx is not None:
        model._hqdit_ts_hook = model.register_forward_pre_hook(ts_ctx.hook, with_kwargs=True)
    model._hqdit_recipe = recipe.name
    return QuantReport(recipe, reports, plan, time.perf_counter() - t_start,
                       {"calibration": None if calibration is None else dict(calibration.meta)})


# --------------------------------------------------------------------------------------------------
# Saving and loading the quantized state
# --------------------------------------------------------------------------------------------------
def save_quantized(model: nn.Module, out_dir, report: QuantReport | None = None) -> Path:
    """Write ``quant_state.safetensors`` (every QuantLinear's buffers), ``quant_config.json`` (their
    configs + the recipe), and, with a report, ``plan.json`` and ``report.csv`` into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, configs = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            configs[name] = m.config()
            for k, v in m.state_dict().items():
                tensors[f"{name}.{k}"] = v.contiguous()
    if not configs:
        raise QuantizationError("save_quantized: the model holds no QuantLinear")
    save_file(tensors, str(out / "quant_state.safetensors"))
    meta = {"recipe": getattr(model, "_hqdit_recipe", None), "layers": configs}
    if report is not None:
        meta["recipe_fields"] = report.recipe.to_dict()
        report.plan.save(out / "plan.json")
        report.to_pandas().to_csv(out / "report.csv")
    (out / "quant_config.json").write_text(json.dumps(meta, indent=1))
    return out


def load_quantized(model: nn.Module, out_dir) -> nn.Module:
    """Rebuild the QuantLinears saved by :func:`save_quantized` into a fresh FP32 ``model`` (in place).

    Attention processors and timestep-group hooks are not restored (re-run quantize_ for those).

    Raises:
        FileNotFoundError: ``quant_config.json`` or ``quant_state.safetensors`` is missing.
        QuantizationError: a damaged file, missing or unexpected tensors, or layers that ``model`` lacks;
            the model is left unchanged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out = Path(out_dir)
    redo = f"re-create it with `hqdit quantize --recipe NAME --out {out}` (or save_quantized)"
    cfg_file, state_file = out / "quant_config.json", out / "quant_state.safetensors"
    for f in (cfg_file, state_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: {out} is not a complete quantized-model folder; {redo}")
    if is_quantized(model):
        raise QuantizationError("load_quantized needs an unquantized model")
    try:
        meta = json.loads(cfg_file.read_text())
        tensors = load_file(str(state_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise QuantizationError(f"cannot read {out} ({type(err).__name__}: {err}): a file is corrupted or "
                                f"truncated; {redo}") from err
    expected = set()
    for name, cfg in meta["layers"].items():
        expected |= {f"{name}.{k}" for k, on in (("weight", True), ("bias", cfg["has_bias"]),
                     ("act_scale", cfg["act_groups"]), ("smooth_inv", cfg["has_smooth"]), ("ts_edges", cfg["ts_groups"]))
                     if on}
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear) or (lin.in_features, lin.out_features) != (cfg["in_features"], cfg["out_features"]):
            raise QuantizationError(f"{state_file} holds layer {name!r} [{cfg['out_features']}x{cfg['in_features']}], "
                                    f"which the model has not (found {type(lin).__name__}); load it into the model "
                                    "it was quantized from (load_dit(SOURCE).transformer)")
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise QuantizationError(f"{state_file} does not match {cfg_file.name}: missing tensors {missing[:8]}, "
                                f"unexpected tensors {unexpected[:8]}; {redo}")
    new_modules = {}
    for name, cfg in meta["layers"].items():
        rot = None
        if cfg["rotation"] is not None:
            from .hadamard import HadamardSpec

            rot = HadamardSpec(cfg["rotation"]["n"], seed=cfg["rotation"]["seed"], block=cfg["rotation"]["block"])
        get = lambda k: tensors.get(f"{name}.{k}")  # noqa: E731
        ql = QuantLinear(cfg["in_features"], cfg["out_features"], weight=get("weight"), bias=get("bias"),
                         weight_format=cfg["weight_format"], act_format=cfg["act_format"], act_mode=cfg["act_mode"],
                         act_scale=get("act_scale"), act_gamma=cfg["act_gamma"], block_size=cfg["block_size"],
                         scale_format=cfg["scale_format"], rotation=rot, smooth_inv=get("smooth_inv"),
                         ts_edges=get("ts_edges"), name=name)
        new_modules[name] = ql
    for name, ql in new_modules.items():  # swap only after every layer was rebuilt
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ql)
    model._hqdit_recipe = meta.get("recipe")
    return model
