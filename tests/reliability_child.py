"""The long jobs of tests/test_reliability.py, runnable in this process or as a child process to be killed.

``main([JOB, WORKDIR, PROGRESS_FILE, PAUSE_S])`` (the target of the test's child processes; also
``python reliability_child.py JOB WORKDIR PROGRESS_FILE PAUSE_S``) runs job ``JOB`` on ``WORKDIR`` with a
global forward hook that, after every forward call of a DiT transformer, appends one byte to
``PROGRESS_FILE`` and sleeps ``PAUSE_S`` seconds: the parent counts denoising/training steps from the
file's size and kills the child after a chosen number of them. The hook changes no number.

Each job function takes the work folder and returns nothing; what it writes there is the artefact the
test compares with an uninterrupted run. Everything is single-threaded and tiny (seconds per job).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

#: ``hqdit train-embedded`` flags of the tiny training run (1 block × 72 wide, 14 steps of batch 8; an
#: untrained proxy network: its training is not what is tested here).
TRAIN_ARGS = ["train-embedded", "--steps", "14", "--batch-size", "8", "--width", "72", "--layers", "1",
              "--warmup-steps", "3", "--proxy-epochs", "0", "--skip-consistency", "--checkpoint-every", "0",
              "--threads", "1", "--no-progress"]
TRAIN_STEPS = 14
#: write_samples: 12 samples in shards of 2, 4 DDPM steps → 6 shards × 4 transformer calls.
SAMPLES_KW = dict(num_steps=4, cfg_scale=1.5, batch_size=2, shard_size=2, progress=False)
SAMPLES_N = 12
SAMPLES_CALLS = 24
#: cached_calibrate: 4 trajectories one at a time, 6 steps → 24 transformer calls.
CALIB_KW = dict(num_trajectories=4, num_timesteps=3, num_steps=6, rows_per_timestep=16, batch_size=1, seed=0)
CALIB_CALLS = 24
#: run_table: 2 recipes × 2 seeds; fp32 = 3 sampling calls, int4-rtn = 3 calibration + 3 sampling calls.
TABLE_RECIPES = ["fp32", "int4-rtn"]
TABLE_SEEDS = [0, 1]
TABLE_CALLS = 18


def table_profile():
    from hqdit_utils.config import Profile

    return Profile("reliability", calib_trajectories=2, calib_timesteps=2, eval_samples=8, sampling_steps=3,
                   seeds=2, batch_size=8)


def table_reference() -> np.ndarray:
    """Reference images of the table job: uint8 ``[16, 8, 8, 1]``."""
    return np.random.default_rng(0).integers(0, 256, size=(16, 8, 8, 1), dtype=np.uint8)


def toy_extractor():
    from conftest import _toy_features
    from hqdit_utils.metrics.features import CallableExtractor

    return CallableExtractor(_toy_features, name="toy-features", weights_checksum="toy")


def train(work: Path) -> None:
    """``hqdit train-embedded`` into ``work/out`` with checkpoints in ``work/ck`` (a proxy network already
    in ``work/out/proxy`` is reused, as a restarted command does)."""
    from hqdit_utils.commands import cli

    cli.main(TRAIN_ARGS + ["--out", str(work / "out"), "--checkpoint-dir", str(work / "ck")])


def samples(work: Path) -> None:
    """:func:`write_samples` of a tiny random DiT to ``work/samples.npz``."""
    from hqdit_utils.dit.models import tiny_dit
    from hqdit_utils.dit.sampling import write_samples

    write_samples(tiny_dit(0), work / "samples.npz", SAMPLES_N, **SAMPLES_KW)


def calib_bundle():
    from hqdit_utils.dit.models import tiny_dit

    return tiny_dit(0, width=144, heads=2, num_layers=1)


def calib(work: Path) -> None:
    """:func:`experiments.cached_calibrate` of a tiny random DiT into ``work/calibration/``."""
    from hqdit_utils.runs.experiments import cached_calibrate

    cached_calibrate(calib_bundle(), cache_dir=work, **CALIB_KW)


def table(work: Path):
    """:func:`experiments.run_table` (2 recipes × 2 seeds) with its cache in ``work``; returns the table."""
    from hqdit_utils.runs.experiments import run_table
    from hqdit_utils.dit.models import tiny_dit

    return run_table(tiny_dit(0), TABLE_RECIPES, seeds=TABLE_SEEDS, profile=table_profile(),
                     extractor=toy_extractor(), reference=table_reference(), cache_dir=work, progress=False)


def run_fp32(work: Path) -> dict:
    """One cached :func:`experiments.run` (fp32, the table job's sizes) with its cache in ``work/cache``;
    also writes ``{"cached", "metrics"}`` to ``work/<pid>.json`` so a parent can see what each process did."""
    import json
    import os

    from hqdit_utils.runs.experiments import run
    from hqdit_utils.dit.models import tiny_dit

    res = run(tiny_dit(0), "fp32", profile=table_profile(), extractor=toy_extractor(), reference=table_reference(),
              cache_dir=work / "cache", progress=False)
    out = {"cached": res.cached, "metrics": res.metrics}
    (work / f"{os.getpid()}.json").write_text(json.dumps(out, sort_keys=True))
    return out


def w4a4(work: Path) -> None:
    """The embedded model at W4A4 (the hqdit-w4a4 recipe on the first 2 of its 6 blocks, 20 clipping
    candidates; ``ci`` calibration sizes): writes ``plan.json``, ``samples.npz`` (10 samples, 10 steps),
    ``metrics.json`` (proxy metrics vs the held-out split) and ``weights.sha256`` (quantized state)."""
    import hashlib
    import json

    from hqdit_utils.engine.calibration import calibrate
    from hqdit_utils.runs.digits import embedded_reference
    from hqdit_utils.metrics.adm import evaluate
    from hqdit_utils.metrics.features import ProxyExtractor
    from hqdit_utils.dit.models import load_dit
    from hqdit_utils.engine.qmodel import quantize_
    from hqdit_utils.engine.recipes import get_recipe
    from hqdit_utils.dit.sampling import sample

    bundle = load_dit("embedded")
    layers = tuple(f"re:transformer_blocks\\.[01]\\.{leaf}" for leaf in
                   ("attn1\\.to_q", "attn1\\.to_k", "attn1\\.to_v", "attn1\\.to_out\\.0", "ff\\.net\\.0\\.proj", "ff\\.net\\.2"))
    recipe = get_recipe("hqdit-w4a4").replace(layers=layers, clip_grid=(20, 0.3, 1.0))
    calib_ = calibrate(bundle, layers=recipe.layers, profile="ci", seed=0, rows_per_timestep=64)
    report = quantize_(bundle.transformer, recipe, calib_)
    h = hashlib.sha256()
    for k, v in sorted(bundle.transformer.state_dict().items()):
        h.update(k.encode() + v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    images = sample(bundle, torch.arange(10) % bundle.num_classes, num_steps=10, cfg_scale=1.5, seeds=range(10),
                    batch_size=10, progress=False).numpy()
    rep = evaluate(images, embedded_reference("heldout"), ProxyExtractor())
    work.mkdir(parents=True, exist_ok=True)
    (work / "plan.json").write_text(report.plan.to_json())
    np.savez(work / "samples.npz", arr_0=images)
    (work / "metrics.json").write_text(json.dumps(rep.to_dict(), sort_keys=True))
    (work / "weights.sha256").write_text(h.hexdigest())


JOBS = {"train": train, "samples": samples, "calib": calib, "table": table, "run_fp32": run_fp32, "w4a4": w4a4}


def main(argv: list[str]) -> None:
    job, work, progress, pause = argv[0], Path(argv[1]), Path(argv[2]), float(argv[3])
    from diffusers import DiTTransformer2DModel

    def signal_progress(module, args, output):
        if isinstance(module, DiTTransformer2DModel):
            with open(progress, "ab") as f:
                f.write(b".")
            time.sleep(pause)

    torch.set_num_threads(1)
    torch.nn.modules.module.register_module_forward_hook(signal_progress)
    JOBS[job](work)


if __name__ == "__main__":
    main(sys.argv[1:])
