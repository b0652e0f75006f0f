"""How the embedded DiT and its proxy classifier were trained (``hqdit train-embedded``).

One command, fixed seeds, resumable, on 2 CPU cores in under an hour::

    hqdit train-embedded --out data/embedded

does, in order (each stage is skipped when its output already exists, so rerunning the same command
after an interruption resumes where it stopped):

1. **Data** — scikit-learn's ``load_digits`` (1,797 8×8 grey images, 10 classes, installs offline),
   upsampled bilinearly to 16×16, scaled to [-1, 1], one channel; a fixed stratified split
   (80 % train / 20 % held out, seed 0). Both networks train on the train split only.
2. **Proxy classifier** (:class:`hqdit_utils.metrics.proxy_net.ProxyNet`), trained on the train split
   with ±1-pixel shifts; its held-out accuracy is recorded. Written to ``<out>/proxy/``.
3. **The embedded DiT** — ``diffusers.DiTTransformer2DModel`` with patch 2 (8×8 = 64 tokens), width
   144 = 2 heads × 72, 6 adaLN-Zero blocks, out channels 2 (learned-sigma layout, as DiT-XL/2),
   10 classes + a null class (id 10) for classifier-free guidance. Trained as DiT: 1000-step linear
   β schedule (1e-4 … 0.02), ε-prediction MSE on the first output channel, uniform timesteps, labels
   replaced by the null class with probability 10 %. Training tricks that help small diffusion models:
   one timestep/class embedder shared by all blocks (as in the original DiT; diffusers gives each block
   its own copy, so the shared module is tied during training and *saved untied* as a plain diffusers
   checkpoint), DiT's initialisation (adaLN-Zero and output layer zeroed), AdamW with linear warm-up and
   cosine decay and decoupled weight decay 1.0 on the quantized block linears only (our choice: it shrinks the
   random matrices they start from, so that what is left is what training put there), bf16 autocast, random
   ±1-pixel shifts, EMA of the weights (the EMA weights are shipped).
   Checkpoints (model, EMA, optimizer, step, RNG state, loss curve) are written atomically every few
   minutes to ``--checkpoint-dir``.
4. **Export** — ``<out>/transformer/`` (``save_pretrained``, safetensors), ``<out>/scheduler/``.
5. **Class-consistency** — cfg-1.5 DDPM samples (50 steps) classified by the proxy network; the
   fraction assigned to the requested class is recorded.
6. **``<out>/MANIFEST.json``** — sha256 of every shipped file, data set and split, seeds, steps, wall
   time, final losses, loss curve, proxy accuracy, class-consistency and the exact command.

Units: images are float32 NCHW ``[N, 1, 16, 16]`` in [-1, 1] during training; time in seconds.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..config import CACHE_DIR
from .digits import DATASET_NAME, IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, DigitsData, load_digits16, to_uint8_nhwc
from ..dit_configs import dit_config
from ..files import atomic_path, load_error_reason, strict_json
from ..files import write_manifest as files_write_manifest
from ..metrics.proxy_net import ProxyNet, load_proxy_net, save_proxy_net
from ..dit.models import load_dit
from ..provenance import package_versions
from .realism import model_realism, summarize_realism
from ..dit.sampling import sample

def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image ``[B, C, H, W]`` by an independent integer offset in [-max_shift, max_shift]²,
    filling with background (-1)."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, c, h, w + 2 * p)
    cols = (ox[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, c, h, w)
    tmp = torch.gather(padded, 2, rows)  # [b, c, h, w + 2p]
    return torch.gather(tmp, 3, cols)


# --------------------------------------------------------------------------------------------------
# the DiT
# --------------------------------------------------------------------------------------------------
def embedded_dit_config(width: int = 144, head_dim: int = 72, num_layers: int = 6) -> dict:
    """``DiTTransformer2DModel`` config of the embedded model (pixel space, 1 channel, 16×16, patch 2)."""
    if width % head_dim:
        raise ValueError(f"width {width} must be a multiple of the head dimension {head_dim}")
    # out_channels default 2: the learned-sigma layout [eps, variance interpolation], as DiT-XL/2
    return dit_config(depth=num_layers, hidden_size=width, num_heads=width // head_dim, patch_size=2,
                      in_channels=1, input_size=IMAGE_SIZE, num_classes=NUM_CLASSES)


def dit_initialize(model: nn.Module, block_init_std: float = 0.0) -> None:
    """DiT's initialisation: Xavier-uniform linears with zero bias, N(0, 0.02) label table and
    timestep MLP, and the adaLN modulation and the output layers zeroed (adaLN-Zero).

    ``block_init_std > 0`` (an option we tried; the shipped model keeps DiT's Xavier start, 0): the
    attention and MLP linears of every block (the layers the recipes quantize) start from
    N(0, block_init_std²) instead of Xavier-uniform (σ ≈ 0.083 at width 144); the embedded-model page
    reports what it did to the weights and to the samples."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if block_init_std > 0:
        for block in model.transformer_blocks:
            for lin in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.attn1.to_out[0],
                        block.ff.net[0].proj, block.ff.net[2]):
                nn.init.normal_(lin.weight, std=block_init_std)
    pe = model.pos_embed.proj
    nn.init.xavier_uniform_(pe.weight.view(pe.weight.shape[0], -1))
    nn.init.zeros_(pe.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for lin in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(lin.weight)
        nn.init.zeros_(lin.bias)


def build_dit(config: dict, seed: int = 0, tie: bool = False, block_init_std: float = 0.0):
    """A freshly initialised ``DiTTransformer2DModel`` (DiT init, seed ``seed``; ``block_init_std``
    see :func:`dit_initialize`); ``tie=True`` makes every block use block 0's timestep/class embedder
    (one shared module, as in the original DiT)."""
    from diffusers import DiTTransformer2DModel  # deferred: diffusers takes seconds to import

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**config)
    dit_initialize(model, block_init_std)
    if tie:
        tie_embedders(model)
    return model


