"""Class-conditional sampling with classifier-free guidance (CFG), as DiT does it.

* :func:`sample` — a ``uint8`` tensor of images ``[N, H, W, C]`` from any :class:`~hqdit_utils.dit.models.DiTBundle`.
* :func:`sample_grid` — one row per class, for figures.
* :func:`write_samples` — the ADM evaluation ``.npz`` (``arr_0`` NHWC uint8, ``arr_1`` labels): written
  in shards (atomically: temporary file, then rename), a restarted run skips finished shards, and under
  ``torchrun --nproc-per-node N`` each rank writes its own shards (gloo on CPU, nccl on GPU).
* ``hqdit sample`` — the command line of :func:`write_samples` (in :mod:`.sample_cli`).

The guided loop (own code; diffusers' ``DiTPipeline`` hard-codes 1000 classes)
-------------------------------------------------------------------------------
For a batch of ``B`` latents ``x_t`` the transformer is called once on ``2B`` inputs
``[x_t, x_t]`` with labels ``[y, null]`` (``null = bundle.null_class``), then

* the output ``[2B, 2C, s, s]`` is split along channels into ε (first ``C``) and the learned-variance
  channels (last ``C``); **the variance half is discarded**, exactly as diffusers' ``DiTPipeline``
  does, and the scheduler uses its fixed posterior variance (``variance_type="fixed_small"``). The
  original DiT code uses the learned variance; with 50+ DDPM steps the difference is small but this
  is a documented deviation (the same one every diffusers-based DiT evaluation has);
* guidance on the ε channels: ``ε = ε_null + s · (ε_y − ε_null)`` (``s = cfg_scale``; ``s = 1`` skips
  the null half entirely). The original DiT script guides only the first 3 of DiT-XL/2's 4 latent
  channels; pass ``guidance_channels=3`` for that behaviour (default: all, as diffusers).
* ``scheduler.step(ε, t, x_t, generator=[g_1 … g_B])`` gives ``x_{t-1}``.

Samplers: ``"ddpm"`` — ``DDPMScheduler`` respaced to ``num_steps`` with ``timestep_spacing="linspace"``
(= ADM/DiT's ``space_timesteps``: ``round(linspace(0, 999, n))``); ``"ddim"`` — ``DDIMScheduler``
(η = 0 by default) with ``"leading"`` spacing (``0, 1000//n, …``; diffusers' DDIM computes the previous
timestep as ``t − 1000//n``, which only matches that spacing).

Seeds and determinism
---------------------
Sample ``i`` owns ``torch.Generator().manual_seed(seeds[i])``: it draws the initial noise and then every
DDPM step's noise, so image ``i`` depends only on its seed and label — not on the batch it shares, on
how many processes split the work, or on restarts. (Bit-identity across batch sizes additionally
needs the transformer to be batch-invariant; on CPU the tests check that it is for the shipped
configurations.)

Quantized models: sampling only calls ``bundle.transformer(x, timestep=t, class_labels=y).sample``, so
a transformer modified in place (e.g. by ``quantize_``) is sampled as it is. ``transformer_fn=`` replaces
that call altogether (e.g. to record activations) — it receives ``(x, t, y)`` and returns the output
tensor ``[2B, 2C, s, s]``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..errors import SamplingError
from ..files import atomic_path, strict_json, write_text_atomic
from ..images import NpzImages
from .models import as_bundle


SAMPLERS = ("ddpm", "ddim")


def make_scheduler(bundle, sampler: str = "ddpm", num_steps: int = 50):
    """A fresh diffusers scheduler of kind ``sampler`` from ``bundle.scheduler``'s config, set to
    ``num_steps`` timesteps (see the module docstring for the spacing)."""
    from diffusers import DDIMScheduler, DDPMScheduler  # diffusers takes seconds to import; only schedulers need it

    cfg = dict(bundle.scheduler.config)
    if sampler == "ddpm":
        sched = DDPMScheduler.from_config(cfg, timestep_spacing="linspace", variance_type="fixed_small",
                                          clip_sample=False, prediction_type="epsilon")
    elif sampler == "ddim":
        sched = DDIMScheduler.from_config(cfg, timestep_spacing="leading", steps_offset=0, clip_sample=False,
                                          set_alpha_to_one=True, prediction_type="epsilon")
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    sched.set_timesteps(num_steps)
    return sched


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images NCHW in [-1, 1] -> uint8 NHWC: ``clamp(round((x + 1) * 127.5), 0, 255)``."""
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def _as_long(x, n: int | None = None, what: str = "class_labels") -> torch.Tensor:
    t = torch.as_tensor(list(x) if not isinstance(x, (torch.Tensor, np.ndarray)) else x).long().reshape(-1)
    if n is not None and len(t) != n:
        raise ValueError(f"{what} has {len(t)} entries, expected {n}")
    return t


