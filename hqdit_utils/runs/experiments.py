"""One recipe, end to end: calibrate → quantize → sample → evaluate, with on-disk caches.

:func:`run` is what every table of the book calls; :func:`cached_calibrate` is the calibration the
chapters share. Both are cached on disk, and this module is the one place that caches calibrations.

The one run pipeline: :func:`quantized_copy` makes every quantized model of a run (copy, calibrate from a
:class:`CalibrationSpec` or take a ready calibration, ``quantize_``, or load the state kept in a store such as
:func:`qmodel_store`, the one cache of quantized models), and :func:`run_protocol` writes every run's protocol
record; :func:`run`, ``hqdit reproduce``, ``trajectory.quantized_bundle``, ``hqdit quantize`` and the
benchmarks go through them.

What a cache key holds (the rule): everything the cached computation *runs*, nothing else —

* the model's weights (:func:`model_checksum`: the sha256 of the transformer's state dict);
* the recipe: every field of the :class:`~hqdit_utils.engine.recipes.QuantRecipe` except its ``description``;
* the protocol: the profile's sizes (calibration trajectories and timesteps, samples, steps, batch), the
  seed, the sampler and CFG scale, the feature network's checksum and the reference batch;
* the code's behaviour: the declared :data:`~hqdit_utils.numerics.NUMERICS_VERSION`, bumped by a change meant
  to change numbers, kept by a refactor (renames and moves re-key nothing); an undeclared behaviour change is
  caught by the golden check (:mod:`hqdit_utils.runs.golden`), not by the key;
* the versions of this package, torch, diffusers and numpy are *recorded* with every result
  (:func:`~hqdit_utils.provenance.run_versions`), not keyed.

So chapters share runs (the FP32 run is computed once for the whole book) and a rebuild with no change
reads results from disk in milliseconds. The book ships the runs of its last cold build
(``config.SHIPPED_RUNS_DIR``, ``data/book-runs/``): a run missing from the cache whose shipped entry has
exactly the same key material and an intact samples file is adopted (copied into the cache,
``RunResult.shipped``); every other run is computed. So a fresh clone of unchanged code reads the book's
runs, and a change on the code path, the model, a recipe or the protocol recomputes exactly the runs it
touches (``HQDIT_SHIPPED_RUNS=none`` recomputes everything). A cached entry whose key material or sample file does not match
(or that cannot be read) is recomputed, never silently reused. Files are written atomically under names
private to the writer, and one entry is computed under an exclusive file lock, so concurrent runs of the
same entry (several processes, or threads) compute it once and never leave a mixed or half-written entry.

Protocol of one run (our choices; the paper's sampling protocol for ImageNet is in ``data/paper/``):

* labels ``i mod num_classes`` for ``i = 0 … N-1`` and per-sample seeds ``1_000_003 · (seed + 1) + i``: every
  recipe of a table sees *the same* noise and labels for a given seed, so differences between rows are
  differences between quantizers, not between noise draws;
* the same ``seed`` also seeds the calibration trajectories (disjoint from the evaluation seeds);
* DDPM respaced to ``profile.sampling_steps`` steps, CFG scale 1.5 (DiT's FID protocol) by default;
* metrics against the held-out split of the embedded data with the proxy network (FID*, sFID*, IS*,
  P*, R*) plus class-consistency: the share of samples the proxy classifier assigns to the requested
  class. Full-scale DiT-XL/2 runs use the ADM Inception and reference batch instead (``hqdit evaluate``).
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..engine.calibration import Calibration, CalibrationError, calibrate
from ..config import CACHE_DIR, SHIPPED_RUNS_DIR, Profile, profile as get_profile
from .digits import embedded_reference
from ..files import atomic_path, sha256_file, state_dict_sha256, write_json_atomic, write_text_atomic
from ..metrics.adm import evaluate
from ..metrics.features import ProxyExtractor
from ..dit.models import DiTBundle
from ..numerics import NUMERICS_VERSION
from ..provenance import cpu_kind, cpu_model, run_versions
from ..engine.qmodel import load_quantized, quantize_, save_quantized
from ..engine.recipes import QuantRecipe, get_recipe
from ..dit.sampling import sample

#: Multiplier separating the per-sample seed ranges of different run seeds.
SEED_STRIDE = 1_000_003


@dataclass
class RunResult:
    """The outcome of one (model, recipe, profile, seed) run.

    metrics:   ``{"FID*": …, "sFID*": …, "IS*": …, "P*": …, "R*": …, "class-consistency": …}``
               (unstarred names when the feature network is the ADM Inception).
    quant:     the quantization summary (mean SQNRs, format histograms, seconds) or ``{}`` for FP32.
    protocol:  how the numbers were made (sampler, steps, cfg, samples, seeds, feature network and its
               checksum, model checksum, versions, device, wall times).
    samples:   path of the ``.npz`` with the generated images (``arr_0`` uint8 NHWC, ``labels``).
    cached:    whether this result was read from the cache.
    shipped:   whether it was made by the build whose runs ship with the book (``data/book-runs``), not
               in this checkout.
    """

    recipe: str
    seed: int
    metrics: dict
    quant: dict
    protocol: dict
    samples: str
    cached: bool = False
    shipped: bool = False

    def row(self) -> dict:
        return {"recipe": self.recipe, "seed": self.seed, **self.metrics}


def model_checksum(bundle) -> str:
    """The model's identity in a run key: :func:`~hqdit_utils.files.state_dict_sha256` of the transformer
    (``bundle.transformer``, or ``bundle`` itself when it is a bare module) — the package's one encoding."""
    return state_dict_sha256(getattr(bundle, "transformer", bundle))


