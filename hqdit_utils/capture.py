"""Calibration: record the inputs of a DiT's quantizable linear layers along real sampling trajectories.

What is recorded
----------------
For every selected ``nn.Linear`` (layer selection: :func:`select_linears`) and every recorded timestep,
a :class:`TensorStats` of the layer's input rows ``x`` [rows, in_features] (rows = batch × tokens; the two
halves of a CFG batch are pooled, digest §9.7):

* ``count``, ``absmax``, per-channel max-abs ``channel_absmax`` [in_features], per-channel mean square;
* the first four moments (float64 sums) → mean, std, kurtosis;
* an exact log-scale histogram of ``|x|``: bin ``k`` holds the float32 values whose bits 20…30
  (8 exponent bits + the top 3 mantissa bits) equal ``k`` — 2048 bins covering all of float32, eight
  per octave, no rounding anywhere. Percentiles are read off it (linear inside a bin, so a percentile
  is exact to within one bin, ≤ 1/8 octave ≈ 9 %);
* the K = 8 rows with the largest max-abs ("extreme rows"; ties broken by the hash below);
* a bounded **reservoir** of raw input rows: the ``rows_per_timestep`` rows with the smallest value of a
  seeded integer hash of the row's content (64 columns, truncated to bfloat16 precision so that 1-ulp
  differences between runs rarely matter) — "bottom-k sampling". The hash depends only on the row's
  content, so the reservoir does not depend on batch size or order of arrival, and it is reproducible
  from the seed. The rows feed the clipping search, format selection and GPTQ.

Every statistic except the float64 moment sums is computed with integer or max operations, so it is
*identical* whatever the batch size; the moment sums agree to float64 rounding (~1e-15 relative).

Memory bound
------------
Per recorded input (layers that consume the *same* tensor — ``to_q``, ``to_k``, ``to_v`` — share one
record) and per timestep: ``(R + K) · in_features · 4`` bytes of rows (R = ``rows_per_timestep``
reservoir rows, K = 8 extreme rows: the rows with the largest max-abs, which fix a static α = max
exactly), ``in_features · 12`` bytes of per-channel statistics and 16 KiB of histogram. Total:
``n_timesteps · Σ_inputs (4·(R+K)·d_in + 12·d_in + 16384 + 12·(R+K))`` bytes, independent of the number
of trajectories.
:meth:`Calibration.nbytes` reports the actual number. Example: DiT-XL/2, all 28 blocks, 4 distinct inputs
per block (Σ d_in = 3·1152 + 4608 per block), 10 timesteps, R = 64: ≈ 0.3 GB.

Which timesteps (digest §9.10, our default): ``num_timesteps`` timesteps spread uniformly over the
sampling schedule of ``num_steps`` steps; trajectories are class-conditional with CFG. Non-finite
activations raise :class:`CalibrationError` naming the layer and the timestep.

Layer selection (digest §9.1, our default): :data:`DEFAULT_LAYERS` = the token-wise block linears
``attn1.to_q/to_k/to_v``, ``attn1.to_out.0``, ``ff.net.0.proj``, ``ff.net.2``; :data:`ALL_FC_LAYERS`
adds the adaLN modulation linears ``norm1.linear`` (the literal "every fully-connected layer of every
block" reading). The paper's exact layer set is unknown.
"""
from __future__ import annotations

import fnmatch
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path

__all__ = [
    "DEFAULT_LAYERS", "ADALN_LAYERS", "ALL_FC_LAYERS", "CalibrationError", "TensorStats",
    "LayerCalibration", "Calibration", "ActivationRecorder", "calibrate", "select_linears",
    "match_pattern", "calibration_timesteps", "HIST_BINS", "hist_bin_edges",
]

#: Token-wise linears of a diffusers DiT block (our default quantized set, digest §9.1).
DEFAULT_LAYERS: tuple[str, ...] = (
    "*.attn1.to_q", "*.attn1.to_k", "*.attn1.to_v", "*.attn1.to_out.0", "*.ff.net.0.proj", "*.ff.net.2",
)
#: The adaLN-Zero modulation linear of every block (input: one conditioning vector per sample).
ADALN_LAYERS: tuple[str, ...] = ("*.norm1.linear",)
#: "Every fully-connected layer of every block" (digest §9.1 literal reading).
ALL_FC_LAYERS: tuple[str, ...] = DEFAULT_LAYERS + ADALN_LAYERS

#: Number of histogram bins (bits 20..30 of a float32: 8 exponent bits + 3 mantissa bits).
HIST_BINS = 2048
_HASH_COLS = 64  # columns of a row that enter its reservoir hash
_HASH_MASK = -65536  # 0xFFFF0000 as int32: keep sign, exponent and the top 7 mantissa bits