def _to_model(kwargs, device, dtype):
    """``kwargs`` (nested dicts of tensors and other values) with every tensor on ``device`` and every floating
    tensor in ``dtype``."""
    if isinstance(kwargs, dict):
        return {k: _to_model(v, device, dtype) for k, v in kwargs.items()}
    if torch.is_tensor(kwargs):
        return kwargs.to(device=device, dtype=dtype if kwargs.is_floating_point() else kwargs.dtype)
    return kwargs


@torch.no_grad()
def denoise_batch(bundle, labels: torch.Tensor, seeds: Sequence[int], *, num_steps: int, cfg_scale: float,
                  sampler: str = "ddpm", eta: float = 0.0, guidance_channels: int | None = None,
                  transformer_fn: Callable | None = None, step_callback: Callable | None = None) -> torch.Tensor:
    """Run the guided reverse process for one batch; returns final latents ``[B, C, s, s]`` (float32).

    A bundle with ``conditioning`` (PixArt, other transformers: :func:`~hqdit_utils.dit.models.as_bundle`) is called
    with ``conditioning(B, generator seeded with seeds[0])`` instead of class labels (``labels`` then only sets B).

    ``step_callback(i, t)`` is called after each of the ``num_steps`` steps (progress bars).
    """
    model = bundle.transformer
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    C, s = bundle.latent_channels, bundle.latent_size
    B = len(labels)
    gens = [torch.Generator(device="cpu").manual_seed(int(sd)) for sd in seeds]
    sched = make_scheduler(bundle, sampler, num_steps)
    # each sample's initial noise from its own generator (CPU, so identical on every device)
    x = torch.stack([torch.randn((C, s, s), generator=g) for g in gens]).to(device) * sched.init_noise_sigma
    y = labels.to(device)
    guided = cfg_scale != 1.0
    if guided:
        if bundle.null_class is None:
            raise ValueError(f"{bundle.name} has no null class, so classifier-free guidance (cfg_scale={cfg_scale}) is impossible")
        y_in = torch.cat([y, torch.full_like(y, bundle.null_class)])
    else:
        y_in = y
    conditioning = getattr(bundle, "conditioning", None)
    if conditioning is None:
        call = transformer_fn or (lambda xx, tt, yy: model(xx, timestep=tt, class_labels=yy).sample)
    else:  # one draw per batch (from its first seed), held over the trajectory like a prompt
        cond = _to_model(conditioning(B, torch.Generator(device="cpu").manual_seed(int(seeds[0]))),
                         device, dtype)
        call = transformer_fn or (lambda xx, tt, yy: model(xx, timestep=tt, **cond).sample)
    for i, t in enumerate(sched.timesteps):
        x_in = torch.cat([x, x]) if guided else x
        x_in = sched.scale_model_input(x_in, t)
        t_in = torch.full((len(x_in),), int(t), device=device, dtype=torch.long)
        out = call(x_in.to(dtype), t_in, y_in).float()
        eps = out[:, :C]  # learned-variance channels out[:, C:] are discarded (as DiTPipeline)
        if guided:
            e_c, e_u = eps[:B], eps[B:]
            g = e_u + cfg_scale * (e_c - e_u)
            if guidance_channels is not None and guidance_channels < C:
                g = torch.cat([g[:, :guidance_channels], e_c[:, guidance_channels:]], 1)
            eps = g
        kw = {"generator": gens}
        if sampler == "ddim":
            kw["eta"] = eta
            if eta == 0:
                kw.pop("generator")
        x = sched.step(eps, t, x, **kw).prev_sample
        if step_callback is not None:
            step_callback(i, t)
    return x.float()