def tie_embedders(model) -> None:
    """Make all blocks share block 0's ``norm1.emb`` (``CombinedTimestepLabelEmbeddings``) module."""
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = shared


def untied_copy(model, config: dict):
    """A plain diffusers model (one embedder copy per block, as ``DiTTransformer2DModel`` builds it)
    holding the weights of a (possibly tied) model — what ``save_pretrained`` can write."""
    from diffusers import DiTTransformer2DModel  # deferred: diffusers takes seconds to import

    fresh = DiTTransformer2DModel(**config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fresh.load_state_dict(state, strict=True)
    return fresh


def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DiT's (= ADM's "linear") noise schedule, float64 ``[T]``."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# training configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything that defines a training run (recorded in the manifest)."""

    seed: int = 0
    split_seed: int = 0
    heldout_fraction: float = 0.2
    # DiT
    width: int = 144
    head_dim: int = 72
    num_layers: int = 6
    # Our choices that make the block linears' weights trained rather than random (see the embedded-model
    # page, which also shows the trials): decoupled weight decay on those weights only, and twice the first
    # edition's 3000 steps (and warm-up). The defaults reproduce the shipped model.
    block_init_std: float = 0.0  # N(0, σ²) start of the block linears (0: Xavier-uniform, DiT's)
    block_weight_decay: float = 1.0  # AdamW decay of the block linears' weights only (others: weight_decay)
    steps: int = 6000
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_fraction: float = 0.02
    warmup_steps: int = 300
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    max_shift: int = 1
    bf16: bool = True
    share_embedder: bool = True
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    checkpoint_every_s: float = 180.0
    log_every: int = 25
    # proxy classifier
    proxy_epochs: int = 40
    proxy_lr: float = 2e-3
    proxy_batch_size: int = 128
    # class-consistency check
    consistency_samples: int = 500
    consistency_steps: int = 50
    consistency_cfg: float = 1.5
    consistency_batch: int = 100

    def dit_config(self) -> dict:
        return embedded_dit_config(self.width, self.head_dim, self.num_layers)


def block_linear_weights(model) -> list:
    """The weights of the attention and MLP linears of every block — the layers the recipes quantize."""
    return [lin.weight for block in model.transformer_blocks
            for lin in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.attn1.to_out[0],
                        block.ff.net[0].proj, block.ff.net[2])]