class CalibrationError(ValueError):
    """Calibration failed (non-finite activations, nothing recorded, a layer pattern matching nothing)."""


# --------------------------------------------------------------------------------------------------
# Layer selection (torchao FqnToConfig style: fully-qualified names matched by patterns)
# --------------------------------------------------------------------------------------------------
def match_pattern(name: str, pattern: str) -> bool:
    """Whether the fully-qualified module name ``name`` matches ``pattern``.

    ``pattern`` is a shell-style glob (``fnmatch``; ``*`` also matches dots) or, with the prefix
    ``"re:"``, a regular expression that must match the whole name.
    """
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_linears(model: nn.Module, patterns: Sequence[str], exclude: Sequence[str] = (), *,
                   strict: bool = True) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules of ``model`` whose names match any of ``patterns`` and none of ``exclude``.

    Args:
        model: any module (a diffusers ``DiTTransformer2DModel`` in this project).
        patterns: glob or ``re:`` patterns (see :func:`match_pattern`), e.g. :data:`DEFAULT_LAYERS`.
        exclude: patterns removed from the selection.
        strict: raise :class:`CalibrationError` if a pattern matches no ``nn.Linear`` or nothing is selected.

    Returns:
        ``{name: module}`` in the model's module order.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    named = [(n, m) for n, m in model.named_modules() if n]
    linears = [(n, m) for n, m in named if isinstance(m, nn.Linear)]
    out = {n: m for n, m in linears
           if any(match_pattern(n, p) for p in patterns) and not any(match_pattern(n, p) for p in exclude)}
    if strict:
        for p in patterns:
            if not any(match_pattern(n, p) for n, _ in linears):
                others = [n for n, _ in named if match_pattern(n, p)]
                what = (f"it matches {len(others)} module(s) but none is an nn.Linear (already quantized?)"
                        if others else "it matches no module")
                example = ", ".join(n for n, _ in linears[:4])
                raise CalibrationError(f"layer pattern {p!r}: {what}. Linear layers look like: {example} …")
        if not out:
            raise CalibrationError(f"patterns {tuple(patterns)} minus exclude {tuple(exclude)} select no layer")
    return out


# --------------------------------------------------------------------------------------------------
# Statistics of one tensor
# --------------------------------------------------------------------------------------------------
def hist_bin_edges() -> torch.Tensor:
    """Lower edge of every histogram bin (float64, [HIST_BINS + 1]; the last entry is +inf-ish)."""
    codes = (torch.arange(HIST_BINS + 1, dtype=torch.int64) << 20).clamp(max=0x7F800000).to(torch.int32)
    return codes.view(torch.float32).to(torch.float64)