def sample(bundle, class_labels, *, num_steps: int, cfg_scale: float, seeds: Sequence[int], sampler: str = "ddpm",
           batch_size: int = 64, progress: bool = True, eta: float = 0.0, guidance_channels: int | None = None,
           transformer_fn: Callable | None = None) -> torch.Tensor:
    """Class-conditional samples with classifier-free guidance.

    Args:
        bundle: a :class:`~hqdit_utils.dit.models.DiTBundle` (``load_dit(...)``, ``tiny_dit()``, …) or a bare diffusers
            transformer, wrapped as :func:`~hqdit_utils.engine.calibration.calibrate` wraps it
            (:func:`~hqdit_utils.dit.models.as_bundle`: default DDPM scheduler, the identity decoder).
        class_labels: ``N`` class ids in ``0 .. bundle.num_classes-1`` (list, array or tensor).
        num_steps: denoising steps (the scheduler is respaced from its 1000 training steps).
        cfg_scale: guidance scale ``s`` (1.0 = no guidance; DiT's FID-50k protocol uses 1.5).
        seeds: ``N`` integers; sample ``i`` uses only ``seeds[i]``.
        sampler: ``"ddpm"`` or ``"ddim"``.
        batch_size: images per transformer call (the call sees ``2 × batch_size`` inputs under CFG).
        progress: tqdm bar over denoising steps of all batches.
        eta: DDIM η (0 = deterministic).
        guidance_channels: guide only the first k latent channels (``3`` = original DiT script).
        transformer_fn: optional replacement of the transformer call, ``f(x, t, y) -> [2B, 2C, s, s]``.

    Returns:
        ``uint8`` tensor ``[N, H, W, C_img]`` (CPU), ``H = W = bundle.image_size``.
    """
    if int(num_steps) < 1 or int(batch_size) < 1:
        raise ValueError(f"num_steps and batch_size must be >= 1; got num_steps={num_steps}, batch_size={batch_size}")
    bundle = as_bundle(bundle)
    labels = _as_long(class_labels)
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(labels):
        raise ValueError(f"{len(seeds)} seeds for {len(labels)} labels: give one seed per sample")
    if len(labels) and (labels.min() < 0 or labels.max() >= bundle.num_classes):
        raise ValueError(f"class labels must lie in 0..{bundle.num_classes - 1}; got {labels.min().item()}..{labels.max().item()}")
    n = len(labels)
    bar = tqdm(total=n * num_steps, desc=f"sampling {sampler}-{num_steps} cfg {cfg_scale}", unit="step·img",
               disable=not progress or n == 0, mininterval=1.0)
    out = []
    for i in range(0, n, batch_size):
        lab, sd = labels[i : i + batch_size], seeds[i : i + batch_size]
        lat = denoise_batch(bundle, lab, sd, num_steps=num_steps, cfg_scale=cfg_scale, sampler=sampler, eta=eta,
                            guidance_channels=guidance_channels, transformer_fn=transformer_fn,
                            step_callback=lambda _i, _t, k=len(lab): bar.update(k))
        with torch.no_grad():
            out.append(to_uint8(bundle.decoder(lat)))
    bar.close()
    if not out:
        return torch.zeros((0, bundle.image_size, bundle.image_size, bundle.image_channels), dtype=torch.uint8)
    return torch.cat(out)


