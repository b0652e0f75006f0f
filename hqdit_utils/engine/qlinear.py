"""The run-time modules of a quantized DiT: :class:`QuantLinear`, :class:`SharedInput`, :class:`QuantAttnProcessor`.

:class:`QuantLinear` computes ``F.linear(Q_a(rotate(x / s)), W_q, b)``: the weight is a stored, already
fake-quantized tensor (no per-call weight work), the activation is fake-quantized in ``forward`` —
static per tensor (optionally one scale per timestep group), dynamic per token, or dynamic per block.
:func:`~hqdit_utils.engine.qmodel.quantize_` builds them; nothing here searches or calibrates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .formats import Format, NoFormat, parse_format
from .hadamard import rotate_input
from .quantizer import block_fake_quantize, fake_quantize, token_fake_quantize

__all__ = ["TimestepContext", "SharedInput", "ActivationQuantizer", "IntegerPath", "QuantLinear",
           "QuantAttnProcessor"]


class TimestepContext:
    """Holds the current timestep of the model call (set by a forward pre-hook on the model)."""

    def __init__(self) -> None:
        self.t: float | None = None

    def hook(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.t = None if t is None else float(torch.as_tensor(t).flatten()[0])
        return None


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
        self.x, self.version, self.t, self.value, self.uses = None, -1, None, {}, 0

    def get(self, layer: "QuantLinear", x: torch.Tensor, kind: str = "sim", compute=None):
        """``compute(x)`` (default ``layer.quantize_input``) for the first member that asks, shared with
        the others; one value per ``kind`` ("sim": the fake-quantized tensor, "int": integer codes)."""
        compute = layer.quantize_input if compute is None else compute
        compiling = torch.compiler.is_compiling()
        if not compiling and x.is_inference():  # no version counter, so an in-place change could not be seen: no reuse
            return compute(x)
        t = None if layer.ts_ctx is None else layer.ts_ctx.t
        # in a compiled graph the members read the same traced tensor (nothing there changes it in place)
        version = -1 if compiling else x._version
        if self.x is not x or self.version != version or self.t != t:
            self.x, self.version, self.t = x, version, t
            self.value, self.uses = {}, 0
        if kind not in self.value:
            self.value[kind] = compute(x)
        value = self.value[kind]
        self.uses += 1
        if self.uses >= self.members:  # every member has read it: do not keep tensors alive between calls
            self._clear()
        return value


@dataclass(frozen=True)
class ActivationQuantizer:
    """How a :class:`QuantLinear` quantizes its (transformed) input at this call — what an exact integer path
    needs to compute the same activation codes (:meth:`QuantLinear.act_quantizer`).

    Attributes:
        fmt: the activation format (:class:`~hqdit_utils.engine.formats.NoFormat` when not quantized).
        mode: "none" | "static" | "token" | "block" (as ``QuantLinear.act_mode``).
        scale: 0-d float32 tensor, the static scale of the current timestep group (``mode="static"``), else ``None``.
        gamma: dimensionless factor of the per-token scale ``α_t = gamma · max|x_t|`` (``mode="token"``).
    """

    fmt: Format
    mode: str
    scale: torch.Tensor | None
    gamma: float


class IntegerPath(Protocol):
    """What a :class:`QuantLinear` asks of the exact integer execution attached as ``layer.lowbit``
    (implemented by :class:`hqdit_utils.engine.lowbit.IntLinearState`; this module does not import it).

    Attributes:
        enabled: run the integer path (``False``: the layer runs its simulated path).
        weight_dtype: dtype of the float weight the codes stand for (a codes-only layer's dtype).
    """

    enabled: bool
    weight_dtype: torch.dtype

    def current(self, layer: "QuantLinear") -> bool:
        """Whether the codes still describe ``layer``'s weight (re-planned if not; ``False``: use the simulation)."""

    def forward(self, layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` on the integer path: ``x`` [..., in] → [..., out]."""

    def float_weight(self) -> torch.Tensor:
        """The weight [out, in] decoded from the codes in ``weight_dtype`` (codes-only layers' simulated path)."""

    def follow_(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Follow the layer's ``_apply(fn)`` (``.to(device / dtype)``): codes and scales move with it."""


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
        rotation: a :class:`~hqdit_utils.engine.hadamard.HadamardSpec` applied online to the input, or ``None``.
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
        self.ts_ctx: TimestepContext | None = None  # set by quantize_ with per-timestep-group scales
        self.shared: SharedInput | None = None  # set by quantize_ for layers that read the same tensor
        self.lowbit: IntegerPath | None = None  # set when the layer runs (or can run) on the exact integer path

    def _apply(self, fn, recurse=True):
        """``.to(device / dtype)``, ``.half()``, ``.double()``, ``.cuda()`` …: the weight and bias follow ``fn``;
        the quantizer's own tensors (``act_scale``, ``smooth_inv`` float32, ``ts_edges`` float64) and the integer
        codes move to the new device but keep their dtypes (a bfloat16 ``act_scale`` would be another scale).
        Codes-only layers decode their weight in the new dtype; off the CPU they use the simulated path."""
        keep = {k: b for k in ("act_scale", "smooth_inv", "ts_edges") if (b := self._buffers.get(k)) is not None}
        super()._apply(fn, recurse)
        probe = fn(torch.zeros(1))
        for k, b in keep.items():
            self._buffers[k] = b.to(probe.device)
        if self.lowbit is not None:
            self.lowbit.follow_(fn)
        return self

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

    def act_quantizer(self) -> ActivationQuantizer:
        """The activation quantizer as it applies now (the static scale of the current timestep group).

        Raises:
            RuntimeError: per-timestep-group scales and no current timestep (call the model with ``timestep=``).
        """
        scale = self._current_scale() if self.act_mode == "static" else None
        return ActivationQuantizer(self._act_fmt, self.act_mode, scale, self.act_gamma)

    def _current_scale(self) -> torch.Tensor:
        if self.ts_edges is None or len(self.act_scale) == 1:
            return self.act_scale[0]
        t = None if self.ts_ctx is None else self.ts_ctx.t
        if t is None:
            raise RuntimeError(f"{self.name}: per-timestep-group activation scales need the current timestep "
                               "(call the model with timestep=…; quantize_ installs the hook)")
        g = int(torch.searchsorted(self.ts_edges, torch.tensor([t], dtype=torch.float64))[0])
        return self.act_scale[g]

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``rotate(x · smooth_inv)`` (same shape and dtype; ``x`` itself when neither is set)."""
        if self.smooth_inv is not None:
            x = x * self.smooth_inv.to(x.dtype)
        if self.rotation is not None:
            x = rotate_input(x, self.rotation)
        return x

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation as the matmul sees it: ``Q_a(rotate(x · smooth_inv))`` (same shape)."""
        x = self.transform_input(x)
        mode = self.act_mode
        if mode == "none":
            return x
        if mode == "static":
            return fake_quantize(x, self._act_fmt, self._current_scale(), check_finite=False)
        if mode == "token":
            return token_fake_quantize(x, self._act_fmt, self.act_gamma)
        return block_fake_quantize(x, self._act_fmt, self.block_size, self.scale_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'QuantLinear'}: input of shape {tuple(x.shape)} does not fit "
                             f"in_features={self.in_features} (the last dimension must be {self.in_features})")
        lb = self.lowbit
        wdtype = self.weight.dtype if self.weight is not None else lb.weight_dtype
        if x.dtype != wdtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"{self.name or 'QuantLinear'}: input dtype {x.dtype} differs from the weight's "
                             f"{wdtype}; cast the input (x.to({wdtype})) or the model (.to(dtype))")
        # the exact integer path (lowbit.py); a compiled graph does not re-plan (tracing changes data pointers)
        if lb is not None and lb.enabled and (torch.compiler.is_compiling() or lb.current(self)):
            return lb.forward(self, x)
        xq = self.quantize_input(x) if self.shared is None else self.shared.get(self, x)
        weight = self.weight if self.weight is not None else lb.float_weight()  # codes only: decode
        return F.linear(xq, weight, self.bias)

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