def run_key(material: dict) -> str:
    """A 24-hex-digit key of a JSON-able dict (sorted keys; other values by ``str``)."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]


def recipe_material(recipe: QuantRecipe) -> dict:
    """The recipe's fields that change what it computes (all but ``description``)."""
    return {k: v for k, v in recipe.to_dict().items() if k != "description"}


@contextmanager
def _entry_lock(folder: Path):
    """Exclusive lock on one cache entry (``folder/.lock``, ``fcntl.flock``): concurrent runs of the same entry
    wait for each other instead of writing it twice; the kernel releases it if the holder is killed."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cached_entry(result_file: Path, samples_file: Path, material: dict) -> dict | None:
    """The cached entry if it was made from exactly ``material`` and its samples file is intact, else ``None``
    (missing, unreadable, stale: other code, model, recipe, sizes … — recomputed, never served)."""
    if not (result_file.is_file() and samples_file.is_file()):
        return None
    try:
        cached = json.loads(result_file.read_text())
    except (OSError, ValueError):
        return None
    if cached.get("material") != json.loads(json.dumps(material, default=str)):
        return None
    if cached.get("samples_sha256") != sha256_file(samples_file):
        return None
    cached["result"]["samples"] = str(samples_file)  # where it is now (an adopted entry was made elsewhere)
    cached["result"]["shipped"] = bool(cached.get("shipped", False))
    # strict JSON stores a non-finite number as null; a metric or SQNR read back is a float again (NaN)
    for part in ("metrics", "quant"):
        values = cached["result"].get(part)
        if isinstance(values, dict):
            cached["result"][part] = {k: float("nan") if v is None else v for k, v in values.items()}
    return cached


def _adopt_shipped(shipped: Path, result_file: Path, samples_file: Path, material: dict) -> dict | None:
    """Copy the shipped entry in folder ``shipped`` into the cache (samples first, each atomically) if it
    was made from exactly ``material`` and its samples are intact; the cached entry, else ``None``."""
    entry = _cached_entry(shipped / "result.json", shipped / "samples.npz", material)
    if entry is None:
        return None
    with atomic_path(samples_file) as tmp:
        shutil.copyfile(shipped / "samples.npz", tmp)
    stored = json.loads((shipped / "result.json").read_text())
    write_json_atomic(result_file, {**stored, "shipped": True})
    return _cached_entry(result_file, samples_file, material)


def sample_plan(num_classes: int, n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Labels ``[n]`` and per-sample seeds of run ``seed`` (shared by every recipe)."""
    labels = torch.arange(n) % num_classes
    return labels, [SEED_STRIDE * (seed + 1) + i for i in range(n)]


_CALIBRATIONS: dict = {}