def _row_hash(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """A 63-bit integer hash [n] of rows ``x`` [n, d] from their float32 bits (exact integer arithmetic)."""
    d = x.shape[1]
    cols = torch.linspace(0, d - 1, min(d, _HASH_COLS)).round().long()
    # bfloat16-like truncation (sign, exponent, 7 mantissa bits): a 1-ulp difference in the model's output
    # (BLAS results can depend on the batch size) almost never changes which rows are kept
    bits = (x[:, cols].contiguous().view(torch.int32) & _HASH_MASK).to(torch.int64)
    h = (bits * coeffs[: len(cols)]).sum(dim=1)  # wraps modulo 2^64: associative and exact
    h = h ^ (h >> 31)
    h = h * 6364136223846793005  # an LCG multiplier (wrapping)
    h = h ^ (h >> 29)
    return h & 0x7FFFFFFFFFFFFFFF


@dataclass
class TensorStats:
    """Running statistics of the rows ``x`` [rows, d] of one tensor (one layer input at one timestep).

    Attributes (all CPU tensors):
        d: number of channels (in_features).
        count: number of rows seen.
        absmax: max |x| over everything (float).
        channel_absmax: [d] float32, max |x| per input channel.
        channel_sumsq: [d] float64, Σ x² per channel.
        moments: [4] float64, Σx, Σx², Σx³, Σx⁴ over all elements.
        hist: [HIST_BINS] int64, exact log-scale histogram of |x| (see the module docstring).
        rows: [≤ capacity, d] float32, the reservoir rows; ``priority`` [≤ capacity] int64 their hashes.
        capacity: reservoir size (rows kept).
    """

    d: int
    capacity: int
    coeffs: torch.Tensor
    count: int = 0
    absmax: float = 0.0
    channel_absmax: torch.Tensor | None = None
    channel_sumsq: torch.Tensor | None = None
    moments: torch.Tensor | None = None
    hist: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    priority: torch.Tensor | None = None
    top_k: int = 8
    top_rows: torch.Tensor | None = None
    top_absmax: torch.Tensor | None = None
    top_priority: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.channel_absmax is None:
            self.channel_absmax = torch.zeros(self.d, dtype=torch.float32)
            self.channel_sumsq = torch.zeros(self.d, dtype=torch.float64)
            self.moments = torch.zeros(4, dtype=torch.float64)
            self.hist = torch.zeros(HIST_BINS, dtype=torch.int64)
        # Row stores are preallocated once and updated in place (``rows`` etc. are views of the first
        # valid entries): allocating small long-lived tensors in the middle of every forward pass
        # fragmented the heap and inflated the peak RSS by hundreds of MB.
        self._rows_buf = torch.zeros(self.capacity, self.d, dtype=torch.float32)
        self._prio_buf = torch.zeros(self.capacity, dtype=torch.int64)
        self._top_buf = torch.zeros(self.top_k, self.d, dtype=torch.float32)
        self._topm_buf = torch.zeros(self.top_k, dtype=torch.float32)
        self._topp_buf = torch.zeros(self.top_k, dtype=torch.int64)
        rows, prio = self.rows, self.priority
        top, topm, topp = self.top_rows, self.top_absmax, self.top_priority
        self._set_rows(rows if rows is not None else self._rows_buf[:0],
                       prio if prio is not None else self._prio_buf[:0])
        self._set_top(top if top is not None else self._top_buf[:0], topm if topm is not None else self._topm_buf[:0],
                      topp if topp is not None else self._topp_buf[:0])

    def _set_rows(self, rows: torch.Tensor, prio: torch.Tensor) -> None:
        k = len(prio)
        if k > self.capacity:
            raise ValueError(f"{k} rows exceed the reservoir capacity {self.capacity}")
        self._rows_buf[:k].copy_(rows)
        self._prio_buf[:k].copy_(prio)
        self.rows, self.priority = self._rows_buf[:k], self._prio_buf[:k]

    def _set_top(self, rows: torch.Tensor, absmax: torch.Tensor, prio: torch.Tensor) -> None:
        k = len(prio)
        self._top_buf[:k].copy_(rows)
        self._topm_buf[:k].copy_(absmax)
        self._topp_buf[:k].copy_(prio)
        self.top_rows, self.top_absmax, self.top_priority = self._top_buf[:k], self._topm_buf[:k], self._topp_buf[:k]

    # -- accumulation ------------------------------------------------------------------------------
    def update(self, x: torch.Tensor) -> None:
        """Add rows ``x`` [n, d] (any float dtype; converted to float32). Processed in chunks of about
        2^20 elements, so the temporaries stay small whatever the batch."""
        x = x.detach().to(torch.float32).reshape(-1, self.d)
        step = max(1, (1 << 20) // self.d)
        for i in range(0, x.shape[0], step):
            self._update(x[i:i + step])

    def _update(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        a = x.abs()
        cmax = a.amax(dim=0)
        torch.maximum(self.channel_absmax, cmax, out=self.channel_absmax)
        self.absmax = max(self.absmax, float(cmax.max()))
        sq = x * x  # float32 powers, float64 accumulation
        f64 = torch.float64
        self.channel_sumsq += sq.sum(dim=0, dtype=f64)
        self.moments += torch.stack([x.sum(dtype=f64), sq.sum(dtype=f64), (sq * x).sum(dtype=f64),
                                     (sq * sq).sum(dtype=f64)])
        codes = (a.view(torch.int32) >> 20).reshape(-1)
        self.hist += torch.bincount(codes, minlength=HIST_BINS)[:HIST_BINS]
        self.count += x.shape[0]
        if self.capacity > 0 or self.top_k > 0:
            pr = _row_hash(x, self.coeffs)
            if self.capacity > 0:
                self._merge_rows(x, pr)
            if self.top_k > 0:
                self._merge_top(x, a.amax(dim=1), pr)

    def _merge_top(self, rows: torch.Tensor, absmax: torch.Tensor, pr: torch.Tensor) -> None:
        """Keep the ``top_k`` rows with the largest max-abs (ties: smallest hash) — the extreme rows that
        fix a static α = max; a hash-sampled reservoir would miss them."""
        allr = torch.cat([self.top_rows, rows])
        allm = torch.cat([self.top_absmax, absmax])
        allp = torch.cat([self.top_priority, pr])
        order = torch.sort(allp, stable=True).indices
        order = order[torch.sort(allm[order], descending=True, stable=True).indices][: self.top_k]
        self._set_top(allr[order], allm[order], allp[order])

    def _merge_rows(self, rows: torch.Tensor, pr: torch.Tensor) -> None:
        allp = torch.cat([self.priority, pr])
        keep = torch.sort(allp, stable=True).indices[: self.capacity]
        allr = torch.cat([self.rows, rows])
        self._set_rows(allr[keep], allp[keep])

    def merge(self, other: "TensorStats", *, keep_all_rows: bool = True) -> "TensorStats":
        """A new TensorStats pooling ``self`` and ``other`` (rows: concatenated when ``keep_all_rows``)."""
        out = TensorStats(self.d, self.capacity + other.capacity if keep_all_rows else self.capacity, self.coeffs)
        out.count = self.count + other.count
        out.absmax = max(self.absmax, other.absmax)
        out.channel_absmax = torch.maximum(self.channel_absmax, other.channel_absmax)
        out.channel_sumsq = self.channel_sumsq + other.channel_sumsq
        out.moments = self.moments + other.moments
        out.hist = self.hist + other.hist
        out.top_k = self.top_k
        out._top_buf, out._topm_buf, out._topp_buf = (torch.zeros_like(self._top_buf), torch.zeros_like(self._topm_buf),
                                                      torch.zeros_like(self._topp_buf))
        out._set_top(self.top_rows, self.top_absmax, self.top_priority)
        out._merge_top(other.top_rows, other.top_absmax, other.top_priority)
        if keep_all_rows:
            out._set_rows(torch.cat([self.rows, other.rows]), torch.cat([self.priority, other.priority]))
        else:
            out._set_rows(self.rows, self.priority)
            out._merge_rows(other.rows, other.priority)
        return out

    # -- derived statistics ------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.count * self.d

    @property
    def mean(self) -> float:
        return float(self.moments[0] / max(self.numel, 1))

    @property
    def std(self) -> float:
        n = max(self.numel, 1)
        m = self.moments / n
        return float(max(m[1] - m[0] ** 2, 0.0) ** 0.5)

    @property
    def kurtosis(self) -> float:
        """Pearson kurtosis E[(x-μ)⁴]/σ⁴ (3 for a Gaussian) over all elements."""
        n = max(self.numel, 1)
        m1, m2, m3, m4 = (self.moments / n).tolist()
        var = m2 - m1 * m1
        if var <= 0:
            return float("nan")
        c4 = m4 - 4 * m1 * m3 + 6 * m1 * m1 * m2 - 3 * m1 ** 4
        return float(c4 / var ** 2)

    @property
    def channel_rms(self) -> torch.Tensor:
        """[d] float64, per-channel root mean square."""
        return (self.channel_sumsq / max(self.count, 1)).sqrt()

    def percentile(self, q: "float | Sequence[float]") -> "float | list[float]":
        """Percentile(s) of ``|x|`` (q in [0, 100]) from the histogram, linear inside a bin."""
        qs = [q] if isinstance(q, (int, float)) else list(q)
        cum = torch.cumsum(self.hist, 0).to(torch.float64)
        total = float(cum[-1]) if len(cum) else 0.0
        edges = hist_bin_edges()
        out = []
        for qq in qs:
            if total == 0:
                out.append(0.0)
                continue
            target = qq / 100.0 * total
            k = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64))[0].clamp(max=HIST_BINS - 1))
            below = float(cum[k - 1]) if k > 0 else 0.0
            inside = float(self.hist[k])
            frac = 0.0 if inside == 0 else min(max((target - below) / inside, 0.0), 1.0)
            lo, hi = float(edges[k]), float(edges[k + 1])
            out.append(min(lo + frac * (hi - lo), self.absmax))
        return out[0] if isinstance(q, (int, float)) else out

    def summary(self, percentiles: Sequence[float] = (50, 99, 99.9)) -> dict:
        """Scalar statistics as a flat dict (for pandas)."""
        cmax = self.channel_absmax
        pos = cmax[cmax > 0]
        row = {
            "rows": self.count, "absmax": self.absmax, "mean": self.mean, "std": self.std,
            "kurtosis": self.kurtosis,
            "channel_max_ratio": float(cmax.max() / pos.min()) if len(pos) else float("nan"),
        }
        for q, v in zip(percentiles, self.percentile(list(percentiles))):
            row[f"p{q:g}"] = v
        return row

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.channel_absmax, self.channel_sumsq, self.moments, self.hist, self._rows_buf, self._prio_buf,
                    self._top_buf, self._topm_buf, self._topp_buf))