def sample_grid(bundle, classes: Sequence[int] | None = None, per_class: int = 8, *, num_steps: int = 50,
                cfg_scale: float = 1.5, seed: int = 0, sampler: str = "ddpm", batch_size: int = 64,
                progress: bool = False, pad: int = 1) -> np.ndarray:
    """A grid of samples, one row per class (``per_class`` columns), for figures.

    Sample ``(row r, column j)`` has seed ``seed + r * per_class + j``.

    Returns:
        ``uint8`` array ``[rows·(H+pad)+pad, per_class·(W+pad)+pad, C_img]`` (white separators).
    """
    classes = list(range(bundle.num_classes)) if classes is None else [int(c) for c in classes]
    labels = [c for c in classes for _ in range(per_class)]
    seeds = [seed + k for k in range(len(labels))]
    imgs = sample(bundle, labels, num_steps=num_steps, cfg_scale=cfg_scale, seeds=seeds, sampler=sampler,
                  batch_size=batch_size, progress=progress).numpy()
    return tile(imgs, len(classes), per_class, pad=pad)


def tile(images: np.ndarray, rows: int, cols: int, pad: int = 1, value: int = 255) -> np.ndarray:
    """Arrange ``rows·cols`` uint8 NHWC images into one ``[H', W', C]`` image with ``pad``-pixel gaps."""
    n, h, w, c = images.shape
    if n != rows * cols:
        raise ValueError(f"{n} images do not fill a {rows}x{cols} grid")
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), value, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[k]
    return grid