def optimizer_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW parameter groups: the block linears' weights decay with ``cfg.block_weight_decay``, every
    other parameter with ``cfg.weight_decay``.

    Our choice for the shipped model (1.0 on the block linears, 0 elsewhere): decoupled weight decay shrinks what no
    gradient sustains — above all the random matrix the weights started from — so that after a few
    thousand steps the quantized weights are dominated by what training put there."""
    block = block_linear_weights(model)
    ids = {id(p) for p in block}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": block, "weight_decay": cfg.block_weight_decay},
            {"params": rest, "weight_decay": cfg.weight_decay}]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine decay to
    ``min_lr_fraction * lr`` at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    lo = cfg.lr * cfg.min_lr_fraction
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * min(1.0, t)))


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --------------------------------------------------------------------------------------------------
# proxy classifier
# --------------------------------------------------------------------------------------------------
def train_proxy(data: DigitsData, cfg: TrainConfig, progress: bool = True):
    """Train :class:`ProxyNet` on the train split; returns ``(net, info)`` with held-out accuracy."""
    t0 = time.time()
    torch.manual_seed(cfg.seed + 100)
    gen = torch.Generator().manual_seed(cfg.seed + 101)
    net = ProxyNet(num_classes=NUM_CLASSES)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.proxy_lr, weight_decay=1e-4)
    xtr, ytr = data.images[data.train_idx], data.labels[data.train_idx]
    n = len(ytr)
    steps_per_epoch = math.ceil(n / cfg.proxy_batch_size)
    total = cfg.proxy_epochs * steps_per_epoch
    step = 0
    net.train()
    bar = tqdm(total=total, desc="proxy classifier", disable=not progress, mininterval=2.0)
    loss_v = float("nan")
    for _epoch in range(cfg.proxy_epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.proxy_batch_size):
            b = perm[i : i + cfg.proxy_batch_size]
            x = random_shift(xtr[b], gen, cfg.max_shift)
            for g in opt.param_groups:
                g["lr"] = cfg.proxy_lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(net(x)["logits"], ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_v = loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_v:.4f}")
    bar.close()
    net.eval()
    with torch.no_grad():
        xte = to_uint8_nhwc(data.images[data.heldout_idx])
        pred = net.predict(xte)
        acc = (pred == data.labels[data.heldout_idx]).float().mean().item()
        train_pred = net.predict(to_uint8_nhwc(xtr))
        train_acc = (train_pred == ytr).float().mean().item()
    info = {
        "heldout_accuracy": acc,
        "train_accuracy": train_acc,
        "heldout_images": int(len(data.heldout_idx)),
        "epochs": cfg.proxy_epochs,
        "final_loss": loss_v,
        "wall_time_s": time.time() - t0,
        "input": "uint8 NHWC [N,16,16,1] (sampler output), preprocess x/127.5-1",
    }
    return net, info


# --------------------------------------------------------------------------------------------------
# DiT training loop
# --------------------------------------------------------------------------------------------------
class ThreadTuner:
    """Pick the faster of ``max_threads`` and 1 torch threads, re-checked often.

    On a shared 2-core machine another process taking one core makes 2-thread training 4–10× slower
    (the OpenMP threads wait on each other) while 1 thread only halves in speed, so the training
    loop measures both (``probe`` steps each, median step time), keeps the faster for ``hold_s``
    seconds, and re-probes early when steps become ``slowdown``× slower than measured. Thread count
    can change float summation order, so results are reproducible to rounding, not bit-for-bit, when
    the machine load differs between runs.
    """

    def __init__(self, max_threads: int, probe: int = 6, hold_s: float = 60.0, slowdown: float = 1.6):
        self.cands = [max_threads, 1] if max_threads > 1 else [1]
        self.probe, self.hold_s, self.slowdown = probe, hold_s, slowdown
        self.times: dict[int, list[float]] = {}
        self.phase_steps = 0
        self.mode = "probe" if len(self.cands) > 1 else "fixed"
        self.ci = 0
        self.best = float("inf")
        self.hold_start = time.time()
        self.slow_run = 0
        self._set(self.cands[0])

    def update(self, dt: float) -> None:
        """Record the last step's wall time ``dt`` (s) and maybe switch thread count."""
        if self.mode == "fixed":
            return
        self.phase_steps += 1
        if self.mode == "hold":
            self.slow_run = self.slow_run + 1 if dt > self.slowdown * self.best else 0
            if time.time() - self.hold_start > self.hold_s or self.slow_run >= 3:
                self.mode, self.ci, self.phase_steps, self.times = "probe", 0, 0, {}
                self._set(self.cands[0])
            return
        if self.phase_steps > 1:  # skip the first step after a switch
            self.times.setdefault(self.current, []).append(dt)
        if self.phase_steps >= self.probe + 1:
            self.ci += 1
            self.phase_steps = 0
            if self.ci < len(self.cands):
                self._set(self.cands[self.ci])
            else:
                med = {k: sorted(v)[len(v) // 2] for k, v in self.times.items()}
                choice = min(med, key=med.get)
                self.best = med[choice]
                self._set(choice)
                self.mode, self.hold_start, self.slow_run = "hold", time.time(), 0

    def _set(self, n: int) -> None:
        self.current = n
        torch.set_num_threads(n)


def _rng_state(gen: torch.Generator) -> dict:
    return {"torch": torch.get_rng_state(), "data": gen.get_state()}


def train_dit(
    data: DigitsData,
    cfg: TrainConfig,
    checkpoint_dir: str | Path,
    progress: bool = True,
    stop_after_steps: int | None = None,
    adaptive_threads: bool = True,
):
    """Train (or resume) the embedded DiT; returns ``(ema_model, raw_model, state)``.

    ``checkpoint_dir/train_state.pt`` holds model, EMA, optimizer, step, RNG states, wall time and the
    loss curve; it is written atomically every ``cfg.checkpoint_every_s`` seconds and at the end, and
    read back (``weights_only=True``) when present, so rerunning resumes. ``stop_after_steps`` ends
    this call early at that global step (after writing a checkpoint) — used by tests to simulate an
    interruption. ``adaptive_threads`` lets :class:`ThreadTuner` choose between the current torch
    thread count and 1 thread while training. ``state["loss_curve"]`` is a list of ``[step, mean ε-MSE since last entry, wall s]``.
    """
    ckpt_path = Path(checkpoint_dir) / "train_state.pt"
    dit_cfg = cfg.dit_config()
    model = build_dit(dit_cfg, seed=cfg.seed, tie=cfg.share_embedder, block_init_std=cfg.block_init_std)
    # label dropout is done explicitly below (reproducible generator); switch off diffusers' own.
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(optimizer_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    state = {"step": 0, "wall_time_s": 0.0, "loss_curve": [], "config": asdict(cfg)}

    if ckpt_path.is_file():
        try:
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated zip, forbidden pickle global …: the file cannot be trusted
            raise RuntimeError(
                f"checkpoint {ckpt_path} cannot be read ({load_error_reason(err)}); it is damaged or not written "
                "by train-embedded. Delete it to train from scratch") from err
        missing = {"model", "ema", "optimizer", "rng", "step", "wall_time_s", "loss_curve", "config"} - set(ck)
        if missing:
            raise RuntimeError(f"checkpoint {ckpt_path} lacks {sorted(missing)}; it is not a train-embedded "
                               "checkpoint. Delete it or use another --checkpoint-dir")
        if ck["config"] != asdict(cfg):
            diff = {k: (ck["config"].get(k), v) for k, v in asdict(cfg).items() if ck["config"].get(k) != v}
            raise RuntimeError(
                f"checkpoint {ckpt_path} was written with a different configuration {diff} (checkpoint, now); "
                "delete it or use another --checkpoint-dir"
            )
        try:
            model.load_state_dict(ck["model"])
            ema.load_state_dict(ck["ema"])
        except RuntimeError as err:  # missing / unexpected keys, shape mismatches
            raise RuntimeError(f"checkpoint {ckpt_path} does not fit the model: {err}. Delete it or use another "
                               "--checkpoint-dir") from err
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"]["torch"])
        gen.set_state(ck["rng"]["data"])
        state = {"step": int(ck["step"]), "wall_time_s": float(ck["wall_time_s"]), "loss_curve": [list(r) for r in ck["loss_curve"]], "config": ck["config"]}
        state["loss_acc"] = list(ck.get("loss_acc", [0.0, 0]))  # losses since the last curve entry

    def save_checkpoint():
        _atomic_torch_save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": _rng_state(gen),
                "step": state["step"],
                "wall_time_s": state["wall_time_s"],
                "loss_curve": state["loss_curve"],
                "loss_acc": state.get("loss_acc", [0.0, 0]),
                "config": asdict(cfg),
            },
            ckpt_path,
        )

    betas = linear_betas(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
    abar = torch.cumprod(1.0 - betas, 0)
    sqrt_abar = abar.sqrt().float()
    sqrt_1m_abar = (1.0 - abar).sqrt().float()
    xtr, ytr = data.images[data.train_idx], data.labels[data.train_idx]
    n = len(ytr)
    model.train()
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())

    end_step = cfg.steps if stop_after_steps is None else min(cfg.steps, stop_after_steps)
    bar = tqdm(total=cfg.steps, initial=state["step"], desc="embedded DiT", disable=not progress, mininterval=2.0)
    t_last_ckpt = time.time()
    t_seg = time.time()
    acc_loss, acc_n = state.get("loss_acc", [0.0, 0])
    max_threads = torch.get_num_threads()
    tuner = ThreadTuner(max_threads) if adaptive_threads else None
    t_step = time.time()
    while state["step"] < end_step:
        step = state["step"]
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x0 = random_shift(xtr[idx], gen, cfg.max_shift)
        y = ytr[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
        y[drop] = NULL_CLASS
        t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = sqrt_abar[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_abar[t].view(-1, 1, 1, 1) * noise
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            out = model(xt, timestep=t, class_labels=y).sample
        eps = out[:, : x0.shape[1]].float()
        loss = F.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model_params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))  # short EMA warm-up
            torch._foreach_lerp_(ema_params, [p.detach() for p in model_params], 1.0 - d)
        state["step"] = step + 1
        lv = loss.item()
        acc_loss += lv
        acc_n += 1
        now = time.time()
        if state["step"] % cfg.log_every == 0 or state["step"] == end_step:
            state["wall_time_s"] += now - t_seg
            t_seg = now
            state["loss_curve"].append([state["step"], acc_loss / acc_n, round(state["wall_time_s"], 2)])
            acc_loss, acc_n = state.get("loss_acc", [0.0, 0])
        if tuner is not None:
            tuner.update(now - t_step)
        t_step = now
        bar.update(1)
        bar.set_postfix(loss=f"{lv:.4f}", lr=f"{lr:.2e}", threads=torch.get_num_threads())
        if now - t_last_ckpt >= cfg.checkpoint_every_s or state["step"] == end_step:
            state["wall_time_s"] += time.time() - t_seg
            t_seg = time.time()
            state["loss_acc"] = [acc_loss, acc_n]
            save_checkpoint()
            t_last_ckpt = time.time()
    bar.close()
    torch.set_num_threads(max_threads)
    if state["step"] == 0 or (stop_after_steps is None and not ckpt_path.is_file()):
        save_checkpoint()
    model.eval()
    ema.eval()
    return ema, model, state


# --------------------------------------------------------------------------------------------------
# export, evaluation, manifest
# --------------------------------------------------------------------------------------------------
def export_model(ema, cfg: TrainConfig, out: Path) -> None:
    """Write ``out/transformer`` (untied EMA weights, safetensors) and ``out/scheduler`` (DDPM config)."""
    from diffusers import DDPMScheduler  # deferred: diffusers takes seconds to import

    plain = untied_copy(ema, cfg.dit_config())
    tmp = out / "transformer.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    plain.save_pretrained(str(tmp), safe_serialization=True)
    final = out / "transformer"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    sched = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="linear",
        clip_sample=False,
        prediction_type="epsilon",
        variance_type="fixed_small",
    )
    sched.save_pretrained(str(out / "scheduler"))


