"""Calibration: record the inputs of a DiT's quantizable linear layers along real sampling trajectories.

What is recorded
----------------
For every selected ``nn.Linear`` (layer selection: :func:`~hqdit_utils.engine.layers.select_linears`) and every
recorded timestep, a :class:`~hqdit_utils.engine.stats.TensorStats` of the layer's input rows ``x``
[rows, in_features] (rows = batch × tokens; the two halves of a CFG batch are pooled,
book/choices.md#choices-activations): moments, per-channel maxima, an exact histogram, the extreme rows
and a content-hashed reservoir of rows, identical whatever the batch size (see :mod:`hqdit_utils.engine.stats`).
The rows feed the clipping search, format selection and GPTQ.

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

Which timesteps (our default, book/choices.md#choices-calibration): ``num_timesteps`` timesteps spread
uniformly over the sampling schedule of ``num_steps`` steps; trajectories are class-conditional with
CFG. Non-finite activations raise :class:`CalibrationError` naming the layer and the timestep.

Which layers (our default, book/choices.md#choices-layers): :data:`~hqdit_utils.engine.layers.DEFAULT_LAYERS`,
the token-wise block linears; :data:`~hqdit_utils.engine.layers.ALL_FC_LAYERS` adds the adaLN modulation
linears. The paper's exact layer set is unknown.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import profile as get_profile
from ..errors import CalibrationError
from ..files import atomic_path, load_error_reason
from .layers import DEFAULT_LAYERS, LayerSelectionError, select_linears
from ..dit.models import as_bundle
from .qlinear import QuantAttnProcessor
from ..dit.sampling import denoise_batch, make_scheduler
from .stats import TensorStats, hash_coefficients

__all__ = ["CalibrationError", "LayerCalibration", "Calibration", "ActivationRecorder", "calibrate",
           "calibration_timesteps", "weight_fingerprint", "warn_other_weights"]



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


def weight_fingerprint(linear: nn.Linear) -> list[float]:
    """A cheap fingerprint of a linear's weight ``W`` [out, in]: ``[out, in, Σ W, Σ ±W, Σ |W|]`` (float64 sums;
    ``±`` alternates the sign along the flattened weight). Two independently initialised or trained weights of
    the same shape differ in the signed sums by about ``√(out·in)·σ``, a cast to float16/bfloat16 changes
    them far less (the check in :meth:`Calibration.check_fits` allows 1e-3·Σ|W|, our choice)."""
    w = linear.weight.detach().reshape(-1).to(torch.float64)
    alt = w[0::2].sum() - w[1::2].sum()
    return [int(linear.out_features), int(linear.in_features), float(w.sum()), float(alt), float(w.abs().sum())]


def warn_other_weights(recorded: dict, modules: "dict[str, nn.Linear]", what: str, fix: str,
                       stacklevel: int = 3) -> list[str]:
    """The names of ``modules`` ({name: linear}) whose :func:`weight_fingerprint` differs from the one
    ``recorded`` ({name: fingerprint}; names without one are skipped), with a ``UserWarning``
    "``what`` a model with other weights (…): ``fix``" when there are any. The tolerance allows a cast to
    float16/bfloat16 (1e-3·Σ|W| on the signed sums, our choice). The one home of this check: calibrations
    (:meth:`Calibration.check_fits`) and quantized states (:func:`~hqdit_utils.engine.qmodel.load_quantized`)."""
    other = []
    for name, lin in modules.items():
        fp = recorded.get(name)
        if fp is None:
            continue
        now = weight_fingerprint(lin)
        tol = 1e-3 * max(fp[4], now[4]) + 1e-30
        if abs(now[2] - fp[2]) > tol or abs(now[3] - fp[3]) > tol or abs(now[4] - fp[4]) > 10 * tol:
            other.append(name)
    if other:
        warnings.warn(f"{what} a model with other weights ({len(other)} layer(s) differ, e.g. {other[0]!r}; same "
                      f"shapes): {fix}", UserWarning, stacklevel=stacklevel)
    return other


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

    def __repr__(self) -> str:
        recs = self.unique()
        rows = sum(len(st.rows) for rec in recs for st in rec.per_timestep.values())
        return (f"Calibration({len(self.layers)} layers, {len(recs)} distinct inputs, {rows} reservoir rows, "
                f"{len(self.timesteps)} timesteps {self.timesteps}, {self.nbytes() / 1e6:.1f} MB)")

    def __getitem__(self, name: str) -> LayerCalibration:
        try:
            return self.layers[name]
        except KeyError:
            raise CalibrationError(
                f"no calibration data for layer {name!r}; recorded layers: {list(self.layers)[:8]} … "
                "(capture with the recipe's layer patterns)") from None

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def check_fits(self, modules: "dict[str, nn.Linear]") -> None:
        """Check that this calibration was recorded on the model that holds ``modules`` ({name: linear}).

        Raises:
            CalibrationError: a layer's shape differs from the recorded one (names the layer and both shapes).
        Warns:
            UserWarning: same shapes, but the weights differ from those seen while recording (the weight
            fingerprint of :func:`weight_fingerprint`, stored in ``meta["weights"]``), i.e. a calibration of
            another model of the same architecture.
        """
        recorded = self.meta.get("weights", {})
        for name, lin in modules.items():
            fp = recorded.get(name)
            was = tuple(fp[:2]) if fp is not None else (None, self.layers[name].in_features) if name in self else None
            if was is not None and (was[1] != lin.in_features or was[0] not in (None, lin.out_features)):
                shape = f"[{was[0]} x {was[1]}]" if was[0] is not None else f"[? x {was[1]}]"
                raise CalibrationError(
                    f"the calibration was recorded on another model: layer {name!r} is [{lin.out_features} x "
                    f"{lin.in_features}] (out x in) here, {shape} in the calibration. Calibrate this model: "
                    "calibrate(model, ...)")
        warn_other_weights(recorded, modules, "the calibration was recorded on",
                           "its activation statistics belong to that model. Calibrate this model (calibrate(model, "
                           "...)) unless that is intended", stacklevel=4)

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
        layers: layer patterns (see :func:`~hqdit_utils.engine.layers.select_linears`); ``exclude`` removes names.
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
        try:
            self.modules = select_linears(model, layers, exclude)
        except LayerSelectionError as err:
            raise CalibrationError(str(err)) from None
        self.timesteps = None if timesteps is None else {int(t) for t in timesteps}
        self.rows_per_timestep = int(rows_per_timestep)
        self.coeffs = hash_coefficients(seed)
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
        weights = {n: weight_fingerprint(m) for n, m in self.modules.items() if n in layers}
        return Calibration(layers, ts, {"rows_per_timestep": self.rows_per_timestep, "weights": weights})


# --------------------------------------------------------------------------------------------------
# Calibration along sampling trajectories
# --------------------------------------------------------------------------------------------------
def calibration_timesteps(bundle, num_steps: int, num_timesteps: int, sampler: str = "ddpm") -> list[int]:
    """``num_timesteps`` of the ``num_steps``-step sampling schedule, uniformly spread (first and last
    included); scheduler timestep values in sampling (descending) order. Our default
    (book/choices.md#choices-calibration)."""
    ts = [int(t) for t in make_scheduler(bundle, sampler, num_steps).timesteps]
    n = min(num_timesteps, len(ts))
    idx = np.unique(np.round(np.linspace(0, len(ts) - 1, n)).astype(int))
    return [ts[i] for i in idx]


@torch.no_grad()
def calibrate(model, scheduler=None, *, conditioning: Callable[[int, torch.Generator], dict] | None = None,
              layers: Sequence[str] = DEFAULT_LAYERS, exclude: Sequence[str] = (),
              num_trajectories: int | None = None, num_timesteps: int | None = None, num_steps: int | None = None,
              cfg_scale: float | None = None, seed: int = 0, batch_size: int | None = None,
              rows_per_timestep: int = 256, attention: bool = False, sampler: str = "ddpm",
              profile: str | None = None) -> Calibration:
    """Run sampling trajectories and record the selected layers' inputs (our defaults:
    book/choices.md#choices-calibration).

    Args:
        model: a bare diffusers ``DiTTransformer2DModel`` or ``PixArtTransformer2DModel``, any other transformer
            with ``conditioning``, or a ``models.DiTBundle`` (``load_dit``; it carries its own scheduler and
            decoder). A bare transformer goes through :func:`~hqdit_utils.dit.models.as_bundle`. The model runs in
            its own dtype and device: float32, float16 and bfloat16 work (statistics are kept in float32; an
            overflow to Inf raises :class:`CalibrationError` naming the layer).
        scheduler: the diffusers scheduler of a bare transformer; default DDPM, 1000 steps, linear β 1e-4…0.02.
        conditioning: ``callable(batch_size, generator) -> dict`` of the forward's keyword arguments besides the
            latents and ``timestep`` — the one adapter for transformers that are neither DiT nor PixArt (DiT:
            class labels; PixArt: random captions, :func:`~hqdit_utils.dit.models.pixart_conditioning`).
        layers, exclude: layer patterns (:func:`~hqdit_utils.engine.layers.select_linears`).
        num_trajectories: trajectories (labels ``i mod num_classes`` for a DiT, seeds ``seed + i``);
            default ``profile().calib_trajectories``.
        num_timesteps: recorded timesteps spread over the schedule; default ``profile().calib_timesteps``.
        num_steps: sampling steps; default ``profile().sampling_steps``.
        cfg_scale: classifier-free guidance scale (both CFG halves are recorded); default 1.5 for a model with
            a null class (DiT), else 1.0 (no guidance).
        batch_size: trajectories per sampling call (does not change the statistics).
        sampler: "ddpm" (default) or "ddim" — trajectories come from ``sampling.denoise_batch``.
        rows_per_timestep: reservoir rows per input and timestep (memory bound in the module docstring).
        attention: also record the attention-matmul inputs (see :class:`ActivationRecorder`).

    Returns:
        a :class:`Calibration` whose ``meta`` holds the protocol and wall time.
    """
    if scheduler is not None and not hasattr(scheduler, "set_timesteps"):
        what = f"{type(scheduler).__name__} {scheduler!r}" if isinstance(scheduler, str) else type(scheduler).__name__
        raise CalibrationError(f"calibrate's second argument is a diffusers scheduler (or None), got a {what}: a recipe "
                               "goes to quantize_(model, recipe, calibration); calibrate with calibrate(model, "
                               "layers=recipe.layers) or calibrate(pipe.transformer, pipe.scheduler)")
    bundle = as_bundle(model, scheduler, conditioning=conditioning)
    if cfg_scale is None:
        cfg_scale = 1.5 if bundle.null_class is not None else 1.0
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