# --------------------------------------------------------------------------------------------------
# sharded, resumable, distributed sample writing
# --------------------------------------------------------------------------------------------------
def dist_setup():
    """``(rank, world_size, initialised_here)``; initialises torch.distributed from torchrun's env."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("HQDIT_DIST_BACKEND", "") != "gloo" else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size(), True


def barrier() -> None:
    """Wait for every rank (no-op outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _atomic_savez(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def _shard_digest(images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> np.ndarray:
    """sha256 (uint8 ``[32]``) over a shard's images (uint8 NHWC), labels and sample indices (int64)."""
    h = hashlib.sha256()
    for a in (images, labels.astype(np.int64), index.astype(np.int64)):
        h.update(np.ascontiguousarray(a).tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def _load_shard(path: Path, lo: int, hi: int, labels: torch.Tensor, image_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[hi-lo, H, W, C]`` uint8 and labels ``[hi-lo]`` of one shard, after checking that it is the
    complete shard of samples ``lo … hi-1`` with the expected labels and an intact checksum.

    Raises:
        ValueError: the file is unreadable, incomplete, of another shape/dtype, or its checksum differs.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("arr_0", "arr_1", "index", "sha256")}
    except Exception as err:  # zipfile / npy header / missing key: all mean "not a complete shard"
        raise ValueError(f"{path} is unreadable ({type(err).__name__}: {err})") from err
    imgs, labs, index = arrays["arr_0"], arrays["arr_1"], arrays["index"]
    if imgs.dtype != np.uint8 or imgs.shape != (hi - lo, *image_shape):
        raise ValueError(f"{path} holds {imgs.dtype} {imgs.shape}, expected uint8 {(hi - lo, *image_shape)}")
    if not np.array_equal(index, np.arange(lo, hi)) or not np.array_equal(labs, labels[lo:hi].numpy()):
        raise ValueError(f"{path} holds other samples than {lo}..{hi - 1} or other labels")
    if not np.array_equal(arrays["sha256"], _shard_digest(imgs, labs, index)):
        raise ValueError(f"{path} fails its sha256 check (damaged after it was written)")
    return imgs, labs


def _output_intact(out_npz: Path, meta: dict) -> bool:
    """Whether ``out_npz`` holds exactly the images whose sha256 ``meta`` records (streamed, no full copy)."""
    try:
        h = hashlib.sha256()
        for batch in NpzImages(out_npz).iter_batches(1024):
            h.update(batch.tobytes())
    except (OSError, ValueError, TypeError, KeyError):
        return False
    return h.hexdigest() == meta.get("sha256")


def write_samples(bundle, out_npz: str | Path, n: int, *, num_steps: int = 50, cfg_scale: float = 1.5,
                  sampler: str = "ddpm", class_labels: Sequence[int] | None = None, seed_offset: int = 0,
                  batch_size: int = 64, shard_size: int | None = None, progress: bool = True,
                  keep_shards: bool = False, eta: float = 0.0, tag: str = "") -> Path | None:
    """Write ``n`` samples to an ADM-style ``.npz`` (``arr_0``: uint8 ``[n, H, W, C]``, ``arr_1``: labels).

    Sample ``i`` has label ``class_labels[i]`` (default ``i mod num_classes``) and seed ``seed_offset + i``.
    Work is cut into shards of ``shard_size`` samples (default ``batch_size``) written to
    ``<out>.shards/shard_XXXXX.npz`` atomically, each with a sha256 of its content (``sha256``, uint8
    ``[32]``); shard ``k`` belongs to rank ``k mod world_size``. Existing shards that pass their checks
    (readable, right samples, labels, shape and checksum) are skipped, so rerunning after a crash resumes;
    a damaged shard is sampled again. A ``spec.json`` in the shard folder records the protocol; resuming
    with a different protocol is refused. When all shards exist, rank 0 assembles ``out_npz`` (atomically)
    and writes ``<out>.json`` (protocol + sha256 of ``arr_0``) and, unless ``keep_shards``, deletes the
    shards. A finished output is returned as it is only if it still matches that sha256.

    ``tag`` names what was sampled beyond ``bundle.name`` (e.g. the quantization recipe of a transformer
    modified in place); it is part of the protocol, so shards of different models never mix.

    Under ``torchrun`` the process group is initialised here (gloo on CPU, nccl on GPU).

    Returns:
        the path of the ``.npz`` on rank 0, ``None`` on other ranks.
    """
    out_npz = Path(out_npz)
    if out_npz.suffix != ".npz":
        raise ValueError(f"output must end in .npz: {out_npz}")
    for what, v in (("n", n), ("num_steps", num_steps), ("batch_size", batch_size), ("shard_size", shard_size or 1)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"write_samples: {what} must be a positive integer, got {v!r}")
    rank, world, init_here = dist_setup()
    try:
        return _write_samples(bundle, out_npz, n, rank, world, num_steps=num_steps, cfg_scale=cfg_scale,
                              sampler=sampler, class_labels=class_labels, seed_offset=seed_offset,
                              batch_size=batch_size, shard_size=shard_size, progress=progress,
                              keep_shards=keep_shards, eta=eta, tag=tag)
    finally:
        if init_here:
                    dist.destroy_process_group()


def _write_samples(bundle, out_npz: Path, n: int, rank: int, world: int, *, num_steps, cfg_scale, sampler,
                   class_labels, seed_offset, batch_size, shard_size, progress, keep_shards, eta, tag):
    labels = _as_long(class_labels, n) if class_labels is not None else torch.arange(n) % bundle.num_classes
    shard_size = int(shard_size or batch_size)
    nshards = (n + shard_size - 1) // shard_size
    spec = {
        "n": n, "num_steps": num_steps, "cfg_scale": cfg_scale, "sampler": sampler, "eta": eta,
        "seed_offset": seed_offset, "shard_size": shard_size, "model": bundle.name, "tag": tag,
        "labels_sha256": hashlib.sha256(labels.numpy().astype(np.int64).tobytes()).hexdigest(),
        "image_size": bundle.image_size, "image_channels": bundle.image_channels,
    }
    shard_dir = out_npz.with_name(out_npz.name + ".shards")
    meta_file = out_npz.with_name(out_npz.name[:-4] + ".json")
    if out_npz.is_file() and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except ValueError:  # not written by this function (it writes atomically): make the output again
            meta = {}
        if meta.get("spec") == spec:
            if _output_intact(out_npz, meta):  # finished earlier with the same protocol
                if rank == 0 and shard_dir.is_dir() and not keep_shards:  # killed while deleting the shards
                    for p in shard_dir.iterdir():
                        p.unlink()
                    shard_dir.rmdir()
                return out_npz if rank == 0 else None
            print(f"[write_samples] {out_npz} does not match the sha256 in {meta_file.name} (damaged); "
                  "making it again", file=sys.stderr, flush=True)
    if rank == 0:
        shard_dir.mkdir(parents=True, exist_ok=True)
        spec_file = shard_dir / "spec.json"
        if spec_file.is_file():
            old = json.loads(spec_file.read_text())
            if old != spec:
                raise SamplingError(f"{shard_dir} holds the shards of an unfinished run with other settings {old} "
                                    f"(delete {shard_dir}, rerun with those settings, or choose another output)")
        else:
            write_text_atomic(spec_file, strict_json(spec))
    barrier()
    mine = [k for k in range(nshards) if k % world == rank]
    image_shape = (bundle.image_size, bundle.image_size, bundle.image_channels)
    todo = []
    for k in mine:
        path = shard_dir / f"shard_{k:05d}.npz"
        if path.is_file():
            try:
                _load_shard(path, k * shard_size, min(n, (k + 1) * shard_size), labels, image_shape)
                continue
            except ValueError as err:
                print(f"[write_samples] {err}; sampling shard {k} again", file=sys.stderr, flush=True)
        todo.append(k)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"shards (rank {rank}/{world})",
               disable=not progress, mininterval=1.0)
    t0 = time.time()
    for k in todo:
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        imgs = sample(bundle, labels[lo:hi], num_steps=num_steps, cfg_scale=cfg_scale,
                      seeds=range(seed_offset + lo, seed_offset + hi), sampler=sampler, batch_size=batch_size,
                      progress=False, eta=eta)
        index = np.arange(lo, hi)
        _atomic_savez(shard_dir / f"shard_{k:05d}.npz", arr_0=imgs.numpy(), arr_1=labels[lo:hi].numpy(), index=index,
                      sha256=_shard_digest(imgs.numpy(), labels[lo:hi].numpy(), index))
        bar.update(1)
    bar.close()
    elapsed = time.time() - t0
    barrier()
    if rank != 0:
        return None
    arrs, labs = [], []
    for k in range(nshards):
        try:
            a, lb = _load_shard(shard_dir / f"shard_{k:05d}.npz", k * shard_size, min(n, (k + 1) * shard_size),
                                labels, image_shape)
        except ValueError as err:
            raise SamplingError(f"cannot assemble {out_npz}: {err} (rerun the same command: damaged shards "
                                "are sampled again)") from err
        arrs.append(a)
        labs.append(lb)
    arr = np.concatenate(arrs)
    lab = np.concatenate(labs)
    if arr.shape[0] != n:
        raise RuntimeError(f"assembled {arr.shape[0]} samples, expected {n}")
    out_npz.parent.mkdir(parents=True, exist_ok=True)
    _atomic_savez(out_npz, arr_0=arr, arr_1=lab)
    write_text_atomic(meta_file, strict_json({"spec": spec, "world_size": world,
                                               "sha256": hashlib.sha256(arr.tobytes()).hexdigest(),
                                               "last_invocation_sampling_s": round(elapsed, 2)}, indent=1))
    if not keep_shards:
        for p in shard_dir.iterdir():
            p.unlink()
        shard_dir.rmdir()
    return out_npz