def class_consistency(out: Path, cfg: TrainConfig, progress: bool = True) -> dict:
    """Sample ``cfg.consistency_samples`` images (classes round-robin, seeds 0..N-1, DDPM
    ``cfg.consistency_steps`` steps, guidance ``cfg.consistency_cfg``) from the exported model and
    classify them with the exported proxy network. Returns the fraction per class and overall."""
    bundle = load_dit(str(out), verify=False)
    n = cfg.consistency_samples
    labels = torch.arange(n) % NUM_CLASSES
    t0 = time.time()
    imgs = sample(
        bundle,
        labels,
        num_steps=cfg.consistency_steps,
        cfg_scale=cfg.consistency_cfg,
        seeds=list(range(n)),
        sampler="ddpm",
        batch_size=cfg.consistency_batch,
        progress=progress,
    )
    dt = time.time() - t0
    proxy = load_proxy_net(out / "proxy")
    pred = proxy.predict(imgs)
    ok = (pred == labels).float()
    per_class = {str(c): ok[labels == c].mean().item() for c in range(NUM_CLASSES)}
    return {
        "fraction": ok.mean().item(),
        "per_class": per_class,
        "samples": n,
        "sampler": "ddpm",
        "num_steps": cfg.consistency_steps,
        "cfg_scale": cfg.consistency_cfg,
        "seeds": f"0..{n - 1}",
        "labels": f"i mod {NUM_CLASSES}",
        "sampling_wall_time_s": dt,
        "images_per_s": n / dt,
    }