def calibration_for(bundle, recipe: QuantRecipe, prof: Profile, seed: int, cfg_scale: float, mkey: str) -> Calibration:
    """The calibration a run of ``recipe`` uses: its layers, the profile's sizes, ``seed`` and ``cfg_scale``;
    memoised per (model checksum ``mkey``, layers, profile, seed, cfg) in this process."""
    attention = recipe.quantize_attention and recipe.attn_format != "fp32"
    key = (mkey, tuple(recipe.layers), tuple(recipe.exclude), attention, prof.name, seed, cfg_scale)
    if key not in _CALIBRATIONS:
        _CALIBRATIONS.clear()  # one at a time: a calibration holds tens of MB of rows
        _CALIBRATIONS[key] = calibrate(bundle, layers=recipe.layers, exclude=recipe.exclude,
                                       num_trajectories=prof.calib_trajectories, num_timesteps=prof.calib_timesteps,
                                       num_steps=prof.sampling_steps, batch_size=prof.batch_size, seed=seed,
                                       cfg_scale=cfg_scale, attention=attention)
    return _CALIBRATIONS[key]


@dataclass(frozen=True)
class CalibrationSpec:
    """How a run calibrates: the profile's sizes (trajectories, timesteps, sampling steps, batch), the seed of
    the calibration trajectories and their CFG scale. :func:`quantized_copy` turns it into the
    :class:`~hqdit_utils.engine.calibration.Calibration` the recipe needs (:func:`calibration_for`)."""

    profile: Profile
    seed: int = 0
    cfg_scale: float = 1.5

    def record(self) -> dict:
        """The ``calibration`` entry of a run's protocol: ``{"trajectories", "timesteps", "seed"}``."""
        return {"trajectories": self.profile.calib_trajectories, "timesteps": self.profile.calib_timesteps,
                "seed": self.seed}

    def store_key(self, bundle, recipe: QuantRecipe, mkey: str | None = None) -> str:
        """The key of a quantized model made with this calibration (:func:`qmodel_store`): model, recipe,
        profile sizes, seed, CFG scale and :data:`~hqdit_utils.numerics.NUMERICS_VERSION`."""
        return run_key({"model": mkey or model_checksum(bundle), "recipe": recipe_material(recipe),
                        "profile": self.profile.as_dict(), "seed": self.seed, "cfg_scale": self.cfg_scale,
                        "numerics": NUMERICS_VERSION})


def qmodel_store(bundle, recipe: "QuantRecipe | str", calibration: CalibrationSpec, *,
                 cache_dir: "str | os.PathLike | None" = None, mkey: str | None = None) -> Path:
    """The one cache of quantized models: ``<cache_dir or CACHE_DIR/"qmodels">/<recipe>-s<seed>-<key>``
    (key: :meth:`CalibrationSpec.store_key`), a ``save_quantized`` folder; pass it as ``store`` to
    :func:`quantized_copy`."""
    recipe = get_recipe(recipe)
    key = calibration.store_key(bundle, recipe, mkey)
    return Path(cache_dir or CACHE_DIR / "qmodels") / f"{recipe.name}-s{calibration.seed}-{key}"


def restorable(recipe: QuantRecipe) -> bool:
    """Whether ``load_quantized`` rebuilds all of ``recipe`` (not: quantized attention matmuls, per-timestep-group
    activation ranges), so that a stored quantized state may stand in for quantizing again."""
    return not recipe.quantize_attention and recipe.timestep_groups == 1


