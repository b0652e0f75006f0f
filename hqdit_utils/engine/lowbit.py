"""Real low-bit execution on the CPU: integer codes, packed 4-bit weights and an exact int32 GEMM linear.

Every grid this project quantizes to with per-row / per-tensor / per-token scales becomes a small integer
grid after one power-of-two factor ``m`` (:func:`integer_grid`)::

    fp4_e2m1 × 2 ∈ {0, ±1, ±2, ±3, ±4, ±6, ±8, ±12}      fp4_e1m2 × 2 ∈ [−7, 7]
    fp4_e3m0 × 4 ∈ {0, ±1, ±2, ±4, …, ±64}               int4 ∈ [−7, 7], int8 ∈ [−127, 127] (m = 1)

so a quantized linear ``y = Q_a(x) Q_w(W)ᵀ + b`` with ``Q_w(W)[j, :] = c_w[j, :] · s_w[j] / m_w`` (one scale per
output row) and ``Q_a(x)[i, :] = c_a[i, :] · s_a[i] / m_a`` (``s_a`` one static scale per tensor, or one per
token) is computed exactly as::

    acc = c_a @ c_wᵀ                 int8 × int8 → int32 (torch._int_mm; exact while qmax_w·qmax_a·in < 2³¹)
    y   = acc · (s_a s_w / (m_a m_w)) + b                one float32 rescale per output element

The activation codes come from the same operations as the simulated path (``quantizer.round_to_grid_`` of
``x / s_a`` after the same SmoothQuant factor and online Hadamard rotation), so the integer path computes the
simulation's numbers without its rounding of every product: its output equals a float64 evaluation of the same
codes to a few float32 ulps, and the simulated path's up to float32 accumulation order.

What cannot run exactly stays simulated, with a one-line reason (:func:`plan_layer`): unquantized or
block-scaled (MX/NVFP4) activations or weights, formats whose integer grid exceeds int8 (FP8), unsigned grids,
a weight that is not an integer grid × per-row scale in its dtype, non-CPU tensors, and builds without
``torch._int_mm`` (a warning). Attention-matmul quantization (``QuantAttnProcessor``) is always simulated.

Two exact int8 GEMM kernels (:data:`KERNELS`): ``torch._int_mm`` and oneDNN's quantized linear
(``torch.ops.onednn.qlinear_pointwise``, weight prepacked once per layer, called with unit scales and no bias so
that it returns ``float(acc)`` exactly). Both give the int32 accumulator; one rescale (:func:`rescale`) turns it
into the output, so **the kernels agree bit for bit** and the choice of kernel, or of CPU, changes no number.
That rescale is the formula oneDNN's AVX2 kernel fuses (``float(acc) · (s_a · s_w)`` then ``+ b``, each step
rounded to float32; measured bit for bit), the kernel of the machine that made the book's shipped runs.
Which kernel runs is *measured* (:func:`choose_kernel`): the first time a (K, N) shape runs at a thread count,
the exact kernels are timed on it and the fastest is kept, per machine, in ``int8_kernels.json`` under the
package's cache dir. Their speed differs by orders of magnitude between CPUs: ``torch._int_mm`` has no fast
kernel without int8 dot-product instructions (AVX2), and oneDNN may run its reference kernel (an AVX512 AMD
EPYC). oneDNN on AVX2 adds pairs of u8×s8 products in int16, so it is a candidate only where no pair can
saturate (:func:`onednn_exact`: every FP4 variant and INT4, not INT8 weights); INT8-weight layers therefore
have ``torch._int_mm`` only, and ``"auto"`` runs them on the integer path only on CPUs with int8 dot-product
instructions (:func:`int_mm_fast`), else simulated; ``"int"`` runs ``torch._int_mm`` there all the same.

API: :func:`set_execution` / :func:`execution` (force ``"int"``, ``"sim"`` or choose ``"auto"``),
:func:`execution_paths` (which path each layer runs and why), :func:`drop_float_weights_` (keep only the
codes: packed 4-bit or int8), :func:`packed_weight` / :func:`packed_weights` / :func:`install_packed` (files: ``save_quantized(...,
packed=True)``, ``export.save_packed(model, path)``), and the building blocks :func:`integer_grid`, :func:`grid_to_codes`,
:func:`codes_to_grid`, :func:`quantize_to_codes`, :func:`weight_codes`, :func:`pack_codes`,
:func:`unpack_codes`, :func:`int_matmul`.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from .codes import PackedWeight, decode, encode, pack_nibbles, pack_rows, row_grid_values
from .. import config
from ..files import write_json_atomic
from .formats import FloatFormat, Format, IntFormat, NoFormat, parse_format
from ..provenance import cpu_flags, cpu_model
from .qlinear import QuantLinear
from .quantizer import round_to_grid_

__all__ = ["LowbitError", "IntegerGrid", "integer_grid", "grid_to_codes", "codes_to_grid", "quantize_to_codes",
           "weight_codes", "pack_codes", "unpack_codes", "int_matmul", "int_mm_available", "int_mm_fast",
           "INT8_DOT_FLAGS", "KERNELS", "onednn_available", "onednn_exact", "int_kernel", "rescale",
           "KERNEL_CACHE_FILE", "kernel_candidates", "measure_kernels", "choose_kernel", "IntLinearState",
           "plan_layer", "set_execution", "execution", "execution_paths", "drop_float_weights_", "MODES",
           "PACKED_FILE", "packed_weight", "packed_weights", "placeholder_weight", "install_packed"]

MODES = ("auto", "int", "sim")
_INT32_MAX = 2 ** 31 - 1


class LowbitError(ValueError):
    """A layer or format that the integer path cannot compute exactly (the message says why)."""


# --------------------------------------------------------------------------------------------------
# Integer grids and codes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntegerGrid:
    """The integer form of a format's grid: ``grid · multiplier`` are the integers ``levels``.

    Attributes:
        fmt: format name (``"fp4_e2m1"`` …).
        multiplier: the power of two ``m`` (1 for integer formats).
        qmax: largest integer code (≤ 127, so codes fit int8).
        levels: every integer code, ascending (``2·len(positive levels) + 1`` values).
        bits: bits of one stored code (4 for the FP4 variants and int4: two codes per byte at rest).
    """

    fmt: str
    multiplier: int
    qmax: int
    levels: tuple[int, ...]
    bits: int


@lru_cache(maxsize=None)
def _integer_grid(fmt: Format) -> IntegerGrid:
    if isinstance(fmt, NoFormat):
        raise LowbitError("not quantized (fp32)")
    if isinstance(fmt, IntFormat):
        if not fmt.signed:
            raise LowbitError(f"{fmt} is an unsigned (zero-point) grid")
        if fmt.max_value > 127:
            raise LowbitError(f"{fmt} codes exceed int8")
        q = int(fmt.max_value)
        return IntegerGrid(str(fmt), 1, q, tuple(range(-q, q + 1)), fmt.bits)
    if not isinstance(fmt, FloatFormat):
        raise LowbitError(f"unsupported format {fmt!r}")
    if not fmt.saturate or fmt.special == "ieee":
        raise LowbitError(f"{fmt} is not saturating (overflow gives inf/NaN)")
    grid = fmt.grid().double()
    m = 1
    while not bool((grid * m == (grid * m).round()).all()):
        m *= 2
        if grid.abs().max() * m > 127:
            break
    q = grid.abs().max() * m
    if q > 127:
        raise LowbitError(f"{fmt} × {m} spans ±{float(q):g}, more than int8 holds")
    return IntegerGrid(str(fmt), m, int(q), tuple(int(v) for v in (grid * m).tolist()), fmt.bits)


def integer_grid(fmt: "str | Format | IntegerGrid") -> IntegerGrid:
    """The :class:`IntegerGrid` of ``fmt``. Raises :class:`LowbitError` (one-line reason) when none fits int8."""
    if isinstance(fmt, IntegerGrid):
        return fmt
    return _integer_grid(parse_format(fmt))


def grid_to_codes(values: torch.Tensor, fmt: "str | Format") -> torch.Tensor:
    """int8 codes (same shape) of ``values`` lying exactly on ``fmt``'s grid (unit scale).

    Raises:
        LowbitError: a value that is not a grid point.
    """
    g = integer_grid(fmt)
    c = values.detach().to(torch.float64) * g.multiplier
    ok = torch.zeros(2 * g.qmax + 1, dtype=torch.bool)
    ok[torch.tensor(g.levels) + g.qmax] = True
    ci = c.round()
    if ci.numel() and (not bool((c == ci).all()) or float(ci.abs().max()) > g.qmax
                       or not bool(ok[ci.to(torch.int64) + g.qmax].all())):
        raise LowbitError(f"values are not on the {g.fmt} grid; quantize them first")
    return ci.to(torch.int8)


def codes_to_grid(codes: torch.Tensor, fmt: "str | Format") -> torch.Tensor:
    """float32 grid values (unit scale) of int8 ``codes``: ``codes / multiplier``."""
    return codes.to(torch.float32) / integer_grid(fmt).multiplier


def quantize_to_codes(x: torch.Tensor, scale: "torch.Tensor | float", fmt: "str | Format") -> torch.Tensor:
    """int8 codes of ``round_to_grid(x / scale, fmt)`` — the same operations as ``fake_quantize(x, fmt, scale)``,
    so ``codes / m · scale`` is its result before the final cast.

    Args:
        x: [..., n] float32/float16/bfloat16 (computed in float32).
        scale: float32 scale broadcastable to ``x`` (positive).
    """
    g = integer_grid(fmt)
    t = x.to(torch.float32) / torch.as_tensor(scale, dtype=torch.float32)
    return round_to_grid_(t, parse_format(fmt)).mul_(g.multiplier).to(torch.int8)


def weight_codes(weight: torch.Tensor, fmt: "str | Format") -> tuple[torch.Tensor, torch.Tensor]:
    """Decompose a per-row fake-quantized weight [out, in] into int8 codes [out, in] and float32 row scales [out]:
    :func:`~hqdit_utils.engine.codes.row_grid_values` (the package's one decomposition) in the units of the
    integer grid (values × ``m``, scales / ``m``; both exact, ``m`` a power of two).

    ``codes[j] · scale[j]`` reproduces ``weight[j]`` to within 4 ulps of the weight's dtype.

    Raises:
        LowbitError: no integer grid fits int8, or some row is not a scaled copy of the grid (block scales, a
            weight cast to a lower precision after quantization, an unquantized weight …).
    """
    g = integer_grid(fmt)
    try:
        values, scale = row_grid_values(weight, g.fmt)
    except ValueError as err:
        raise LowbitError(str(err)) from None
    return values.mul_(g.multiplier).to(torch.int8), scale.div_(g.multiplier)


# --------------------------------------------------------------------------------------------------
# Packing two 4-bit codes per byte
# --------------------------------------------------------------------------------------------------
_PAIR_TABLES: dict = {}  # format name -> int16 [256]: a plain dict (a compiled forward reads a table as a constant)


def _pair_table(fmt: str) -> torch.Tensor:
    """int16 [256]: for a byte ``b`` holding two 4-bit patterns (element 2i in the low nibble), the two int8
    codes laid out as the bytes of one little-endian int16 (``table[b].view(int8)`` = [code(lo), code(hi)])."""
    table = _PAIR_TABLES.get(fmt)
    if table is None:
        g = integer_grid(fmt)
        nib = (decode(torch.arange(16, dtype=torch.uint8), fmt) * g.multiplier).to(torch.int64)
        b = torch.arange(256)
        lo, hi = nib[b & 15], nib[b >> 4]
        table = _PAIR_TABLES[fmt] = ((lo & 0xFF) | ((hi & 0xFF) << 8)).to(torch.int32).to(torch.int16)
    return table


def pack_codes(codes: torch.Tensor, fmt: "str | Format") -> torch.Tensor:
    """uint8 [..., n/2]: the 4-bit bit patterns of int8 ``codes`` [..., n] (n even), two per byte, in the layout
    of :func:`hqdit_utils.engine.codes.pack_nibbles` (sign-magnitude FP4 / two's-complement int4)."""

    g = integer_grid(fmt)
    if g.bits > 4:
        raise LowbitError(f"{g.fmt} codes take {g.bits} bits; only 4-bit codes are packed two per byte")
    if codes.shape[-1] % 2:
        raise LowbitError(f"packing needs an even last dimension, got shape {tuple(codes.shape)}")
    return pack_nibbles(encode(codes.to(torch.float32) / g.multiplier, g.fmt)).contiguous()


def unpack_codes(packed: torch.Tensor, fmt: "str | Format | IntegerGrid") -> torch.Tensor:
    """int8 codes [..., 2n] of packed bytes [..., n] (inverse of :func:`pack_codes`): one table look-up per byte."""
    table = _pair_table(fmt.fmt if isinstance(fmt, IntegerGrid) else str(integer_grid(fmt).fmt))
    pairs = table.index_select(0, packed.reshape(-1).to(torch.int32))
    return pairs.view(torch.int8).view(*packed.shape[:-1], 2 * packed.shape[-1])


# --------------------------------------------------------------------------------------------------
# The integer GEMM
# --------------------------------------------------------------------------------------------------
_INT_MM: dict = {}


def int_mm_available() -> bool:
    """Whether ``torch._int_mm`` runs on the CPU in this build (probed once on a tiny odd shape)."""
    if "ok" not in _INT_MM:
        try:
            a = torch.tensor([[1, -2, 3]], dtype=torch.int8)
            ok = int(torch._int_mm(a, a.t().contiguous())[0, 0]) == 14
        except (AttributeError, RuntimeError, NotImplementedError):
            ok = False
        _INT_MM["ok"] = ok
        if not ok:
            warnings.warn("torch._int_mm does not run on this CPU build: quantized linears use the simulated "
                          "(float) path", RuntimeWarning, stacklevel=2)
    return _INT_MM["ok"]


#: CPU flags (as Linux's /proc/cpuinfo names them) of the int8 dot-product instructions behind the fast CPU
#: kernel of ``torch._int_mm``.
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_SLOW_INT_MM = ("this CPU has no int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX), so torch._int_mm "
                "would be slower than the float path, and oneDNN's int8 kernel {why}; set_execution(model, 'int') "
                "runs torch._int_mm anyway")
#: The exact int8 GEMM kernels of the integer path (:func:`choose_kernel` measures which one runs).
KERNELS = ("torch._int_mm", "onednn")
_INT16_MAX = 2 ** 15 - 1


@lru_cache(maxsize=None)
def int_mm_fast() -> bool:
    """Whether this CPU has int8 dot-product instructions (:data:`INT8_DOT_FLAGS` in ``/proc/cpuinfo``; where
    that file does not exist, whether PyTorch's CPU capability is AVX512 or AMX). Without them ``torch._int_mm``
    runs a slow kernel — measured on a 2-core AVX2 machine, one thread: 904 ms for int8 512×1152 @ 1152×1152
    against 20 ms for the same product in float32 — so ``"auto"`` keeps INT8-weight layers (which only
    ``torch._int_mm`` computes exactly) simulated there. Which kernel runs a layer is measured instead
    (:func:`choose_kernel`)."""
    flags = cpu_flags()
    if flags is None:
        return torch.backends.cpu.get_cpu_capability().upper().startswith(("AVX512", "AMX"))
    return any(flag in flags for flag in INT8_DOT_FLAGS)


def onednn_available() -> bool:
    """Whether oneDNN's quantized linear (``torch.ops.onednn.qlinear_prepack`` / ``qlinear_pointwise``) runs in
    this build (probed once on a tiny odd shape against the exact product)."""
    if "onednn" not in _INT_MM:
        try:
            a = torch.tensor([[1, -2, 3]], dtype=torch.int8)
            w = torch.tensor([[2, 5, -1], [-12, 7, 12]], dtype=torch.int8)
            out = _onednn_linear(a, 1.0, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(2),
                                 torch.zeros(2, dtype=torch.int64), None)
            ok = out.tolist() == [[-11.0, 10.0]]
        except (AttributeError, RuntimeError, NotImplementedError):
            ok = False
        _INT_MM["onednn"] = ok
    return _INT_MM["onednn"]


def onednn_exact(w_grid: IntegerGrid, a_grid: IntegerGrid) -> bool:
    """Whether oneDNN's int8 kernel is exact for these grids on every x86 CPU. Without int8 dot-product
    instructions it shifts the activation codes to u8 (+128) and adds *pairs* of u8×s8 products in int16, which
    saturates unless ``2·(qmax_a + 128)·qmax_w ≤ 32767`` — true for every FP4 variant and INT4 (E3M0 × 4:
    2·192·64 = 24576), false for INT8 weights (measured: wrong sums with codes ±127)."""
    return 2 * (a_grid.qmax + 128) * w_grid.qmax <= _INT16_MAX


def kernel_candidates(w_grid: IntegerGrid, a_grid: IntegerGrid) -> tuple[str, ...]:
    """The exact kernels of :data:`KERNELS` that this build runs for these grids: ``torch._int_mm`` where it
    runs (:func:`int_mm_available`), oneDNN where it runs and cannot saturate (:func:`onednn_exact`)."""
    out = ("torch._int_mm",) if int_mm_available() else ()
    if onednn_exact(w_grid, a_grid) and onednn_available():
        out += ("onednn",)
    return out


def int_kernel(w_grid: IntegerGrid, a_grid: IntegerGrid) -> str | None:
    """Whether ``"auto"`` runs a layer with these grids on the integer path: the kernel class it may use
    (``"onednn"`` where oneDNN is exact, so the faster of both is measured per shape by :func:`choose_kernel`;
    ``"torch._int_mm"`` for INT8 weights on a CPU with int8 dot-product instructions, :func:`int_mm_fast`), or
    ``None``: no fast exact kernel (INT8 weights on other CPUs; the layer stays simulated)."""
    cands = kernel_candidates(w_grid, a_grid)
    if "onednn" in cands:
        return "onednn"
    if cands and int_mm_fast():
        return "torch._int_mm"
    return None


def rescale(acc: torch.Tensor, s: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 [M, N] output of every kernel from its exact accumulator: ``acc`` int32 [M, N] (or float32 holding
    ``float(acc)``, which this function may overwrite), ``s`` the activation scale (0-d static or [M, 1] per
    token), ``w_scale`` float32 [N], ``bias`` [N] or None.

    Static: ``float(acc) · (w_scale · s)``, then ``+ bias``; per token: ``(float(acc) · w_scale) · s``, then
    ``+ bias`` — every product and sum rounded to float32 on its own (no fused multiply-add). This is bit for bit
    what oneDNN's AVX2 kernel computes with the scales and bias fused (measured; ``tests/test_lowbit.py`` checks
    it), so runs made there are reproduced by every kernel on every CPU."""
    out = acc.to(torch.float32)
    if s.dim() == 0:
        out.mul_(w_scale * s)
    else:
        out.mul_(w_scale).mul_(s)
    return out if bias is None else out.add_(bias.to(torch.float32))


#: The file (under ``config.CACHE_DIR``) where :func:`choose_kernel` keeps the measured kernel per machine.
KERNEL_CACHE_FILE = "int8_kernels.json"
_CHOSEN: dict = {}
_PROBE_ROWS = 256  # rows of the timed product (the embedded model runs 64+ images × 64 tokens per call)


def _machine_key() -> str:
    """CPU model, a digest of its flags, torch version: what a measured kernel choice holds for."""
    flags = cpu_flags() or {torch.backends.cpu.get_cpu_capability()}
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return f"{cpu_model()} | flags {digest} | torch {torch.__version__}"


def _time_ms(fn, repeats: int) -> float:
    """Best of ``repeats`` wall-clock times of ``fn()`` in ms, after one untimed call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _kernel_fns(a: torch.Tensor, w: torch.Tensor, kernels) -> dict:
    fns = {}
    for k in kernels:
        if k == "onednn":
            packed = torch.ops.onednn.qlinear_prepack(w, None)
            ones, zeros = torch.ones(w.shape[0]), torch.zeros(w.shape[0], dtype=torch.int64)
            fns[k] = lambda packed=packed, ones=ones, zeros=zeros: _onednn_linear(a, 1.0, packed, ones, zeros, None)
        else:
            fns[k] = lambda: int_matmul(a, w)
    return fns


def measure_kernels(k: int, n: int, kernels=KERNELS, rows: int = _PROBE_ROWS) -> dict:
    """Time the int8 GEMM of each of ``kernels`` on int8 [rows, k] @ [n, k]ᵀ (random 4-bit codes) at the
    current thread count. A kernel more than 8× slower than the best on a small probe (≤64 × ≤256 × ≤256) is not
    timed on the full shape (a reference kernel can take seconds there).

    Returns:
        ``{"kernel": fastest, "ms": {kernel: ms on the full shape, or None (not timed)}, "probe_ms": {kernel: ms
        on the small probe}, "rows": rows, "threads": n}``.
    """
    gen = torch.Generator().manual_seed(0)
    def codes(*shape):
        return torch.randint(-7, 8, shape, generator=gen, dtype=torch.int8)
    small = {name: _time_ms(fn, 1) for name, fn in _kernel_fns(codes(min(rows, 64), min(k, 256)),
                                                                  codes(min(n, 256), min(k, 256)), kernels).items()}
    best_small = min(small.values())
    keep = [name for name in kernels if small[name] <= 8 * best_small]
    full = {name: _time_ms(fn, 3) for name, fn in _kernel_fns(codes(rows, k), codes(n, k), keep).items()}
    ms = {name: (round(full[name], 4) if name in full else None) for name in kernels}
    return {"kernel": min(full, key=full.get), "ms": ms, "probe_ms": {n: round(v, 4) for n, v in small.items()},
            "rows": rows, "threads": torch.get_num_threads()}


def choose_kernel(k: int, n: int, kernels=KERNELS) -> dict:
    """The measured fastest of ``kernels`` (exact, bit-identical: :func:`rescale`) for a [*, k] → [*, n] layer
    at the current thread count, as :func:`measure_kernels` returns it plus ``"key"``: measured once per machine
    (:func:`_machine_key`), thread count and shape, then read from ``config.CACHE_DIR / KERNEL_CACHE_FILE``
    (written atomically; an unreadable file is measured again). One candidate: no measurement."""
    kernels = tuple(kernels)
    if len(kernels) == 1:
        return {"kernel": kernels[0], "ms": {}, "rows": 0, "threads": torch.get_num_threads(), "key": ""}
    key = f"{_machine_key()} | threads {torch.get_num_threads()} | {k}x{n} | {','.join(sorted(kernels))}"
    if key in _CHOSEN:
        return _CHOSEN[key]
    path = Path(config.CACHE_DIR) / KERNEL_CACHE_FILE
    try:
        table = json.loads(path.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    entry = table.get(key)
    if not (isinstance(entry, dict) and entry.get("kernel") in kernels):
        entry = measure_kernels(k, n, kernels)
        table[key] = entry
        try:
            write_json_atomic(path, table)
        except OSError:  # a read-only cache dir: keep the choice for this process only
            pass
    _CHOSEN[key] = {**entry, "key": key}
    return _CHOSEN[key]


def _onednn_linear(a: torch.Tensor, a_scale: float, packed: torch.Tensor, w_scale: torch.Tensor,
                   zeros: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(a @ wᵀ) · a_scale · w_scale + bias`` in float32 [M, N] by oneDNN: ``a`` int8 [M, K], ``packed`` the
    weight codes int8 [N, K] as ``qlinear_prepack`` returned them, ``w_scale`` float32 [N], ``zeros`` int64 [N]."""
    return torch.ops.onednn.qlinear_pointwise(a, a_scale, 0, packed, w_scale, zeros, bias, 1.0, 0, torch.float32,
                                              "none", [], "")


def int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ wᵀ`` exactly: ``a`` int8 [M, K] activations codes, ``w`` int8 [N, K] weight codes → int32 [M, N].

    On the CPU ``torch._int_mm`` takes any M, K, N ≥ 1 (no padding needed); ``w`` row-major [N, K] passed as
    its transpose is its fastest layout. M = 0 gives an empty result."""
    if a.shape[0] == 0:
        return torch.zeros(0, w.shape[0], dtype=torch.int32)
    return torch._int_mm(a, w.t())


# --------------------------------------------------------------------------------------------------
# A QuantLinear on the integer path
# --------------------------------------------------------------------------------------------------
class IntLinearState:
    """The integer form of one ``QuantLinear`` (held as ``layer.lowbit``, the layer's
    :class:`~hqdit_utils.engine.qlinear.IntegerPath`; not a buffer: recomputed from the weight, see
    :func:`plan_layer`).

    Attributes:
        w_grid / a_grid: :class:`IntegerGrid` of the weight and activation formats.
        codes: int8 [out, in] weight codes, or ``None`` when only ``packed`` is kept.
        packed: uint8 [out, in/2] (4-bit formats) when the weights are held packed, else ``None``.
        row_scale: float32 [out] scale of one integer weight code (``codes · row_scale`` ≈ the float weight,
            ``m_w`` included); w_scale: ``row_scale / m_a`` (the rescale then needs only the activation scale).
        weight_dtype: dtype of the float weight the codes came from (outputs of a decoded weight use it).
        enabled: run the integer path (``False``: the layer keeps the simulated path although it could run).
        sim_reason: why it keeps it (``"forced"``, or a CPU without fast int8 products; see :func:`set_execution`).
        kernel: the int8 GEMM (:data:`KERNELS`); ``"onednn"`` keeps its prepacked weight (built on first use,
            rebuilt per call while the codes are held packed; not copied or pickled with the state).
        kernel_choice: :func:`choose_kernel`'s record for this layer's shape (timings, thread count), or ``{}``
            when the kernel was forced or had no rival.
        source: (data_ptr, dtype, version) of the float weight at planning time; a change re-plans the layer.
    """

    def __init__(self, w_grid: IntegerGrid, a_grid: IntegerGrid, codes: torch.Tensor, scale: torch.Tensor,
                 weight_dtype: torch.dtype, source: tuple | None) -> None:
        self.w_grid, self.a_grid = w_grid, a_grid
        self.codes: torch.Tensor | None = codes.contiguous()
        self.packed: torch.Tensor | None = None
        self.row_scale = scale.to(torch.float32).contiguous()  # [out] scale of the codes (c · row_scale ≈ W)
        self.w_scale = (self.row_scale / a_grid.multiplier).contiguous()  # folds the activation multiplier
        self.weight_dtype = weight_dtype
        self.enabled = True
        self.sim_reason = "forced"  # why the simulated path runs while enabled is False
        self.kernel = "torch._int_mm"
        self.source = source
        self.kernel_choice: dict = {}  # how the kernel was chosen (choose_kernel's record; {} when forced)
        self._onednn: tuple | None = None  # (prepacked weight, ones [out], int64 zeros [out]) of the oneDNN kernel

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_onednn": None}  # oneDNN's prepacked tensor neither copies nor pickles

    def current(self, layer: QuantLinear) -> bool:
        """Whether these codes still describe ``layer``'s float weight. A weight changed since planning (loaded,
        cast, edited in place) is planned again; if it cannot run exactly any more, the layer returns to the
        simulated path (``layer.lowbit = None``; :func:`execution_paths` tells why) and this returns False."""
        if self.source is None or self.source == _source(layer):
            return True
        new = plan_layer(layer)
        if isinstance(new, str):
            layer.lowbit = None
            return False
        new.hold("int8" if self.codes is not None else "packed")
        new.enabled, new.kernel, new.kernel_choice = self.enabled, self.kernel, self.kernel_choice
        self.__dict__.update(new.__dict__)
        return True

    # weights ------------------------------------------------------------------------------------
    def hold(self, weights: str) -> None:
        """Keep the weight codes as ``"int8"`` [out, in] (fastest) or ``"packed"`` (two per byte, unpacked per
        call; formats wider than 4 bits, or an odd ``in``, keep int8)."""
        if weights not in ("int8", "packed"):
            raise ValueError(f"weights must be 'int8' or 'packed', got {weights!r}")
        self._onednn = None
        if weights == "packed" and self.w_grid.bits <= 4 and self.int8_codes().shape[1] % 2 == 0:
            if self.packed is None:
                self.packed = pack_codes(self.codes, self.w_grid.fmt)
                _pair_table(self.w_grid.fmt)  # the unpacking table, made here rather than in a compiled forward
            self.codes = None
        elif self.codes is None:
            self.codes, self.packed = unpack_codes(self.packed, self.w_grid), None

    def int8_codes(self) -> torch.Tensor:
        """int8 [out, in] weight codes (unpacked from ``packed`` when only those are kept)."""
        return self.codes if self.codes is not None else unpack_codes(self.packed, self.w_grid)

    def float_weight(self) -> torch.Tensor:
        """The weight [out, in] as the simulated path uses it (``weight_dtype``): codes · row scale."""
        return (self.int8_codes().to(torch.float32) * self.row_scale[:, None]).to(self.weight_dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the weight as held (codes or packed, plus the float32 row scales)."""
        t = self.codes if self.codes is not None else self.packed
        return t.numel() * t.element_size() + 2 * self.row_scale.numel() * 4

    def follow_(self, fn) -> None:
        """Follow the layer's ``_apply(fn)`` (``.to(device / dtype)``, ``.half()`` …): codes and scales move to
        ``fn``'s device, ``weight_dtype`` becomes ``fn``'s dtype for it; off the CPU the integer path is disabled."""
        device = fn(torch.zeros(1)).device
        for k in ("codes", "packed", "row_scale", "w_scale"):
            if getattr(self, k) is not None:
                setattr(self, k, getattr(self, k).to(device))
        self.weight_dtype = fn(torch.zeros(1, dtype=self.weight_dtype)).dtype
        if device.type != "cpu":
            self.enabled = False

    # activations --------------------------------------------------------------------------------
    def act_codes(self, layer: QuantLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``x`` [M, in] → (int8 codes [M, in], float32 activation scale: 0-d (static) or [M, 1] (per token),
        bool [M] rows whose rounded activation is NaN or ``None`` when there are none), with the operations of
        ``layer.quantize_input``: SmoothQuant factor, online rotation, rounding. A NaN has no int8 code: its row
        of the output is set to NaN, as the simulated path's product gives (±Inf saturates in both)."""
        xr = layer.transform_input(x)
        aq = layer.act_quantizer()
        fmt = aq.fmt
        if aq.mode == "static":
            s = aq.scale.to(torch.float32)
        else:  # per token: as quantizer.token_fake_quantize
            amax = xr.detach().abs().amax(dim=-1, keepdim=True).to(torch.float32)
            s = torch.where(amax > 0, amax * (aq.gamma / fmt.max_value), torch.ones_like(amax))
        owned = xr is not x and xr.dtype == torch.float32  # a temporary of the transform: divide in place
        t = xr.div_(s) if owned else xr.to(torch.float32) / s
        r = round_to_grid_(t, fmt)
        # the rounded values are bounded by qmax (saturating grids): their sum is NaN only if one of them is
        if torch.compiler.is_compiling():  # no data-dependent branch in a compiled graph: always the mask
            nan_rows = r.sum(dim=-1).isnan()
        else:
            nan_rows = r.isnan().any(dim=-1) if bool(torch.isnan(r.sum())) else None
        return r.mul_(self.a_grid.multiplier).to(torch.int8), s, nan_rows

    def forward(self, layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` on the integer path: ``x`` [..., in] (float32/16, bfloat16) → [..., out] in ``x``'s dtype
        (the autocast dtype under CPU autocast, as ``F.linear`` there)."""
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        shared = layer.shared
        if shared is None:
            a, s, nan_rows = self.act_codes(layer, x2)
        else:
            # keyed on the caller's tensor x (x2 is a new view object on every call, so it never matched)
            a, s, nan_rows = shared.get(layer, x, kind="int",
                                        compute=lambda t: self.act_codes(layer, t.reshape(-1, k)))
        out = self.matmul(a, s, layer.bias)
        if nan_rows is not None:
            out = out.masked_fill(nan_rows[:, None], float("nan"))  # the rows whose activation was NaN
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        return out.to(dtype).view(*lead, out.shape[-1])

    def matmul(self, a: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """float32 [M, out] = ``(a · s / m_a) (c_w · row_scale)ᵀ + bias`` by this layer's kernel: ``a`` int8 [M, in]
        activation codes, ``s`` their float32 scale (0-d static or [M, 1] per token), ``bias`` [out] or None.
        Every kernel gives the exact accumulator and :func:`rescale` the output: the kernels agree bit for bit."""
        if self.kernel == "onednn":
            return rescale(self._onednn_acc(a), s, self.w_scale, bias)
        return rescale(int_matmul(a, self.int8_codes()), s, self.w_scale, bias)

    def _onednn_acc(self, a: torch.Tensor) -> torch.Tensor:
        """float32 [M, out] = ``float(a @ c_wᵀ)`` by oneDNN (unit scales, no bias: its int32 sum converted once)."""
        n = self.w_scale.shape[0]
        if a.shape[0] == 0:
            return torch.zeros(0, n, dtype=torch.float32)
        packed = self._onednn
        if packed is None:
            packed = (torch.ops.onednn.qlinear_prepack(self.int8_codes(), None), torch.ones(n),
                      torch.zeros(n, dtype=torch.int64))
            if self.codes is not None:  # int8 codes held: keep the prepacked copy (packed: rebuilt per call)
                self._onednn = packed
        return _onednn_linear(a, 1.0, packed[0], packed[1], packed[2], None)


def _source(layer: QuantLinear) -> tuple | None:
    w = layer.weight
    return None if w is None else (w.data_ptr(), w.dtype, w._version)


def plan_layer(layer: QuantLinear) -> "IntLinearState | str":
    """An :class:`IntLinearState` for a ``QuantLinear`` that the integer path computes exactly, or a one-line
    reason why it cannot (the layer then stays on the simulated path)."""
    if layer.act_mode == "none":
        return "activations are not quantized"
    if layer.act_mode == "block" or layer.block_size:
        return "block scales (MX/NVFP4) vary along the reduction"
    if layer.weight is None:
        return "no float weight and no codes"
    if layer.weight.device.type != "cpu":
        return f"integer path runs on the CPU, the weight is on {layer.weight.device}"
    if not torch.is_floating_point(layer.weight):
        return f"weight dtype {layer.weight.dtype}"
    try:
        wg = integer_grid(layer.weight_format)
        ag = integer_grid(layer.act_format)
    except LowbitError as err:
        return str(err)
    if wg.qmax * ag.qmax * layer.in_features > _INT32_MAX:
        return f"int32 accumulation could overflow ({wg.qmax}·{ag.qmax}·{layer.in_features} ≥ 2³¹)"
    if not int_mm_available():
        return "torch._int_mm is not available on this CPU build"
    try:
        codes, scale = weight_codes(layer.weight, wg)
    except LowbitError as err:
        return str(err)
    return IntLinearState(wg, ag, codes, scale, layer.weight.dtype, _source(layer))


def _quant_linears(model: nn.Module) -> dict:

    if isinstance(model, QuantLinear):
        return {model.name or "": model}
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def set_execution(model: nn.Module, mode: str = "auto", *, weights: str | None = None,
                  kernel: str | None = None) -> dict[str, str]:
    """Choose the execution path of every ``QuantLinear`` in ``model`` (or of one ``QuantLinear``).

    Args:
        mode: ``"auto"`` (integer path wherever it is exact and a fast exact kernel exists, :func:`int_kernel`,
            else simulated; a layer that holds codes only runs the integer path regardless), ``"int"`` (integer
            path for every layer; raises if one cannot), ``"sim"`` (simulated path everywhere; the codes are kept).
        weights: ``"int8"`` (codes [out, in], fastest) or ``"packed"`` (4-bit codes two per byte, unpacked per call);
            ``None``: keep codes as they are held (newly planned layers hold int8).
        kernel: force one of :data:`KERNELS` for every integer-path layer (tests, benchmarks); ``None``: the
            fastest exact kernel measured on the layer's shape (:func:`choose_kernel`; all give the same bits).

    Returns:
        ``{layer name: "int" | "sim: <reason>"}`` (reason ``"forced"`` for ``mode="sim"``).
    Raises:
        ValueError: an unknown mode or kernel; LowbitError: ``mode="int"`` and some layer cannot run exactly
            (lists them), or ``kernel="onednn"`` where it is not exact or not available.
    """
    if mode not in MODES:
        raise ValueError(f"execution mode must be one of {MODES}, got {mode!r}")
    if kernel not in (None, *KERNELS):
        raise ValueError(f"kernel must be one of {KERNELS} or None, got {kernel!r}")
    layers = _quant_linears(model)
    plans = {}
    for name, layer in layers.items():
        st = layer.lowbit
        if st is None or (layer.weight is not None and st.source != _source(layer)):
            st = plan_layer(layer)
        plans[name] = st
    if mode == "int":
        bad = {n: p for n, p in plans.items() if isinstance(p, str)}
        if bad:
            first = "; ".join(f"{n}: {r}" for n, r in list(bad.items())[:3])
            raise LowbitError(f"{len(bad)} layer(s) cannot run on the integer path, e.g. {first}")
    paths = {}
    for name, layer in layers.items():
        st = plans[name]
        if isinstance(st, str):
            if layer.weight is None:
                raise LowbitError(f"{name}: holds codes only but {st}")
            layer.lowbit = None
            paths[name] = f"sim: {st}"
            continue
        if weights is not None:
            st.hold(weights)
        fast = int_kernel(st.w_grid, st.a_grid)
        if kernel == "onednn" and not (onednn_exact(st.w_grid, st.a_grid) and onednn_available()):
            raise LowbitError(f"{name}: oneDNN's int8 kernel is not "
                              f"{'available' if not onednn_available() else 'exact'} for {st.w_grid.fmt} weights "
                              f"× {st.a_grid.fmt} activations; use kernel='torch._int_mm'")
        keep_sim = mode == "auto" and fast is None and layer.weight is not None  # codes-only: no other path
        st.enabled = mode != "sim" and not keep_sim
        new_kernel = kernel or st.kernel
        if kernel is not None:
            st.kernel_choice = {}
        elif st.enabled:  # measured (once per machine, threads and shape); every candidate gives the same bits
            st.kernel_choice = choose_kernel(layer.in_features, layer.out_features,
                                             kernel_candidates(st.w_grid, st.a_grid) or ("torch._int_mm",))
            new_kernel = st.kernel_choice["kernel"]
        if new_kernel != st.kernel:
            st.kernel, st._onednn = new_kernel, None
        st.sim_reason = "forced"
        if keep_sim:
            st.sim_reason = _SLOW_INT_MM.format(why="is not available in this build" if not onednn_available()
                                                else "could saturate on these codes (2·(qmax_a+128)·qmax_w > 32767)")
        layer.lowbit = st
        paths[name] = "int" if st.enabled else f"sim: {st.sim_reason}"
    return paths


def execution_paths(model: nn.Module) -> dict[str, str]:
    """``{layer name: "int" | "sim: <reason>"}`` as the layers would run now (nothing is changed)."""
    out = {}
    for name, layer in _quant_linears(model).items():
        st = layer.lowbit
        if st is not None and st.enabled:
            out[name] = "int"
        elif st is not None:
            out[name] = f"sim: {st.sim_reason}"
        else:
            p = plan_layer(layer)
            out[name] = "sim: integer path not enabled (set_execution)" if not isinstance(p, str) else f"sim: {p}"
    return out


@contextmanager
def execution(model: nn.Module, mode: str, *, weights: str | None = None, kernel: str | None = None):
    """``with execution(model, "sim"): …`` runs with ``mode`` (see :func:`set_execution`), then restores each
    layer's previous path."""
    layers = _quant_linears(model)
    before = {n: (layer.lowbit, None if layer.lowbit is None else
                  (layer.lowbit.enabled, layer.lowbit.sim_reason, layer.lowbit.kernel, layer.lowbit.kernel_choice))
              for n, layer in layers.items()}
    try:
        yield set_execution(model, mode, weights=weights, kernel=kernel)
    finally:
        for n, layer in layers.items():
            st, state = before[n]
            if st is not None:
                if st.kernel != state[2]:
                    st._onednn = None
                st.enabled, st.sim_reason, st.kernel, st.kernel_choice = state
            layer.lowbit = st


@torch.no_grad()
def drop_float_weights_(model: nn.Module, *, weights: str = "packed") -> int:
    """Free the float weight of every layer on the integer path and keep only its codes (``weights``:
    ``"packed"`` 4-bit codes two per byte, or ``"int8"``). The simulated path, if forced later, decodes the
    weight from the codes (``codes · row scale``, within 4 ulps of the dropped weight). ``save_quantized`` then
    needs ``packed=True``. Returns the bytes freed."""
    freed = 0
    for layer in _quant_linears(model).values():
        st = layer.lowbit
        if st is None or layer.weight is None:
            continue
        st.hold(weights)
        st.source = None
        freed += layer.weight.numel() * layer.weight.element_size()
        layer.weight = None
    return freed


# --------------------------------------------------------------------------------------------------
# Files: the codes as codes.PackedWeight (two 4-bit codes per byte, float32 row scales)
# --------------------------------------------------------------------------------------------------
#: The file :func:`~hqdit_utils.engine.qmodel.save_quantized` (``packed=True``) writes next to ``quant_state.safetensors``.
PACKED_FILE = "packed_weights.safetensors"


def packed_weight(layer: QuantLinear) -> PackedWeight:
    """``layer``'s weight as a :class:`~hqdit_utils.engine.codes.PackedWeight` (4-bit codes two per byte, 8-bit
    one per byte, one float32 scale per output row [out, 1] in the units of the format's grid), by the one route
    :func:`~hqdit_utils.engine.codes.pack_rows`: from the integer path's codes when the layer has them, else from
    the decomposition of its float weight (:func:`~hqdit_utils.engine.codes.row_grid_values`; layers on the
    simulated path, FP8 weights). Both give the same codes and scales.

    Raises:
        ValueError: a weight that is not per-row grid values × scales, or an odd ``in_features`` for 4 bits.
    """
    st = layer.lowbit
    if st is not None and st.current(layer):
        g = st.w_grid
        return pack_rows(st.int8_codes().to(torch.float32) / g.multiplier, st.row_scale * g.multiplier, g.fmt)
    values, scale = row_grid_values(layer.weight, layer.weight_format)
    return pack_rows(values, scale, layer.weight_format)


def packed_weights(model: nn.Module) -> dict:
    """Every integer-path layer's weight as a :class:`~hqdit_utils.engine.codes.PackedWeight`
    (:func:`packed_weight`, for ``export.save_packed``): float32 row scales, so :func:`install_packed` rebuilds
    the layer's integer path bit for bit. Layers on the simulated path, and 4-bit layers with an odd
    ``in_features``, are left out."""

    return {name: packed_weight(layer) for name, layer in _quant_linears(model).items()
            if layer.lowbit is not None and not (layer.lowbit.w_grid.bits <= 4 and layer.in_features % 2)}


def placeholder_weight(out_features: int, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero-byte stand-in [out, in] (an expanded scalar) to construct a ``QuantLinear`` whose weight comes from
    codes (:func:`install_packed` removes it)."""
    return torch.zeros((), dtype=dtype).expand(out_features, in_features)


def install_packed(layer: QuantLinear, p: PackedWeight, weight_dtype: torch.dtype = torch.float32) -> None:
    """Make ``layer`` (a ``QuantLinear``) hold only the codes of the :class:`~hqdit_utils.engine.codes.PackedWeight`
    ``p`` (written by :func:`packed_weights`): its integer path is then bit-identical to the saved layer's; the
    simulated path decodes ``codes · scale`` in ``weight_dtype``.

    Raises:
        LowbitError: ``p`` does not fit the layer (shape, or a format without an integer grid).
    """

    if tuple(p.shape) != (layer.out_features, layer.in_features):
        raise LowbitError(f"{layer.name}: packed weight of shape {tuple(p.shape)}, the layer is "
                          f"[{layer.out_features}, {layer.in_features}]")
    wg = integer_grid(p.fmt)
    ag = integer_grid(layer.act_format)
    if wg.bits <= 4:
        codes = unpack_codes(p.codes, wg)
    else:
        codes = (decode(p.codes, wg.fmt) * wg.multiplier).to(torch.int8)
    st = IntLinearState(wg, ag, codes, p.scale.to(torch.float32).reshape(-1) / wg.multiplier, weight_dtype, None)
    st.hold("packed")
    layer.lowbit = st
    layer.weight = None
