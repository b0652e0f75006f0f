"""``hqdit reproduce``: the full-scale tables on DiT-XL/2 — plan, then execute resumably.

::

    hqdit reproduce --table sfid --weights DiT-XL-2-256x256.pt --dry-run      # the plan only
    hqdit reproduce --table sfid --weights DiT-XL-2-256x256.pt \\
        --reference VIRTUAL_imagenet256_labeled.npz --inception-weights weights-inception-2015-12-05-6726825d.pth
    torchrun --nproc-per-node 8 -m hqdit_utils.commands.cli reproduce --table sfid --weights ...   # N GPUs

The ``sfid`` table is the W4A4 comparison of chapter 7 at full scale: FP32, HQ-DiT and the baselines.
Every (recipe) is one *run* with its own folder ``<out>/<run-id>/``:

1. **quantize** — calibrate (``full`` profile sizes: our defaults modelled on PTQ4DiT's protocol) and
   quantize a copy of the model; the quantized state is saved to ``quant/`` (rank 0 quantizes, the other
   ranks load it, so every rank samples the same model);
2. **sample** — :func:`~hqdit_utils.dit.sampling.write_samples` into ``samples.npz``: per-sample seeds, shards
   written atomically, a restart skips finished shards, ``torchrun`` splits the shards over ranks;
3. **evaluate** — the ADM Inception (FID, sFID, IS, precision, recall) against the ADM reference batch;
   ``result.json`` (metrics + protocol) is written last, atomically.

Rerunning the same command resumes: finished runs (``result.json``) are skipped, quantized states are
loaded, finished shards are kept. A run folder remembers its protocol (``plan.json``); resuming it with a
different protocol is refused. The book (chapter 7) lists every ``<out>/*/result.json``.

The plan's time estimate comes from a *measured* per-image cost: a few denoising steps of the FP32 model
on one batch, timed on this machine (fake-quantized runs are slower than FP32: simulated quantization
and online rotations add work, so the estimate is a lower bound for them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .cli_common import CliError, load_model, one_line, require_device, weights_source, with_fix
from ..config import DATA_DIR, profile as get_profile
from ..runs.digits import embedded_reference
from ..runs.experiments import CalibrationSpec, model_checksum, quantized_copy, run_protocol
from ..files import sha256_file, write_json_atomic
from ..metrics.adm import evaluate
from ..metrics.features import InceptionExtractor, ProxyExtractor
from ..dit.models import ENV_WEIGHTS, WeightsError
from ..engine.recipes import get_recipe
from ..dit.sampling import SamplingError, barrier, denoise_batch, dist_setup, write_samples

#: The tables ``hqdit reproduce`` knows: name → recipes (FP32 first).
TABLES = {
    "sfid": ["fp32", "hqdit-w4a4", "fp4-minmax", "smoothquant-int", "fpq", "gptq-int", "int4-rtn"],
    "ablation": ["hqdit-w4a4", "hqdit-no-rotation", "hqdit-no-select", "hqdit-no-clip", "hqdit-no-gptq"],
    "bits": ["fp32", "hqdit-w8a8", "hqdit-w4a8", "hqdit-w4a4", "fp4-minmax-w8a8", "fp4-minmax-w4a8", "fp4-minmax"],
}
#: Environment variable of the ADM reference batch.
ENV_REFERENCE = "HQDIT_ADM_REFERENCE"
#: The weights a plan names when none are given (a dry run prints the full-scale plan without them).
DEFAULT_WEIGHTS = "DiT-XL-2-256x256.pt"
#: GPU throughput behind the GPU-hour estimate — OUR ASSUMPTIONS, printed with it: an NVIDIA A100's dense BF16
#: tensor-core peak (312 TFLOP/s, its data sheet) at 40 % utilisation (our guess for batched DiT inference).
GPU_PEAK_FLOPS, GPU_UTILISATION, GPU_NAME = 312e12, 0.40, "A100 dense BF16 peak"


def dit_forward_flops(num_layers: int = 28, hidden: int = 1152, tokens: int = 256, patch_size: int = 2,
                      in_channels: int = 4, out_channels: int = 8, mlp_ratio: int = 4, freq_dim: int = 256) -> float:
    """FLOPs (2 per multiply-add) of one DiT forward of ONE image; the defaults are DiT-XL/2 at 256 px (28 blocks,
    width 1152, 256 tokens). Per block: the token-wise linears (q, k, v, out: 4·d², MLP: 2·r·d² per token), the
    attention matmuls (Q·Kᵀ and P·V: 2·T²·d) and the adaLN modulation (6·d² per image); plus the patch
    embedding, the timestep/class embedders and the final layer. Softmax, norms and activations are left out
    (under 1 % here). Classifier-free guidance runs two forwards per image and step (counted by the caller)."""
    d, t, r = hidden, tokens, mlp_ratio
    block = t * (4 * d * d + 2 * r * d * d) + 2 * t * t * d + 6 * d * d
    patch = patch_size * patch_size
    rest = t * patch * in_channels * d + freq_dim * d + d * d + 2 * d * d + t * d * patch * out_channels
    return 2.0 * (num_layers * block + rest)


def _config_flops(config) -> float:
    """:func:`dit_forward_flops` of a diffusers ``DiTTransformer2DModel`` config."""
    hidden = int(config.num_attention_heads) * int(config.attention_head_dim)
    tokens = (int(config.sample_size) // int(config.patch_size)) ** 2
    return dit_forward_flops(int(config.num_layers), hidden, tokens, int(config.patch_size), int(config.in_channels),
                             int(config.out_channels or config.in_channels))


@dataclass
class Run:
    """One planned run: a recipe on a model with one protocol, in ``folder``."""

    recipe: str
    run_id: str
    folder: Path
    status: str = "todo"  # todo | quantized | sampling (k/n shards) | sampled | done

    @property
    def result_file(self) -> Path:
        return self.folder / "result.json"


@dataclass
class Plan:
    table: str
    weights: str
    samples: int
    steps: int
    cfg: float
    seed_offset: int
    batch_size: int
    out: Path
    runs: list[Run] = field(default_factory=list)
    image_shape: tuple | None = None  # (H, W, C) when known
    step_seconds: float | None = None  # measured seconds per image per denoising step (guided)
    decode_seconds: float | None = None  # measured seconds per image for decoding latents
    world_size: int = 1
    forward_flops: float | None = None  # FLOPs of one forward of one image (default: DiT-XL/2 at the weights' size)
    gpus: int = 8  # GPUs of the printed torchrun command

    def spec(self, recipe: str) -> dict:
        return {"weights": str(self.weights), "recipe": recipe, "samples": self.samples, "steps": self.steps,
                "cfg_scale": self.cfg, "seed_offset": self.seed_offset, "sampler": "ddpm"}

    # estimates -------------------------------------------------------------------------------------
    def seconds_per_run(self) -> float | None:
        if self.step_seconds is None:
            return None
        calib = get_profile("full").calib_trajectories
        per_image = self.steps * self.step_seconds + (self.decode_seconds or 0.0)
        return (self.samples * per_image + calib * self.steps * self.step_seconds) / max(self.world_size, 1)

    def bytes_per_run(self) -> int | None:
        if self.image_shape is None:
            return None
        h, w, c = self.image_shape
        return int(self.samples * h * w * c)

    def flops_per_run(self) -> float:
        """FLOPs of one run's sampling plus calibration trajectories: images × steps × 2 forwards (CFG) × FLOPs per
        forward (:func:`dit_forward_flops`, DiT-XL/2 at 256 or 512 px unless the model's config gave them)."""
        per_forward = self.forward_flops or dit_forward_flops(tokens=(self._side() // 16) ** 2)
        images = self.samples + get_profile("full").calib_trajectories
        return images * self.steps * (2 if self.cfg != 1.0 else 1) * per_forward

    def _side(self) -> int:
        return 512 if "512" in Path(self.weights).name else 256

    def torchrun_command(self) -> str:
        """The command that runs this plan on :attr:`gpus` GPUs of one machine."""
        recipes = ",".join(r.recipe for r in self.runs)
        default = ",".join(get_recipe(r).name for r in TABLES[self.table])
        return (f"torchrun --nproc-per-node {self.gpus} -m hqdit_utils.commands.cli reproduce --table {self.table} "
                f"--weights {self.weights} --samples {self.samples} --steps {self.steps} --cfg {self.cfg:g} "
                f"--seed-offset {self.seed_offset} --batch-size {self.batch_size} --out {self.out}"
                + ("" if recipes == default else f" --recipes {recipes}")
                + " --reference VIRTUAL_imagenet256_labeled.npz --inception-weights "
                "weights-inception-2015-12-05-6726825d.pth")

    def describe(self) -> str:
        todo = [r for r in self.runs if r.status != "done"]
        lines = [f"hqdit reproduce --table {self.table}: {len(self.runs)} runs ({len(todo)} to do), "
                 f"{self.samples} samples each, DDPM {self.steps} steps, cfg {self.cfg}, seeds "
                 f"{self.seed_offset}+i, world size {self.world_size}",
                 f"  model: {self.weights}", f"  results: {self.out}/<run-id>/result.json"]
        for r in self.runs:
            lines.append(f"  - {r.run_id:<48} {r.status}")
        sec, b = self.seconds_per_run(), self.bytes_per_run()
        if self.step_seconds is not None:
            lines.append(f"  measured cost: {self.step_seconds * 1e3:.2f} ms per image per guided step, "
                         f"{(self.decode_seconds or 0) * 1e3:.2f} ms per image to decode (FP32, this machine)")
            lines.append(f"  estimated sampling time: {sec / 3600:.2f} h per run, {sec * len(todo) / 3600:.2f} h "
                         f"for the runs to do (+ quantization and evaluation; fake-quantized runs are slower)")
        else:
            lines.append("  this machine's cost: not measured (model not loaded)")
        gpu_h = self.flops_per_run() / (GPU_PEAK_FLOPS * GPU_UTILISATION) / 3600
        lines.append(f"  GPU time: {self.flops_per_run() / 1e18:.2f} EFLOP per run (images x steps x 2 forwards for "
                     f"CFG x {(self.forward_flops or dit_forward_flops(tokens=(self._side() // 16) ** 2)) / 1e9:.0f} "
                     f"GFLOP per forward) = {gpu_h:.1f} GPU-hours per run, {gpu_h * len(todo):.1f} for the runs to do, "
                     f"about {gpu_h * len(todo) / self.gpus:.1f} h on {self.gpus} GPUs (our assumption: "
                     f"{GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s {GPU_NAME} x {GPU_UTILISATION:.0%} utilisation; sampling and "
                     "calibration only; fake-quantized runs are slower)")
        lines.append(f"  on {self.gpus} GPUs: {self.torchrun_command()}")
        assumed = ""
        if b is None:  # model not loaded: assume the resolution named in the weights (256 unless 512)
            side = 512 if "512" in Path(self.weights).name else 256
            b, assumed = self.samples * side * side * 3, f" (assuming {side}x{side} RGB images)"
        if b is not None:
            lines.append(f"  disk{assumed}: {b / 1e9:.2f} GB of samples per run ({b * len(self.runs) / 1e9:.2f} GB in all; "
                         f"twice that transiently while shards are assembled) + one quantized state per run "
                         f"(about the FP32 model's size)")
        return "\n".join(lines)


def run_id(weights: str, recipe: str, samples: int, steps: int, cfg: float) -> str:
    stem = Path(str(weights)).name.replace(".pt", "").replace(".pth", "") or "model"
    return f"{stem}-{recipe}-n{samples}-s{steps}-cfg{cfg:g}"


def _status(r: Run, samples: int) -> str:
    if r.result_file.is_file():
        return "done"
    if (r.folder / "samples.npz").is_file():
        return "sampled (not evaluated)"
    shards = r.folder / "samples.npz.shards"
    if shards.is_dir():
        return f"sampling ({len(list(shards.glob('shard_*.npz')))} shards written)"
    if (r.folder / "quant" / "quant_config.json").is_file():
        return "quantized"
    return "todo"


def make_plan(table: str, weights: str, *, samples: int, steps: int, cfg: float, out: "str | Path",
              seed_offset: int = 0, batch_size: int = 32, recipes: list[str] | None = None, gpus: int = 8) -> Plan:
    """The runs of ``table`` (or ``recipes``) with their folders and current status; nothing is computed."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; choose one of {sorted(TABLES)}")
    names = [get_recipe(r).name for r in (recipes or TABLES[table])]
    out = Path(out)
    plan = Plan(table, str(weights), samples, steps, cfg, seed_offset, batch_size, out,
                world_size=int(os.environ.get("WORLD_SIZE", "1")), gpus=gpus)
    for name in names:
        rid = run_id(weights, name, samples, steps, cfg)
        r = Run(name, rid, out / rid)
        r.status = _status(r, samples)
        plan.runs.append(r)
    return plan


def measure_cost(bundle, plan: Plan, probe_steps: int = 2) -> None:
    """Time ``probe_steps`` guided steps and one decode of one batch of the FP32 model; fills the plan."""
    b = max(1, min(plan.batch_size, 8))
    labels = torch.arange(b) % bundle.num_classes
    seeds = list(range(b))
    denoise_batch(bundle, labels, seeds, num_steps=1, cfg_scale=plan.cfg)  # warm-up
    t0 = time.perf_counter()
    lat = denoise_batch(bundle, labels, seeds, num_steps=probe_steps, cfg_scale=plan.cfg)
    plan.step_seconds = (time.perf_counter() - t0) / (b * probe_steps)
    t0 = time.perf_counter()
    with torch.no_grad():
        img = bundle.decoder(lat)
    plan.decode_seconds = (time.perf_counter() - t0) / b
    plan.image_shape = (bundle.image_size, bundle.image_size, bundle.image_channels)
    del img


def execute(plan: Plan, bundle, *, extractor, reference, reference_name: str = "", progress: bool = True,
            calib_profile=None, log=print) -> list[Path]:
    """Run every unfinished run of ``plan`` (resumably); returns the ``result.json`` paths written or found.

    ``extractor``/``reference``: the feature network and reference batch passed to ``metrics.adm.evaluate``
    (full scale: ``InceptionExtractor`` and the ADM ``.npz``). ``calib_profile``: sizes of calibration
    (default: the ``full`` profile with the plan's steps and batch size).
    """
    full = get_profile("full")
    prof = calib_profile or dataclasses.replace(full, sampling_steps=plan.steps, batch_size=plan.batch_size,
                                                eval_samples=plan.samples,
                                                calib_timesteps=min(full.calib_timesteps, plan.steps))
    rank, world, init_here = dist_setup()
    plan.world_size = world
    mkey = model_checksum(bundle)
    written = []
    try:
        for r in plan.runs:
            if r.result_file.is_file():
                written.append(r.result_file)
                continue
            recipe = get_recipe(r.recipe)
            spec = plan.spec(r.recipe) | {"model_sha256": mkey, "recipe_fields": recipe.to_dict(),
                                          "calibration": prof.as_dict()}
            spec = json.loads(json.dumps(spec, default=str))
            if rank == 0:
                r.folder.mkdir(parents=True, exist_ok=True)
                pf = r.folder / "plan.json"
                if pf.is_file() and json.loads(pf.read_text()) != spec:
                    raise SamplingError(f"{r.folder} holds an unfinished run with other settings (see its "
                                        "plan.json; delete it, or choose another --out)")
                if not pf.is_file():
                    write_json_atomic(pf, spec)
            t0 = time.perf_counter()
            calib_spec = CalibrationSpec(prof, 0, plan.cfg)
            store = r.folder / "quant"
            if rank == 0 and not recipe.is_identity and not (store / "quant_config.json").is_file():
                log(f"[reproduce] {r.run_id}: calibrating and quantizing")
            # rank 0 quantizes and stores first; then the other ranks load what it stored (a recipe the store does
            # not restore is quantized again, with the same deterministic calibration)
            qb = quantized_copy(bundle, recipe, calibration=calib_spec, store=store, mkey=mkey)[0] if rank == 0 else None
            barrier()
            if rank != 0:
                qb = quantized_copy(bundle, recipe, calibration=calib_spec, store=store, mkey=mkey)[0]
            t_quant = time.perf_counter() - t0
            if rank == 0:
                log(f"[reproduce] {r.run_id}: sampling {plan.samples} images")
            t1 = time.perf_counter()
            path = write_samples(qb, r.folder / "samples.npz", plan.samples, num_steps=plan.steps,
                                 cfg_scale=plan.cfg, seed_offset=plan.seed_offset, batch_size=plan.batch_size,
                                 progress=progress, tag=recipe.name)
            t_sample = time.perf_counter() - t1
            del qb
            if rank != 0:
                continue
            log(f"[reproduce] {r.run_id}: evaluating")
            t2 = time.perf_counter()
            rep = evaluate(path, reference, extractor, progress=progress)
            names = {"P": "Precision", "R": "Recall", "P*": "Precision*", "R*": "Recall*"}
            metrics = {names.get(n, n): float(getattr(rep, f)) for f, n in rep.metric_names().items()}
            seconds = {"quantize": round(t_quant, 1), "sample": round(t_sample, 1),
                       "evaluate": round(time.perf_counter() - t2, 1)}  # of this invocation (a resumed run's are partial)
            protocol = run_protocol(
                bundle, sampler="ddpm", steps=plan.steps, cfg_scale=plan.cfg, samples=plan.samples,
                seeds=f"{plan.seed_offset}+i", calibration=None if recipe.is_identity else calib_spec,
                model=Path(plan.weights).name, mkey=mkey, extractor=rep.extractor, extractor_sha256=rep.weights_checksum,
                reference=reference_name, n_reference=rep.n_reference, profile=prof.name, seconds=seconds,
                world_size=world, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
            result = {"recipe": r.recipe, "run_id": r.run_id, "metrics": metrics, "protocol": protocol,
                      "samples": str(path), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_json_atomic(r.result_file, result)
            written.append(r.result_file)
            log(f"[reproduce] {r.run_id}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        barrier()
    finally:
        if init_here:
            dist.destroy_process_group()
    return written


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _cmd(args: argparse.Namespace) -> int:
    out = Path(args.out or DATA_DIR / "results")
    rank = int(os.environ.get("RANK", "0"))
    say = (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)  # noqa: E731
    require_device(args.device)
    weights, origin = weights_source(args.weights, "--weights", default=DEFAULT_WEIGHTS if args.dry_run else None)
    try:
        plan = make_plan(args.table, weights, samples=args.samples, steps=args.steps, cfg=args.cfg, out=out,
                         seed_offset=args.seed_offset, batch_size=args.batch_size,
                         recipes=args.recipes.split(",") if args.recipes else None, gpus=args.gpus)
    except (ValueError, KeyError) as err:
        raise with_fix(err.args[0] if isinstance(err, KeyError) else err, "fix --recipes or the flags named") from None
    bundle = None
    if origin == "default":
        say(f"(no --weights or ${ENV_WEIGHTS}: the plan of {DEFAULT_WEIGHTS}; this machine's cost is not measured)")
    elif not args.no_measure or not args.dry_run:
        try:
            bundle, _ = load_model(args.weights, "--weights", default=None, vae=args.vae, device=args.device)
        except (CliError, WeightsError, FileNotFoundError) as err:
            if not args.dry_run:
                raise
            say(f"(model not loaded, so the cost is not measured: {one_line(err)})")
        if bundle is not None and not args.no_measure:
            measure_cost(bundle, plan)
        if bundle is not None:
            plan.forward_flops = _config_flops(bundle.transformer.config)
    say(plan.describe())
    if args.dry_run:
        return 0
    reference = args.reference or os.environ.get(ENV_REFERENCE)
    if reference is not None and not Path(reference).is_file():
        raise CliError(f"reference batch {reference} not found (pass --reference PATH or set ${ENV_REFERENCE} to "
                       "an existing .npz)")
    if args.proxy:
        extractor = ProxyExtractor(device=args.device)
        if reference is None:
            reference, ref_name = embedded_reference("heldout"), "embedded-heldout"
        else:
            ref_name = Path(reference).name
    else:
        if reference is None:
            raise CliError(f"no reference batch (pass --reference VIRTUAL_imagenet256_labeled.npz or set "
                           f"${ENV_REFERENCE}; download it from the ADM evaluation suite, "
                           "github.com/openai/guided-diffusion, evaluations/)")
        try:
            extractor = InceptionExtractor(args.inception_weights, device=args.device)
        except ValueError as err:
            raise with_fix(err, "pass --inception-weights PATH to an intact file") from None
        ref_name = f"{Path(reference).name} sha256 {sha256_file(Path(reference))[:16]}"
    execute(plan, bundle, extractor=extractor, reference=reference, reference_name=ref_name,
            progress=not args.no_progress, log=say)
    say(f"[reproduce] done; results in {out}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``hqdit reproduce``."""
    p = subparsers.add_parser(
        "reproduce", help="full-scale tables on DiT-XL/2: print the plan, then run it resumably (torchrun-aware)",
        description="Quantize, sample and evaluate every recipe of a table on DiT-XL/2 weights. Prints the plan "
                    "(runs, time from a measured per-image cost, disk) and executes it; rerun to resume.")
    p.add_argument("--table", choices=sorted(TABLES), default="sfid",
                   help="sfid: the W4A4 comparison (FP32, HQ-DiT, baselines); ablation; bits (W8A8/W4A8/W4A4)")
    p.add_argument("--weights", default=None,
                   help="DiT-XL-2-256x256.pt or a diffusers DiT-XL-2-256 folder (default: $HQDIT_DIT_WEIGHTS)")
    p.add_argument("--vae", default=None, help="sd-vae-ft-ema folder for an original .pt (default $HQDIT_VAE)")
    p.add_argument("--samples", type=int, default=50_000, help="images per run (paper: 50000; PTQ4DiT/Q-DiT: 10000)")
    p.add_argument("--steps", type=int, default=100, help="DDPM steps (paper at 256 px: 100; at 512 px: 20)")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance scale (paper: 1.5 and 4.0)")
    p.add_argument("--recipes", default=None, help="comma-separated recipes instead of the table's")
    p.add_argument("--seed-offset", type=int, default=0, help="sample i uses seed offset+i")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--reference", default=None, help=f"ADM reference batch .npz (default ${ENV_REFERENCE})")
    p.add_argument("--inception-weights", default=None, help="weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--proxy", action="store_true", help="embedded model only: proxy network, starred metrics")
    p.add_argument("--out", default=None, help="results folder (default data/results)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    p.add_argument("--no-measure", action="store_true", help="with --dry-run: do not load the model to time it")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the torchrun command and GPU-hour plan printed")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd)
    return p


def _cuda() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False
