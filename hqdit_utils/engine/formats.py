"""Number formats: low-precision floating point (ExMy), integers, and "no quantization".

Grammar of format names (``parse_format``)::

    fp{bits}_e{E}m{M}   signed float, 1 sign + E exponent + M mantissa bits (bits = 1 + E + M),
                        1 <= E <= 8, M >= 0, bits <= 16. Bias 2^(E-1) - 1, subnormals on,
                        NO encodings reserved (every code is a finite number), saturating.
                        fp4_e2m1 = ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}.
    fp8_e4m3fn          OCP FP8 E4M3: only S.1111.111 is NaN, no infinities, max 448.
    fp8_e5m2            OCP/IEEE-like FP8 E5M2: exponent 11111 holds inf and NaN, max 57344.
    int{bits}           symmetric signed integer, levels -(2^(bits-1) - 1) ... 2^(bits-1) - 1.
    uint{bits}          unsigned integer, levels 0 ... 2^bits - 1 (used with a zero point).
    fp32 | none         no quantization (the identity).

Exponent bias and scale are one knob
------------------------------------
HQ-DiT (like the FP post-training-quantization line of work it builds on) chooses a *clipping value*
α per tensor, which for an ExMy format amounts to choosing a real-valued exponent bias β::

    v_max(β) = 2^(2^E - 1 - β) · (2 - 2^-M)          largest magnitude of the grid
    β(α)     = 2^E - 1 - log2(α) + log2(2 - 2^-M)      the bias that makes v_max = α

Changing the bias by Δ multiplies every grid value by 2^-Δ. So a format with a real-valued bias β is
*the same grid* as the format with the default integer bias β₀ multiplied by the scale
``s = 2^(β₀ - β) = α / v_max(β₀)``. This package keeps the integer bias in :class:`FloatFormat` and
expresses every clipping choice as that scale: ``x_q = round_to_grid(x / s) * s`` (see
``quantizer.py``). :func:`bias_for_clip` and :func:`scale_for_bias` convert between the two views.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Union

import torch

GRAMMAR = (
    "fp{bits}_e{E}m{M} with bits = 1 + E + M, 1 <= E <= 8, M >= 0, bits <= 16 (e.g. fp4_e2m1, fp4_e1m2, "
    "fp4_e3m0, fp6_e2m3, fp8_e4m3); fp8_e4m3fn; fp8_e5m2; int{bits} / uint{bits} with 2 <= bits <= 16; fp32 | none"
)

_SPECIALS = ("none", "fn", "ieee")


@dataclass(frozen=True)
class FloatFormat:
    """A signed floating-point format with ``exp_bits`` exponent and ``man_bits`` mantissa bits.

    Attributes:
        exp_bits: E, width of the exponent field (1..8).
        man_bits: M, width of the mantissa field (>= 0).
        bias: exponent bias β; ``None`` means the default ``2^(E-1) - 1``.
        subnormals: whether exponent code 0 encodes subnormals ``2^(1-β) · f/2^M`` (else only ±0).
        special: which encodings are not finite numbers —
            ``"none"``: all codes are finite (the default of this package and of FP-PTQ code);
            ``"fn"``: only the all-ones code (S.1…1.1…1) is NaN, no infinities (OCP ``e4m3fn``);
            ``"ieee"``: the all-ones exponent is reserved for ±inf and NaN (``e5m2``).
        saturate: overflow clamps to ±max_value (True) or becomes ±inf / NaN (False).
    """

    exp_bits: int
    man_bits: int
    bias: int | None = None
    subnormals: bool = True
    special: str = "none"
    saturate: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.exp_bits <= 8:
            raise ValueError(f"exp_bits must be in 1..8 (float32 simulates at most 8), got {self.exp_bits}")
        if self.man_bits < 0 or self.bits > 16:
            raise ValueError(f"need man_bits >= 0 and 1 + E + M <= 16, got E={self.exp_bits}, M={self.man_bits}")
        if self.special not in _SPECIALS:
            raise ValueError(f"special must be one of {_SPECIALS}, got {self.special!r}")
        if self.special == "fn" and self.man_bits == 0:
            raise ValueError("special='fn' needs at least one mantissa bit")
        if self.special == "ieee" and self.exp_bits < 2:
            raise ValueError("special='ieee' needs at least two exponent bits")
        # a plain Python float, computed once: reading it in a forward pass makes no tensor (torch.compile traces it
        # as a constant instead of breaking the graph at float(tensor))
        object.__setattr__(self, "_max_value", float(_float_grid(self)[-1]))

    # -- derived quantities -------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def exponent_bias(self) -> int:
        return self.bias if self.bias is not None else 2 ** (self.exp_bits - 1) - 1

    @property
    def min_exponent(self) -> int:
        """Unbiased exponent of the smallest normal number, ``1 - β``."""
        return 1 - self.exponent_bias

    @property
    def max_value(self) -> float:
        """Largest finite magnitude (the last value of :meth:`grid`)."""
        return self._max_value

    @property
    def min_normal(self) -> float:
        return 2.0 ** self.min_exponent

    @property
    def min_subnormal(self) -> float:
        """Smallest positive magnitude (the smallest normal when subnormals are off or M = 0)."""
        if self.subnormals and self.man_bits > 0:
            return 2.0 ** (self.min_exponent - self.man_bits)
        return self.min_normal

    def __str__(self) -> str:
        base = f"fp{self.bits}_e{self.exp_bits}m{self.man_bits}"
        em = (self.exp_bits, self.man_bits)
        if self.bias is None and self.subnormals and self.saturate:
            if self.special == "none" and em != (5, 2):  # "fp8_e5m2" names the IEEE-like variant
                return base
            if self.special == "fn" and em == (4, 3):
                return base + "fn"
            if self.special == "ieee" and em == (5, 2):
                return base
        return (f"FloatFormat(E={self.exp_bits}, M={self.man_bits}, bias={self.exponent_bias}, "
                f"subnormals={self.subnormals}, special={self.special!r}, saturate={self.saturate})")

    def grid(self) -> torch.Tensor:
        """Every representable finite value, both signs, sorted ascending (float32; ±0 appear once)."""
        return _float_grid(self)


def _finite_codes(fmt: FloatFormat):
    """Yield the magnitude of every finite non-negative code of ``fmt`` (float64)."""
    beta = fmt.exponent_bias
    n_exp, n_man = 2 ** fmt.exp_bits, 2 ** fmt.man_bits
    for e in range(n_exp):
        if fmt.special == "ieee" and e == n_exp - 1:
            continue
        for f in range(n_man):
            if fmt.special == "fn" and e == n_exp - 1 and f == n_man - 1:
                continue
            if e == 0:
                yield (2.0 ** (1 - beta)) * (f / n_man) if fmt.subnormals else 0.0
            else:
                yield (2.0 ** (e - beta)) * (1 + f / n_man)


@lru_cache(maxsize=None)
def _float_grid(fmt: FloatFormat) -> torch.Tensor:
    mags = sorted(set(_finite_codes(fmt)))
    values = sorted(set([-m for m in mags] + mags))
    values = [v + 0.0 for v in values]  # -0.0 + 0.0 == +0.0: zero appears once, positive
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


@dataclass(frozen=True)
class IntFormat:
    """An integer grid. ``signed=True``: symmetric levels ``-(2^(b-1)-1) … 2^(b-1)-1``;
    ``signed=False``: ``0 … 2^b - 1`` (asymmetric quantization adds a zero point)."""

    int_bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.int_bits <= 16:
            raise ValueError(f"integer formats need 2..16 bits, got {self.int_bits}")

    @property
    def bits(self) -> int:
        return self.int_bits

    @property
    def max_value(self) -> float:
        return float(2 ** (self.int_bits - 1) - 1 if self.signed else 2 ** self.int_bits - 1)

    @property
    def min_value(self) -> float:
        return -self.max_value if self.signed else 0.0

    def __str__(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.int_bits}"

    def grid(self) -> torch.Tensor:
        return torch.arange(self.min_value, self.max_value + 1, dtype=torch.float32)


@dataclass(frozen=True)
class NoFormat:
    """No quantization: :func:`~hqdit_utils.engine.quantizer.fake_quantize` returns its input unchanged."""

    @property
    def bits(self) -> int:
        return 32

    def __str__(self) -> str:
        return "fp32"


Format = Union[FloatFormat, IntFormat, NoFormat]

_FP_RE = re.compile(r"^fp(\d+)_e(\d+)m(\d+)(fn)?$")
_INT_RE = re.compile(r"^(u?)int(\d+)$")


def _nearest_names(name: str) -> list[str]:
    candidates = ["fp32", "none", "fp8_e4m3fn", "fp8_e5m2"]
    for bits in range(2, 17):
        candidates += [f"int{bits}", f"uint{bits}"]
        candidates += [f"fp{bits}_e{e}m{bits - 1 - e}" for e in range(1, min(8, bits - 1) + 1)]
    m = re.match(r"^fp(\d+)_e(\d+)m(\d+)", name)
    suggestions: list[str] = []
    if m:  # same exponent/mantissa with the right total, and same total with the other splits
        e, mm, bits = int(m.group(2)), int(m.group(3)), int(m.group(1))
        if 1 <= e <= 8 and 1 + e + mm <= 16:
            suggestions.append(f"fp{1 + e + mm}_e{e}m{mm}")
        suggestions += [f"fp{bits}_e{k}m{bits - 1 - k}" for k in range(1, min(8, bits - 1) + 1)]
    suggestions += difflib.get_close_matches(name, candidates, n=4, cutoff=0.5)
    return list(dict.fromkeys(s for s in suggestions if s in candidates))[:5]


def _bad(name: object, why: str) -> ValueError:
    near = _nearest_names(name) if isinstance(name, str) else []
    hint = f" Nearest valid names: {', '.join(near)}." if near else ""
    return ValueError(f"unknown number format {name!r}: {why}. Grammar: {GRAMMAR}.{hint}")


def parse_format(name: "str | Format") -> Format:
    """Parse a format name (see the module docstring for the grammar); formats pass through.

    Raises:
        ValueError: for anything that is not a valid name; the message states the grammar and the
            nearest valid names.
    """
    if isinstance(name, (FloatFormat, IntFormat, NoFormat)):
        return name
    if not isinstance(name, str):
        raise _bad(name, f"expected a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key in ("fp32", "none"):
        return NoFormat()
    m = _FP_RE.match(key)
    if m:
        bits, e, mm, fn = int(m.group(1)), int(m.group(2)), int(m.group(3)), bool(m.group(4))
        if e < 1:
            raise _bad(name, "a float format needs at least one exponent bit (E >= 1)")
        if bits != 1 + e + mm:
            raise _bad(name, f"bits must equal 1 + E + M = {1 + e + mm}, not {bits}")
        if bits > 16 or e > 8:
            raise _bad(name, "at most 16 bits and E <= 8 (formats are simulated in float32)")
        if fn:
            if (e, mm) != (4, 3):
                raise _bad(name, "the 'fn' suffix is defined only for fp8_e4m3fn")
            return FloatFormat(4, 3, special="fn")
        if (e, mm) == (5, 2):
            return FloatFormat(5, 2, special="ieee")
        return FloatFormat(e, mm)
    m = _INT_RE.match(key)
    if m:
        bits = int(m.group(2))
        if not 2 <= bits <= 16:
            raise _bad(name, "integer formats need 2..16 bits")
        return IntFormat(bits, signed=not m.group(1))
    raise _bad(name, "it does not match the grammar")


def bias_for_clip(fmt: FloatFormat, alpha: float) -> float:
    """The real-valued exponent bias β that makes the largest magnitude of ``fmt``'s grid equal ``alpha``.

    Assumes no reserved encodings (``special="none"``): ``β = 2^E - 1 - log2(α) + log2(2 - 2^-M)``.
    """
    if fmt.special != "none":
        raise ValueError("bias_for_clip assumes a format with no reserved encodings")
    if not alpha > 0:
        raise ValueError(f"clip value must be positive, got {alpha}")
    return 2 ** fmt.exp_bits - 1 - math.log2(alpha) + math.log2(2 - 2.0 ** -fmt.man_bits)


def scale_for_bias(fmt: FloatFormat, bias: float) -> float:
    """The scale ``s`` such that ``fmt`` (integer default bias) times ``s`` equals the grid with ``bias``."""
    return 2.0 ** (fmt.exponent_bias - bias)
