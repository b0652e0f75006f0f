"""Streaming statistics of a tensor's rows: moments, per-channel maxima, an exact histogram, sampled rows.

:class:`TensorStats` accumulates the rows ``x`` [rows, d] of one tensor (one layer input at one timestep,
in this project) over any number of batches:

* ``count``, ``absmax``, per-channel max-abs ``channel_absmax`` [d], per-channel mean square;
* the first four moments (float64 sums) → mean, std, kurtosis;
* an exact log-scale histogram of ``|x|``: bin ``k`` holds the float32 values whose bits 20…30
  (8 exponent bits + the top 3 mantissa bits) equal ``k`` — 2048 bins covering all of float32, eight
  per octave, no rounding anywhere. Percentiles are read off it (linear inside a bin, so a percentile
  is exact to within one bin, ≤ 1/8 octave ≈ 9 %);
* the K = 8 rows with the largest max-abs ("extreme rows"; ties broken by the hash below);
* a bounded **reservoir** of raw rows: the ``capacity`` rows with the smallest value of a seeded integer
  hash of the row's content (64 columns, truncated to bfloat16 precision so that 1-ulp differences
  between runs rarely matter) — "bottom-k sampling". The hash depends only on the row's content, so the
  reservoir does not depend on batch size or order of arrival, and it is reproducible from the seed.

Every statistic except the float64 moment sums is computed with integer or max operations, so it is
*identical* whatever the batch size; the moment sums agree to float64 rounding (~1e-15 relative).
Memory: ``(capacity + 8) · d · 4`` bytes of rows, ``12 · d`` bytes of per-channel statistics and 16 KiB
of histogram (:meth:`TensorStats.nbytes`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["HIST_BINS", "HASH_COLS", "hist_bin_edges", "hash_coefficients", "row_hash", "TensorStats"]

#: Number of histogram bins (bits 20..30 of a float32: 8 exponent bits + 3 mantissa bits).
HIST_BINS = 2048
HASH_COLS = 64  # columns of a row that enter its reservoir hash
HASH_MASK = -65536  # 0xFFFF0000 as int32: keep sign, exponent and the top 7 mantissa bits


def hash_coefficients(seed: int) -> torch.Tensor:
    """The odd int64 coefficients [HASH_COLS] of the reservoir hash, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 2 ** 62, (HASH_COLS,), generator=gen, dtype=torch.int64) | 1


def hist_bin_edges() -> torch.Tensor:
    """Lower edge of every histogram bin (float64, [HIST_BINS + 1]; the last entry is +inf-ish)."""
    codes = (torch.arange(HIST_BINS + 1, dtype=torch.int64) << 20).clamp(max=0x7F800000).to(torch.int32)
    return codes.view(torch.float32).to(torch.float64)


def row_hash(x: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """A 63-bit integer hash [n] of rows ``x`` [n, d] from their float32 bits (exact integer arithmetic)."""
    d = x.shape[1]
    cols = torch.linspace(0, d - 1, min(d, HASH_COLS)).round().long()
    # bfloat16-like truncation (sign, exponent, 7 mantissa bits): a 1-ulp difference in the model's output
    # (BLAS results can depend on the batch size) almost never changes which rows are kept
    bits = (x[:, cols].contiguous().view(torch.int32) & HASH_MASK).to(torch.int64)
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
            pr = row_hash(x, self.coeffs)
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