def write_manifest(out: Path, record: dict) -> dict:
    """Hash every file under ``out`` (except the manifest) and write ``out/MANIFEST.json``."""
    return files_write_manifest(out, record)


def _environment() -> dict:
    """Versions and machine facts recorded in the manifest."""
    return {
        "python": platform.python_version(),
        **package_versions(("torch", "diffusers", "scikit-learn")),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


def run(cfg: TrainConfig, out: str | Path, checkpoint_dir: str | Path, command: str, progress: bool = True,
        skip_consistency: bool = False, stop_after_steps: int | None = None) -> dict:
    """All stages (see the module docstring); returns the manifest record.

    ``stop_after_steps`` ends training at that step of the ``cfg.steps``-step schedule (the learning
    rate still follows the full schedule) and exports the EMA weights of that step."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    data = load_digits16(cfg.split_seed, cfg.heldout_fraction)

    proxy_cfg_file = out / "proxy" / "config.json"
    proxy_info = json.loads(proxy_cfg_file.read_text()).get("training") if proxy_cfg_file.is_file() else None
    if proxy_info is None or proxy_info.get("epochs") != cfg.proxy_epochs:
        print(f"[train-embedded] stage 1/4: proxy classifier ({cfg.proxy_epochs} epochs)", flush=True)
        net, proxy_info = train_proxy(data, cfg, progress=progress)
        save_proxy_net(net, out / "proxy", extra={"training": proxy_info})
    else:
        load_proxy_net(out / "proxy")  # fails loudly if the weights are damaged
    print(f"[train-embedded] proxy held-out accuracy {proxy_info['heldout_accuracy']:.4f}", flush=True)

    print(f"[train-embedded] stage 2/4: embedded DiT ({cfg.steps} steps, checkpoints in {checkpoint_dir})", flush=True)
    ema, _raw, state = train_dit(data, cfg, checkpoint_dir, progress=progress, stop_after_steps=stop_after_steps)
    curve = state["loss_curve"]
    final_loss = sum(r[1] for r in curve[-8:]) / max(1, len(curve[-8:])) if curve else float("nan")
    print(f"[train-embedded] trained {state['step']} steps in {state['wall_time_s']:.0f} s; final loss {final_loss:.4f}", flush=True)

    print("[train-embedded] stage 3/4: export", flush=True)
    export_model(ema, cfg, out)
    dit_cfg = cfg.dit_config()
    record = {
        "name": "hqdit-embedded-dit-digits16",
        "description": (
            "Class-conditional DiT (diffusers DiTTransformer2DModel, adaLN-Zero, patch 2, 64 tokens, width "
            f"{cfg.width} = {cfg.width // cfg.head_dim} heads x {cfg.head_dim}, {cfg.num_layers} blocks, learned-sigma "
            "output layout) trained in pixel space on 16x16 upsampled scikit-learn digits. EMA weights."
        ),
        "dataset": {
            "name": DATASET_NAME,
            "images": int(len(data.labels)),
            "classes": NUM_CLASSES,
            "split": "stratified train/held-out (sklearn train_test_split)",
            "split_seed": cfg.split_seed,
            "heldout_fraction": cfg.heldout_fraction,
            "train_images": int(len(data.train_idx)),
            "heldout_indices": data.heldout_idx.tolist(),
        },
        "model": {
            "class": "diffusers.DiTTransformer2DModel",
            "config": dit_cfg,
            "parameters_untied": sum(p.numel() for p in untied_copy(ema, dit_cfg).parameters()),
            "parameters_trained_shared_embedder": sum(p.numel() for p in ema.parameters()),
            "num_classes": NUM_CLASSES,
            "null_class": NULL_CLASS,
            "image_size": IMAGE_SIZE,
            "latent_space": "pixels (decoder = identity), values in [-1, 1]",
            "weights": "EMA",
        },
        "training": {
            "config": asdict(cfg),
            "seed": cfg.seed,
            "steps": state["step"],
            "schedule_steps": cfg.steps,
            "stopped_early": state["step"] < cfg.steps,
            "wall_time_s": round(state["wall_time_s"], 1),
            "final_loss": final_loss,
            "final_loss_definition": "mean eps-MSE of the last 8 loss-curve entries (raw model, training batches)",
            "loss_curve": curve,
            "loss_curve_columns": ["step", "mean eps-MSE since previous entry", "wall time s"],
        },
        "weight_realism": summarize_realism(model_realism(ema)),
        "proxy_classifier": proxy_info,
        "command": command,
        "environment": _environment(),
    }
    write_manifest(out, record)
    if not skip_consistency:
        print(f"[train-embedded] stage 4/4: class-consistency of {cfg.consistency_samples} cfg-{cfg.consistency_cfg} samples", flush=True)
        record["class_consistency"] = class_consistency(out, cfg, progress=progress)
        print(f"[train-embedded] class-consistency {record['class_consistency']['fraction']:.4f}", flush=True)
    record["command_wall_time_this_invocation_s"] = round(time.time() - t_start, 1)
    return write_manifest(out, record)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _default_checkpoint_dir() -> Path:
    return Path(CACHE_DIR) / "train_embedded"


def _cmd(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = TrainConfig(
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        width=args.width,
        num_layers=args.layers,
        block_init_std=args.block_init_std,
        block_weight_decay=args.block_weight_decay,
        ema_decay=args.ema_decay,
        checkpoint_every_s=args.checkpoint_every,
        proxy_epochs=args.proxy_epochs,
        consistency_samples=args.consistency_samples,
        consistency_steps=args.consistency_steps,
        bf16=not args.fp32,
    )
    command = shlex.join(["hqdit"] + sys.argv[1:]) if sys.argv and "train-embedded" in sys.argv else "hqdit train-embedded"
    ckdir = Path(args.checkpoint_dir) if args.checkpoint_dir else _default_checkpoint_dir()
    rec = run(cfg, args.out, ckdir, command, progress=not args.no_progress, skip_consistency=args.skip_consistency,
              stop_after_steps=args.stop_after)
    cc = rec.get("class_consistency", {}).get("fraction")
    print(strict_json({"steps": rec["training"]["steps"], "wall_time_s": rec["training"]["wall_time_s"],
                        "final_loss": rec["training"]["final_loss"],
                        "proxy_heldout_accuracy": rec["proxy_classifier"]["heldout_accuracy"],
                        "class_consistency": cc, "total_bytes": rec["total_bytes"]}, indent=1))
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``hqdit train-embedded``."""
    d = TrainConfig()
    p = subparsers.add_parser(
        "train-embedded",
        help="train the embedded DiT and its proxy classifier (resumable)",
        description=__doc__.split("\n\n")[0] + " Rerun the same command to resume after an interruption.",
    )
    p.add_argument("--out", default="data/embedded", help="output folder (default: data/embedded)")
    p.add_argument("--checkpoint-dir", default=None, help="training checkpoints (default: $HQDIT_CACHE/train_embedded)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--width", type=int, default=d.width, help="model width, a multiple of 72")
    p.add_argument("--layers", type=int, default=d.num_layers)
    p.add_argument("--block-init-std", type=float, default=d.block_init_std,
                   help=f"std of the N(0, std^2) start of the block linears; 0 = Xavier-uniform (default {d.block_init_std})")
    p.add_argument("--block-weight-decay", type=float, default=d.block_weight_decay,
                   help=f"AdamW weight decay of the block linears' weights (default {d.block_weight_decay}; others: 0)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=float, default=d.checkpoint_every_s, help="seconds between checkpoints")
    p.add_argument("--proxy-epochs", type=int, default=d.proxy_epochs)
    p.add_argument("--consistency-samples", type=int, default=d.consistency_samples)
    p.add_argument("--consistency-steps", type=int, default=d.consistency_steps)
    p.add_argument("--skip-consistency", action="store_true", help="do not measure class-consistency")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end training at this step of the --steps schedule (LR schedule unchanged) and export it")
    p.add_argument("--fp32", action="store_true", help="train without bf16 autocast")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd)
    return p