def quantized_copy(model, recipe: "QuantRecipe | str", *,
                   calibration: "CalibrationSpec | Calibration | None" = None,
                   store: "str | os.PathLike | None" = None, mkey: str | None = None, in_place: bool = False,
                   quantize_identity: bool = False) -> tuple:
    """The one way a run makes its quantized model: copy, calibrate, ``quantize_`` (or load a stored state).

    Args:
        model: a ``DiTBundle`` (its transformer is copied; a :class:`CalibrationSpec` needs a bundle, since
            calibration samples) or a bare transformer (then ``calibration`` is a ``Calibration`` or ``None``).
        recipe: a :class:`QuantRecipe` or a registered name.
        calibration: a :class:`CalibrationSpec` (the calibration of :func:`calibration_for`, memoised per
            process, made only when the recipe needs one), a ready ``Calibration``, or ``None``.
        store: a folder for the quantized state (e.g. :func:`qmodel_store`): loaded when it holds one and the
            recipe is :func:`restorable`, else written after quantizing. ``None``: nothing stored.
        mkey: :func:`model_checksum` of ``model`` when the caller has it (saves hashing the weights again).
        in_place: quantize ``model`` itself instead of a copy (a command that loaded the model for this only).
        quantize_identity: run ``quantize_`` for an identity recipe too (``fp32``: every layer exact); by
            default an identity recipe gives the unquantized copy, as a run's FP32 row uses.

    Returns:
        ``(quantized model, QuantReport or None, seconds)``: the report is ``None`` for an identity recipe
        (unless ``quantize_identity``) and for a state loaded from ``store``; ``seconds`` is the wall time of
        calibration made here, ``quantize_`` and loading or saving — the copy is not counted.
    """
    recipe = get_recipe(recipe)
    is_bundle = isinstance(model, DiTBundle)
    transformer = model.transformer if is_bundle else model
    if not in_place:
        transformer = copy.deepcopy(transformer)
    out = (replace(model, transformer=transformer) if is_bundle else transformer) if not in_place else model
    t0 = time.perf_counter()
    if recipe.is_identity and not quantize_identity:
        return out, None, time.perf_counter() - t0
    if store is not None and restorable(recipe) and (Path(store) / "quant_config.json").is_file():
        load_quantized(transformer, store)
        return out, None, time.perf_counter() - t0
    if recipe.rotation and recipe.rotation_seed is None:  # the rotation's signs tied to the run's seed
        if not isinstance(calibration, CalibrationSpec):
            raise ValueError(f"recipe {recipe.name!r} ties its rotation seed to the run's seed (rotation_seed=None): "
                             "pass a CalibrationSpec (its seed is the run's), or set rotation_seed to an integer")
        recipe = replace(recipe, rotation_seed=calibration.seed)
    calib = calibration
    if isinstance(calibration, CalibrationSpec):
        if not is_bundle:
            raise ValueError("quantized_copy: a CalibrationSpec needs a DiTBundle to sample from (pass the bundle, "
                             "or a Calibration made with calibrate(bundle, ...))")
        calib = (calibration_for(model, recipe, calibration.profile, calibration.seed, calibration.cfg_scale,
                                 mkey or model_checksum(model)) if recipe.needs_calibration else None)
    report = quantize_(transformer, recipe, calib)
    if store is not None:
        save_quantized(transformer, store, report)
    return out, report, time.perf_counter() - t0


def run_protocol(bundle, *, sampler: str, steps: int, cfg_scale: float, samples: int, seeds: str,
                 calibration: CalibrationSpec | None, model: str, mkey: str, extractor: str, extractor_sha256,
                 reference: str, n_reference: int, profile: str, seconds: dict, **extra) -> dict:
    """The one protocol record of a run (``RunResult.protocol``, ``hqdit reproduce``'s ``result.json``):

    ``sampler``, ``steps``, ``cfg_scale``, ``samples``, ``labels`` (``i mod num_classes``), ``seeds`` (the rule,
    a string), ``calibration`` (:meth:`CalibrationSpec.record`, ``None`` for an unquantized run), ``model`` and
    ``model_sha256``, ``extractor`` and ``extractor_sha256``, ``reference`` and ``n_reference``, ``profile``,
    ``versions``, ``device``, ``threads``, ``machine`` (CPU model, PyTorch CPU capability and
    :func:`~hqdit_utils.provenance.cpu_kind`: quantized samples can differ between CPU kinds), ``seconds`` (wall
    times, s), then ``extra`` (e.g. ``world_size``).
    """
    return {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "samples": samples,
            "labels": f"i mod {bundle.num_classes}", "seeds": seeds,
            "calibration": None if calibration is None else calibration.record(),
            "model": model, "model_sha256": mkey, "extractor": extractor, "extractor_sha256": extractor_sha256,
            "reference": reference, "n_reference": n_reference, "profile": profile, "versions": run_versions(),
            "device": str(next(bundle.transformer.parameters()).device), "threads": torch.get_num_threads(),
            "machine": {"cpu": cpu_model(), "torch cpu capability": torch.backends.cpu.get_cpu_capability(),
                        "kind": cpu_kind()},
            "seconds": seconds, **extra}


def calibration_key(bundle, *, profile: str | None = None, seed: int = 0, **kwargs) -> str:
    """A hex key naming one calibration run: the model's weights (:func:`model_checksum`), the profile's sizes,
    ``seed``, extra ``calibrate`` arguments and :data:`~hqdit_utils.numerics.NUMERICS_VERSION`."""
    prof = get_profile(profile).as_dict()
    meta = {"model": model_checksum(bundle), "profile": prof, "seed": seed,
            "kwargs": {k: repr(v) for k, v in sorted(kwargs.items())}, "numerics": NUMERICS_VERSION}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]


