"""``hqdit sample``: class-conditional samples to an ADM ``.npz`` — the command line of
:func:`~hqdit_utils.dit.sampling.write_samples` (resumable, ``torchrun``-aware).

::

    hqdit sample --out samples.npz --n 256                      # the embedded model (or $HQDIT_DIT_WEIGHTS)
    hqdit sample --quantized q/ --out q_samples.npz --n 256     # the folder written by hqdit quantize --out q/
    hqdit sample --quantized q/ --out q_samples.npz --compile   # the same under torch.compile (faster on a CPU)

``--quantized DIR`` loads the model that ``DIR/run.json`` records (``--model`` overrides it) and the
quantized state of ``DIR`` into it, packed 4-bit weights included.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from .cli_common import CliError, load_model, require_device
from ..files import strict_json
from .quantize_cli import load_quantized_folder, unrestored_parts
from ..dit.sampling import SAMPLERS, write_samples


def _check(args: argparse.Namespace) -> None:
    """:class:`CliError` for flag values ``write_samples`` would refuse."""
    if not str(args.out).endswith(".npz"):
        raise CliError(f"--out {args.out} must end in .npz (e.g. --out samples.npz)")
    for flag, value in (("--n", args.n), ("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--shard-size", args.shard_size or 1)):
        if value < 1:
            raise CliError(f"{flag} must be a positive integer, got {value} (pass {flag} 1 or more)")


def _cmd(args: argparse.Namespace) -> int:
    _check(args)
    require_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank = int(os.environ.get("RANK", "0"))
    if args.quantized is not None:
        bundle, tag = load_quantized_folder(args.quantized, args.model, device=args.device)
        missing = unrestored_parts(args.quantized)
        if missing and rank == 0:
            print(f"[hqdit sample] warning: the reloaded model lacks the recipe's {' and '.join(missing)} "
                  "(load_quantized does not rebuild them); the samples are of the linear layers' quantization "
                  "only", file=sys.stderr, flush=True)
    else:
        (bundle, _), tag = load_model(args.model, "--model", vae=args.vae, device=args.device), ""
    train_steps = int(bundle.scheduler.config.num_train_timesteps)
    if args.steps > train_steps:
        raise CliError(f"--steps {args.steps} exceeds the {train_steps} timesteps the model was trained with (pass "
                       f"--steps {train_steps} or fewer)")
    if rank == 0 and bundle.vae is None and bundle.image_channels not in (1, 3):
        print(f"[hqdit sample] warning: {bundle.name} has no vae/, so its {bundle.image_channels}-channel latents are "
              f"written as the images of {args.out} (image metrics need decoded images: pass --vae DIR, or add vae/ "
              "to the model folder)", file=sys.stderr, flush=True)
    if args.compile:  # its samples differ from eager ones by float rounding: a tag of their own, so never mixed
        bundle = dataclasses.replace(bundle, transformer=torch.compile(bundle.transformer, dynamic=False))
        tag = f"{tag} compiled".strip()
    if rank == 0:
        print(f"[hqdit sample] {bundle.name}{' ' + tag if tag else ''}: {args.n} samples, {args.sampler}-{args.steps}, "
              f"cfg {args.cfg}, batch {args.batch_size} -> {args.out}", file=sys.stderr, flush=True)
    t0 = time.time()
    path = write_samples(bundle, args.out, args.n, num_steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler,
                         seed_offset=args.seed_offset, batch_size=args.batch_size, shard_size=args.shard_size,
                         progress=not args.no_progress, keep_shards=args.keep_shards, eta=args.eta, tag=tag)
    dt = time.time() - t0
    if path is not None:
        meta = json.loads(path.with_name(path.name[:-4] + ".json").read_text())
        s = meta.get("last_invocation_sampling_s") or dt
        print(strict_json({"out": str(path), "n": args.n, "seconds": round(dt, 2),
                            "images_per_s_this_invocation": round(args.n / s, 3) if s else None}, indent=None), flush=True)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``hqdit sample``."""
    p = subparsers.add_parser("sample", help="write class-conditional samples to an ADM .npz (resumable, torchrun-aware)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="'embedded' (default, or $HQDIT_DIT_WEIGHTS), a diffusers folder, or an original .pt")
    p.add_argument("--quantized", default=None, metavar="DIR",
                   help="a folder written by hqdit quantize: sample its quantized model")
    p.add_argument("--vae", default=None, help="sd-vae-ft-ema folder for an original .pt (default $HQDIT_VAE)")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--n", type=int, default=256, help="number of samples")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=1.5, help="guidance scale (1 = none)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed-offset", type=int, default=0, help="sample i uses seed offset+i")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=None, help="samples per shard (default: batch size)")
    p.add_argument("--keep-shards", action="store_true")
    p.add_argument("--device", default="cpu", help="torch device: cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="run the transformer under torch.compile (fuses the integer path's activation passes; the "
                        "first batch compiles; samples close to, not identical with, eager ones)")
    p.set_defaults(func=_cmd)
    return p