@dataclass
class LayerCalibration:
    """Calibration record of one layer input: ``per_timestep[t]`` for each recorded timestep ``t``."""

    name: str
    in_features: int
    per_timestep: dict[int, TensorStats] = field(default_factory=dict)
    shared_with: list[str] = field(default_factory=list)  # other layers reading the same tensor

    def pooled(self, timesteps: Iterable[int] | None = None) -> TensorStats:
        """Statistics pooled over ``timesteps`` (default all); rows are concatenated (balanced per timestep)."""
        ts = sorted(self.per_timestep) if timesteps is None else list(timesteps)
        if not ts:
            raise CalibrationError(f"layer {self.name!r}: no timestep recorded")
        acc = self.per_timestep[ts[0]]
        for t in ts[1:]:
            acc = acc.merge(self.per_timestep[t])
        return acc

    def rows(self, timesteps: Iterable[int] | None = None) -> torch.Tensor:
        """Reservoir rows [n, in_features] (float32), pooled over ``timesteps`` in timestep order."""
        ts = sorted(self.per_timestep) if timesteps is None else list(timesteps)
        return torch.cat([self.per_timestep[t].rows for t in ts]) if ts else torch.zeros(0, self.in_features)

    def extreme_rows(self, timesteps: Iterable[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the top-k max-abs rows of every timestep [m, d], their timesteps [m]) — they contain the row
        holding the calibration-wide max, so a static α = γ·max is exact even though the reservoir
        is a sample."""
        ts = sorted(self.per_timestep) if timesteps is None else list(timesteps)
        rows = [self.per_timestep[t].top_rows for t in ts]
        tags = [torch.full((len(r),), t, dtype=torch.int64) for t, r in zip(ts, rows)]
        return torch.cat(rows), torch.cat(tags)

    def rows_by_timestep(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [n, d], timestep of each row [n] int64)."""
        ts = sorted(self.per_timestep)
        rows = [self.per_timestep[t].rows for t in ts]
        tags = [torch.full((len(r),), t, dtype=torch.int64) for t, r in zip(ts, rows)]
        return torch.cat(rows), torch.cat(tags)


@dataclass
class Calibration:
    """Everything :func:`calibrate` / :class:`ActivationRecorder` recorded.

    Attributes:
        layers: ``{layer name: LayerCalibration}``; layers that read the same input tensor map to the
            same object (``to_q``/``to_k``/``to_v``).
        timesteps: the recorded timesteps (diffusers scheduler values, descending order of sampling).
        meta: how it was made (trajectories, cfg, seeds, steps, rows per timestep, wall time, …).
    """

    layers: dict[str, LayerCalibration]
    timesteps: list[int]
    meta: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerCalibration:
        try:
            return self.layers[name]
        except KeyError:
            raise CalibrationError(
                f"no calibration data for layer {name!r}; recorded layers: {list(self.layers)[:8]} … "
                "(capture with the recipe's layer patterns)") from None

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def unique(self) -> list[LayerCalibration]:
        seen, out = set(), []
        for rec in self.layers.values():
            if id(rec) not in seen:
                seen.add(id(rec))
                out.append(rec)
        return out

    def nbytes(self) -> int:
        """Bytes held by all statistics and reservoirs."""
        return sum(s.nbytes() for rec in self.unique() for s in rec.per_timestep.values())

    def to_pandas(self, percentiles: Sequence[float] = (50, 99, 99.9)):
        """One row per (layer, timestep): the scalar statistics of :meth:`TensorStats.summary`."""
        import pandas as pd

        rows = []
        for name, rec in self.layers.items():
            for t, st in rec.per_timestep.items():
                rows.append({"layer": name, "timestep": t, **st.summary(percentiles)})
        return pd.DataFrame(rows)

    def save(self, path) -> None:
        """Save with ``torch.save`` (tensors + plain Python values), atomically: a temporary file beside
        ``path`` renamed onto it, so ``path`` is either absent or complete."""
        blob = {"timesteps": self.timesteps, "meta": self.meta, "layers": {}, "alias": {}}
        owner: dict[int, str] = {}
        for name, rec in self.layers.items():
            if id(rec) in owner:
                blob["alias"][name] = owner[id(rec)]
                continue
            owner[id(rec)] = name
            blob["layers"][name] = {
                "in_features": rec.in_features, "shared_with": rec.shared_with,
                "per_timestep": {t: {k: (v.clone() if torch.is_tensor(v) else v) for k in (
                    "d", "capacity", "coeffs", "count", "absmax", "channel_absmax", "channel_sumsq",
                    "moments", "hist", "rows", "priority", "top_k", "top_rows", "top_absmax", "top_priority")
                    for v in (getattr(s, k),)} for t, s in rec.per_timestep.items()},
            }
        with atomic_path(path) as tmp:
            torch.save(blob, tmp)

    @classmethod
    def load(cls, path) -> "Calibration":
        """Read a file written by :meth:`save` (``torch.load(weights_only=True)``: no code is unpickled).

        Raises:
            FileNotFoundError: no such file.
            CalibrationError: the file is damaged, truncated, not a calibration, or holds pickled objects
                other than tensors and plain values.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no calibration file {path}; make one with calibrate(bundle, …).save(path)")
        from .models import load_error_reason

        try:
            blob = torch.load(path, weights_only=True)
        except Exception as err:  # truncated zip, bad pickle, forbidden global: all mean "unusable file"
            raise CalibrationError(
                f"cannot read calibration file {path} ({load_error_reason(err)}): it is damaged, truncated or not "
                "written by Calibration.save. Delete it and calibrate again") from err
        if not isinstance(blob, dict) or not {"layers", "alias", "timesteps", "meta"} <= set(blob):
            raise CalibrationError(f"{path} is not a calibration written by Calibration.save (keys "
                                   f"{sorted(blob) if isinstance(blob, dict) else type(blob).__name__}); calibrate again")
        layers: dict[str, LayerCalibration] = {}
        for name, rec in blob["layers"].items():
            layers[name] = LayerCalibration(name, rec["in_features"],
                                            {int(t): TensorStats(**s) for t, s in rec["per_timestep"].items()},
                                            list(rec["shared_with"]))
        for name, target in blob["alias"].items():
            layers[name] = layers[target]
        return cls(layers, list(blob["timesteps"]), dict(blob["meta"]))


# --------------------------------------------------------------------------------------------------
# Recording with hooks
# --------------------------------------------------------------------------------------------------
def _timestep_of(args, kwargs) -> int | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    t = torch.as_tensor(t).flatten()
    if t.numel() == 0:
        return None
    if t.numel() > 1 and not bool((t == t[0]).all()):
        raise CalibrationError(f"capture expects one timestep per forward call, got {t.tolist()[:8]} …")
    return int(round(float(t[0])))


class ActivationRecorder:
    """Context manager that records the inputs of selected linears while the model runs.

    Usage::

        with ActivationRecorder(transformer, DEFAULT_LAYERS, timesteps={999, 499}) as rec:
            transformer(x, timestep=t, class_labels=y)      # any number of calls, any batch size
        calib = rec.calibration

    The current timestep is read from the ``timestep`` argument of the top-level model call (a forward
    pre-hook with kwargs); calls at timesteps outside ``timesteps`` are not recorded (``None``: record
    all). Calls without a timestep are recorded under timestep ``-1``.

    Args:
        model: the transformer.
        layers: layer patterns (see :func:`select_linears`); ``exclude`` removes names.
        timesteps: the timesteps to record, or ``None`` for all.
        rows_per_timestep: reservoir size R per input and timestep (0: statistics only).
        seed: seeds the reservoir hash.
        attention: also record the attention-matmul inputs Q, K, V (per head, rows of head_dim) and the
            softmax output P of every ``attn1`` whose ``to_q`` is selected, as pseudo-layers
            ``<attn>.q``, ``<attn>.k``, ``<attn>.v``, ``<attn>.p`` (installs a custom processor for the
            duration; restored on exit).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] = DEFAULT_LAYERS, *, exclude: Sequence[str] = (),
                 timesteps: Iterable[int] | None = None, rows_per_timestep: int = 256, seed: int = 0,
                 attention: bool = False) -> None:
        self.model = model
        self.modules = select_linears(model, layers, exclude)
        self.timesteps = None if timesteps is None else {int(t) for t in timesteps}
        self.rows_per_timestep = int(rows_per_timestep)
        gen = torch.Generator().manual_seed(seed)
        self.coeffs = torch.randint(1, 2 ** 62, (_HASH_COLS,), generator=gen, dtype=torch.int64) | 1
        self.attention = attention
        self._records: dict[str, LayerCalibration] = {}
        self._handles: list = []
        self._t: int | None = -1
        self._active = True
        self._last_input: torch.Tensor | None = None
        self._last_name: str | None = None
        self._alias: dict[str, str] = {}
        self._seen_t: set[int] = set()
        self._old_processors: dict = {}

    def __enter__(self) -> "ActivationRecorder":
        self._handles.append(self.model.register_forward_pre_hook(self._pre_model, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._post_model))
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_pre_hook(self._make_hook(name)))
            if self.timesteps is not None:  # allocate every store up front (see TensorStats.__post_init__)
                rec = self._records.setdefault(name, LayerCalibration(name, mod.in_features))
                for t in sorted(self.timesteps, reverse=True):
                    rec.per_timestep.setdefault(t, TensorStats(mod.in_features, self.rows_per_timestep, self.coeffs))
        if self.attention:
            from .qmodel import QuantAttnProcessor

            for name in self.modules:
                if name.endswith(".to_q"):
                    attn_name = name[: -len(".to_q")]
                    attn = self.model.get_submodule(attn_name)
                    self._old_processors[attn_name] = attn.processor
                    attn.set_processor(QuantAttnProcessor(observer=self._make_observer(attn_name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for attn_name, proc in self._old_processors.items():
            self.model.get_submodule(attn_name).set_processor(proc)
        self._old_processors.clear()
        self._last_input = None

    # hooks
    def _pre_model(self, module, args, kwargs):
        t = _timestep_of(args, kwargs)
        self._t = -1 if t is None else t
        self._active = self.timesteps is None or self._t in self.timesteps
        if self._active:
            self._seen_t.add(self._t)
        self._last_input = None
        return None

    def _post_model(self, module, args, output):
        self._last_input = None
        return None

    def _record(self, name: str, x: torch.Tensor) -> None:
        d = x.shape[-1]
        x2 = x.detach().reshape(-1, d)
        lo, hi = torch.aminmax(x2) if x2.numel() else (torch.zeros(()), torch.zeros(()))
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):  # NaN propagates, ±inf shows at an end
            bad = int((~torch.isfinite(x2)).sum())
            raise CalibrationError(
                f"non-finite activation at the input of layer {name!r}, timestep {self._t}: {bad} of "
                f"{x2.numel()} elements are NaN/Inf. Check the model's weights and the layers before it for "
                "NaN/Inf (all(torch.isfinite(p).all() for p in model.parameters())); a float16/bfloat16 model "
                "may overflow — calibrate it in float32")
        rec = self._records.get(name)
        if rec is None:
            rec = self._records[name] = LayerCalibration(name, d)
        st = rec.per_timestep.get(self._t)
        if st is None:
            st = rec.per_timestep[self._t] = TensorStats(d, self.rows_per_timestep, self.coeffs)
        st.update(x2)

    def _make_hook(self, name: str) -> Callable:
        def hook(module, args):
            if not self._active:
                return None
            x = args[0]
            if self._last_input is not None and x is self._last_input:
                self._alias.setdefault(name, self._last_name)
                self._records.pop(name, None)  # its preallocated stores are not needed
                return None
            if name in self._alias:  # shared-input layer seen before: same tensor object expected
                return None
            self._last_input, self._last_name = x, name
            self._record(name, x)
            return None
        return hook

    def _make_observer(self, attn_name: str) -> Callable:
        def observe(kind: str, t: torch.Tensor) -> None:
            if self._active:
                self._record(f"{attn_name}.{kind}", t)
        return observe

    @property
    def calibration(self) -> Calibration:
        """The :class:`Calibration` recorded so far."""
        if not self._records:
            raise CalibrationError(
                f"nothing was recorded: the model ran at timesteps {sorted(self._seen_t)} but recording was "
                f"restricted to {sorted(self.timesteps) if self.timesteps is not None else 'all'}")
        for name in [n for n, r in self._records.items() if all(st.count == 0 for st in r.per_timestep.values())]:
            del self._records[name]  # preallocated but never reached (e.g. timesteps never sampled)
        if not self._records:
            raise CalibrationError(
                f"nothing was recorded: the model ran at timesteps {sorted(self._seen_t)} but recording was "
                f"restricted to {sorted(self.timesteps) if self.timesteps is not None else 'all'}")
        for rec in self._records.values():  # timesteps never reached
            for t in [t for t, st in rec.per_timestep.items() if st.count == 0]:
                del rec.per_timestep[t]
        layers = dict(self._records)
        for name, target in self._alias.items():
            root = target
            while root in self._alias:
                root = self._alias[root]
            layers[name] = self._records[root]
            if name not in self._records[root].shared_with:
                self._records[root].shared_with.append(name)
        ordered = {n: layers[n] for n in self.modules if n in layers}
        ordered.update({n: r for n, r in layers.items() if n not in ordered})  # attention pseudo-layers
        layers = ordered
        ts = sorted({t for rec in self._records.values() for t in rec.per_timestep}, reverse=True)
        return Calibration(layers, ts, {"rows_per_timestep": self.rows_per_timestep})


# --------------------------------------------------------------------------------------------------
# Calibration along sampling trajectories
# --------------------------------------------------------------------------------------------------
def calibration_timesteps(bundle, num_steps: int, num_timesteps: int, sampler: str = "ddpm") -> list[int]:
    """``num_timesteps`` of the ``num_steps``-step sampling schedule, uniformly spread (first and last
    included); scheduler timestep values in sampling (descending) order. Our default (digest §9.10)."""
    from .sampling import make_scheduler

    ts = [int(t) for t in make_scheduler(bundle, sampler, num_steps).timesteps]
    n = min(num_timesteps, len(ts))
    idx = np.unique(np.round(np.linspace(0, len(ts) - 1, n)).astype(int))
    return [ts[i] for i in idx]


@torch.no_grad()
def calibrate(bundle, *, layers: Sequence[str] = DEFAULT_LAYERS, exclude: Sequence[str] = (),
              num_trajectories: int | None = None, num_timesteps: int | None = None, num_steps: int | None = None,
              cfg_scale: float = 1.5, seed: int = 0, batch_size: int | None = None, rows_per_timestep: int = 256,
              attention: bool = False, sampler: str = "ddpm", profile: str | None = None) -> Calibration:
    """Run FP32 sampling trajectories and record the selected layers' inputs (digest §9.10 defaults).

    Args:
        bundle: a ``models.DiTBundle`` (transformer, scheduler, num_classes, null_class, …).
        layers, exclude: layer patterns (:func:`select_linears`).
        num_trajectories: class-conditional trajectories (labels ``i mod num_classes``, seeds ``seed + i``);
            default ``profile().calib_trajectories``.
        num_timesteps: recorded timesteps spread over the schedule; default ``profile().calib_timesteps``.
        num_steps: sampling steps; default ``profile().sampling_steps``.
        cfg_scale: classifier-free guidance scale (both CFG halves are recorded).
        batch_size: trajectories per sampling call (does not change the statistics).
        sampler: "ddpm" (default) or "ddim" — trajectories come from ``sampling.denoise_batch``.
        rows_per_timestep: reservoir rows per input and timestep (memory bound in the module docstring).
        attention: also record the attention-matmul inputs (see :class:`ActivationRecorder`).

    Returns:
        a :class:`Calibration` whose ``meta`` holds the protocol and wall time.
    """
    from .config import profile as get_profile

    prof = get_profile(profile)
    n = prof.calib_trajectories if num_trajectories is None else num_trajectories
    steps = prof.sampling_steps if num_steps is None else num_steps
    nts = prof.calib_timesteps if num_timesteps is None else num_timesteps
    batch_size = n if batch_size is None else batch_size
    for what, v in (("num_trajectories", n), ("num_timesteps", nts), ("num_steps", steps), ("batch_size", batch_size)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise CalibrationError(
                f"empty calibration set: {what}={v!r}; calibration needs at least one trajectory, one recorded "
                f"timestep and one sampling step (pass {what} >= 1, or None for the profile's "
                f"{prof.name!r} default)")
    if rows_per_timestep < 0:
        raise CalibrationError(f"rows_per_timestep must be >= 0, got {rows_per_timestep}")
    ts = calibration_timesteps(bundle, steps, nts, sampler)
    labels = torch.arange(n) % bundle.num_classes
    seeds = [seed + i for i in range(n)]
    from .sampling import denoise_batch

    t0 = time.perf_counter()
    model = bundle.transformer
    was_training = model.training
    model.eval()
    with ActivationRecorder(model, layers, exclude=exclude, timesteps=ts, rows_per_timestep=rows_per_timestep,
                            seed=seed, attention=attention) as rec:
        for i in range(0, n, batch_size):
            denoise_batch(bundle, labels[i:i + batch_size], seeds[i:i + batch_size], num_steps=steps,
                          cfg_scale=cfg_scale, sampler=sampler)
    model.train(was_training)
    calib = rec.calibration
    missing = set(ts) - set(calib.timesteps)
    if missing:
        raise CalibrationError(f"timesteps {sorted(missing)} were never seen while sampling; recorded "
                               f"{calib.timesteps}. Does the sampler use a different schedule?")
    calib.meta.update({"num_trajectories": n, "num_steps": steps, "num_timesteps": len(ts), "cfg_scale": cfg_scale,
                       "seed": seed, "layers": list(layers), "exclude": list(exclude),
                       "sampler": sampler, "rows_per_timestep": rows_per_timestep,
                       "seconds": time.perf_counter() - t0})
    return calib