def cached_calibrate(bundle, *, profile: str | None = None, seed: int = 0, cache_dir=None, **kwargs) -> Calibration:
    """:func:`~hqdit_utils.engine.calibration.calibrate` once per (weights, profile, seed, arguments, recording
    code), kept in ``<cache_dir or CACHE_DIR>/calibration/<key>.pt`` so that several chapters share one run.

    The calibration is deterministic (the reservoir keeps rows by a content hash), so a cached result is
    the one a fresh run would give. The file is written atomically, then its sha256 to ``<key>.sha256``;
    a file without a matching checksum (killed before the checksum was written, damaged later) or that
    cannot be read is recomputed, never used.
    """
    folder = Path(cache_dir or CACHE_DIR) / "calibration"
    path = folder / f"{calibration_key(bundle, profile=profile, seed=seed, **kwargs)}.pt"
    digest_file = path.with_suffix(".sha256")
    if path.is_file():
        if digest_file.is_file() and digest_file.read_text().strip() == sha256_file(path):
            try:
                return Calibration.load(path)
            except CalibrationError as err:
                print(f"[cached_calibrate] {err}; recomputing", file=sys.stderr)
        else:
            print(f"[cached_calibrate] {path} has no matching checksum in {digest_file.name}; recomputing",
                  file=sys.stderr)
    calib = calibrate(bundle, profile=profile, seed=seed, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    calib.save(path)
    write_text_atomic(digest_file, sha256_file(path) + "\n")
    return calib


def run(bundle, recipe: "QuantRecipe | str", *, profile: "str | Profile | None" = None, seed: int = 0,
        cfg_scale: float = 1.5, sampler: str = "ddpm", num_samples: int | None = None,
        cache_dir: "str | os.PathLike | None" = None, extractor=None, reference=None,
        progress: bool = True, shipped_dir: "str | os.PathLike | None" = SHIPPED_RUNS_DIR) -> RunResult:
    """Calibrate, quantize a copy of ``bundle.transformer`` with ``recipe``, sample, evaluate; cached.

    Args:
        bundle: a ``models.DiTBundle`` (left unchanged: the recipe is applied to a deep copy).
        recipe: a :class:`QuantRecipe` or a registered name (``"fp32"``, ``"hqdit-w4a4"`` …).
        profile: sizes (samples, steps, calibration); default ``$HQDIT_PROFILE``.
        seed: run seed (calibration trajectories and evaluation noise).
        cfg_scale, sampler: sampling settings.
        num_samples: override the profile's ``eval_samples``.
        cache_dir: default ``config.CACHE_DIR / "runs"``.
        shipped_dir: finished runs to adopt when their key material matches (default: the book's,
            ``config.SHIPPED_RUNS_DIR``); ``None``: compute whatever the cache lacks.
        extractor, reference: feature network and reference images; default: the embedded proxy network
            and the embedded data's held-out split.

    Returns:
        :class:`RunResult`.
    """
    recipe = get_recipe(recipe)
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    n = int(num_samples or prof.eval_samples)
    extractor = extractor or ProxyExtractor()
    mkey = model_checksum(bundle)
    material = {"model": mkey, "recipe": recipe_material(recipe), "profile": prof.as_dict(), "seed": seed,
                "cfg_scale": cfg_scale, "sampler": sampler, "num_samples": n,
                "numerics": NUMERICS_VERSION,
                "extractor": [extractor.name, extractor.weights_checksum],
                "reference": "embedded-heldout" if reference is None else "custom"}
    key = run_key(material)
    folder = Path(cache_dir or CACHE_DIR / "runs") / f"{recipe.name}-s{seed}-{key}"
    result_file, samples_file = folder / "result.json", folder / "samples.npz"
    cached = _cached_entry(result_file, samples_file, material)
    if cached is not None:
        return RunResult(**cached["result"], cached=True)
    with _entry_lock(folder):
        cached = _cached_entry(result_file, samples_file, material)  # another process may have just made it
        if cached is None and shipped_dir is not None:
            cached = _adopt_shipped(Path(shipped_dir) / folder.name, result_file, samples_file, material)
        if cached is not None:
            return RunResult(**cached["result"], cached=True)
        return _compute(bundle, recipe, prof, seed=seed, cfg_scale=cfg_scale, sampler=sampler, n=n, mkey=mkey,
                        material=material, extractor=extractor, reference=reference, progress=progress,
                        result_file=result_file, samples_file=samples_file)


def _compute(bundle, recipe: QuantRecipe, prof: Profile, *, seed: int, cfg_scale: float, sampler: str, n: int,
             mkey: str, material: dict, extractor, reference, progress: bool, result_file: Path,
             samples_file: Path) -> RunResult:
    """The uncached part of :func:`run`; writes ``samples_file`` then ``result_file`` (each atomically)."""
    t0 = time.perf_counter()
    spec = CalibrationSpec(prof, seed, cfg_scale)
    qbundle, report, _ = quantized_copy(bundle, recipe, calibration=spec, mkey=mkey)
    quant: dict = {} if report is None else report.summary()
    t_quant = time.perf_counter() - t0
    labels, seeds = sample_plan(bundle.num_classes, n, seed)
    t1 = time.perf_counter()
    images = sample(qbundle, labels, num_steps=prof.sampling_steps, cfg_scale=cfg_scale, seeds=seeds,
                    sampler=sampler, batch_size=prof.batch_size, progress=progress)
    t_sample = time.perf_counter() - t1
    images_np = images.numpy()
    ref = embedded_reference("heldout") if reference is None else reference
    report_m = evaluate(images_np, ref, extractor)
    metrics = {name: float(getattr(report_m, f)) for f, name in report_m.metric_names().items()}
    logits = extractor(images_np).get("logits")
    if logits is not None:
        pred = torch.as_tensor(np.asarray(logits)).argmax(dim=1)
        metrics["class-consistency"] = float((pred == labels).float().mean())
    protocol = run_protocol(bundle, sampler=sampler, steps=prof.sampling_steps, cfg_scale=cfg_scale, samples=n,
                            seeds=f"{SEED_STRIDE}*(seed+1)+i", calibration=spec if quant else None,
                            model=bundle.name, mkey=mkey, extractor=extractor.name,
                            extractor_sha256=extractor.weights_checksum, reference=material["reference"],
                            n_reference=report_m.n_reference, profile=prof.name,
                            seconds={"quantize": round(t_quant, 2), "sample": round(t_sample, 2),
                                     "total": round(time.perf_counter() - t0, 2)})
    with atomic_path(samples_file) as tmp:
        np.savez(tmp, arr_0=images_np, labels=labels.numpy())
    result = RunResult(recipe.name, seed, metrics, quant, protocol, str(samples_file))
    entry = {"material": material, "samples_sha256": sha256_file(samples_file),
             "result": {k: v for k, v in asdict(result).items() if k != "cached"}}
    write_json_atomic(result_file, entry)
    return result


def run_table(bundle, recipes: Sequence["QuantRecipe | str"], *, seeds: Sequence[int] | None = None,
              profile: "str | Profile | None" = None, progress: bool = True, **kwargs) -> pd.DataFrame:
    """:func:`run` for every (recipe, seed), one progress bar; one row per run (``recipe``, ``seed``, metrics).

    ``seeds`` defaults to ``range(profile.seeds)``. Finished runs are cached, so an interrupted table
    resumes where it stopped.
    """
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    seeds = list(range(prof.seeds)) if seeds is None else list(seeds)
    jobs = [(r, s) for r in recipes for s in seeds]
    rows = []
    for r, s in tqdm(jobs, desc="runs", disable=not progress):
        res = run(bundle, r, profile=prof, seed=s, progress=False, **kwargs)
        rows.append({**res.row(), **{f"quant: {k}": v for k, v in res.quant.items()
                                     if k in ("weight_sqnr", "act_sqnr", "output_sqnr")},
                     "seconds": res.protocol["seconds"]["total"], "cached": res.cached, "shipped": res.shipped})
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean ± std over seeds per recipe: a table of strings ``"mean ± std"`` in the recipes' order."""
    metrics = list(metrics or [c for c in table.columns if c.endswith("*") or c == "class-consistency"])
    order = list(dict.fromkeys(table["recipe"]))
    g = table.groupby("recipe", sort=False)[metrics]
    mean, std, count = g.mean().loc[order], g.std(ddof=1).loc[order], g.count().loc[order]
    out = mean.copy().astype(object)
    for c in metrics:
        out[c] = [f"{m:.3f} ± {s:.3f}" if cnt > 1 else f"{m:.3f}" for m, s, cnt in zip(mean[c], std[c], count[c])]
    out["seeds"] = count[metrics[0]].values
    return out
