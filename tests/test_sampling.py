"""Sampling: per-sample seeds (bit-identical, batch-size independent), resumable and distributed writing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hqdit_utils.dit.models import load_dit, tiny_dit
from hqdit_utils.dit.sampling import make_scheduler, sample, sample_grid, write_samples

LABELS = [0, 1, 2, 3, 0, 1, 2, 3]
SEEDS = list(range(40, 48))
KW = dict(num_steps=8, cfg_scale=1.5, progress=False)


@pytest.fixture(scope="module")
def tiny():
    return tiny_dit(seed=0)


def test_same_seeds_bit_identical(tiny):
    a = sample(tiny, LABELS, seeds=SEEDS, batch_size=8, **KW)
    b = sample(tiny, LABELS, seeds=SEEDS, batch_size=8, **KW)
    assert a.dtype == torch.uint8 and a.shape == (8, 8, 8, 1)
    assert torch.equal(a, b)
    c = sample(tiny, LABELS, seeds=[s + 1 for s in SEEDS], batch_size=8, **KW)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_batch_size_does_not_change_images(tiny, sampler):
    a = sample(tiny, LABELS, seeds=SEEDS, batch_size=8, sampler=sampler, **KW)
    b = sample(tiny, LABELS, seeds=SEEDS, batch_size=3, sampler=sampler, **KW)
    assert torch.equal(a, b)
    # a sample does not depend on its neighbours either
    c = sample(tiny, LABELS[5:7], seeds=SEEDS[5:7], batch_size=8, sampler=sampler, **KW)
    assert torch.equal(a[5:7], c)


def test_embedded_batch_size_invariance():
    b = load_dit("embedded")
    lab, seeds = list(range(8)), list(range(8))
    x = sample(b, lab, seeds=seeds, batch_size=8, num_steps=6, cfg_scale=1.5, progress=False)
    y = sample(b, lab, seeds=seeds, batch_size=3, num_steps=6, cfg_scale=1.5, progress=False)
    assert x.shape == (8, 16, 16, 1) and torch.equal(x, y)


def test_guidance_and_labels_matter(tiny):
    a = sample(tiny, LABELS, seeds=SEEDS, batch_size=8, **KW)
    b = sample(tiny, LABELS, seeds=SEEDS, batch_size=8, num_steps=8, cfg_scale=4.0, progress=False)
    c = sample(tiny, [3 - l for l in LABELS], seeds=SEEDS, batch_size=8, **KW)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="0..3"):
        sample(tiny, [4], seeds=[0], **KW)  # the null id is not a class to ask for
    with pytest.raises(ValueError, match="one seed per sample"):
        sample(tiny, [0, 1], seeds=[0], **KW)


def test_ddpm_respacing_matches_adm():
    sched = make_scheduler(tiny_dit(), "ddpm", 50)
    ts = sched.timesteps.tolist()
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    assert ts[::-1] == np.round(np.linspace(0, 999, 50)).astype(int).tolist()


def test_transformer_modified_in_place_is_used(tiny):
    import copy

    b = copy.copy(tiny)
    b.transformer = copy.deepcopy(tiny.transformer)
    a = sample(b, LABELS[:2], seeds=SEEDS[:2], batch_size=8, **KW)
    with torch.no_grad():
        b.transformer.proj_out_2.weight.mul_(0.0)  # "quantize" to zero in place
    z = sample(b, LABELS[:2], seeds=SEEDS[:2], batch_size=8, **KW)
    assert not torch.equal(a, z)


def test_sample_grid_shape(tiny):
    g = sample_grid(tiny, classes=[0, 2], per_class=3, num_steps=4)
    assert g.shape == (2 * 9 + 1, 3 * 9 + 1, 1) and g.dtype == np.uint8


SCRIPT = """
import sys, time, torch
from hqdit_utils.dit.models import tiny_dit
from hqdit_utils.dit.sampling import write_samples
b = tiny_dit(seed=0)
slow = float(sys.argv[2])
if slow:
    fwd = b.transformer.forward
    def slowed(*a, **k):
        time.sleep(slow)
        return fwd(*a, **k)
    b.transformer.forward = slowed
write_samples(b, sys.argv[1], 20, num_steps=6, cfg_scale=1.5, batch_size=4, shard_size=2, progress=False,
              keep_shards=len(sys.argv) > 3)
"""


def _env():
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["HQDIT_DIST_BACKEND"] = "gloo"
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny) -> dict:
    """The uninterrupted single-process run (in this process)."""
    ref = tmp_path_factory.mktemp("ref") / "ref.npz"
    write_samples(tiny, ref, 20, num_steps=6, cfg_scale=1.5, batch_size=4, shard_size=2, progress=False)
    with np.load(ref) as z:
        return {k: z[k] for k in z.files}


def test_write_samples_killed_and_resumed(tmp_path, reference):
    ref = reference
    assert ref["arr_0"].shape == (20, 8, 8, 1) and ref["arr_0"].dtype == np.uint8
    assert ref["arr_1"].tolist() == [i % 4 for i in range(20)]
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "killed.npz"
    shards = tmp_path / "killed.npz.shards"
    proc = subprocess.Popen([sys.executable, str(script), str(out), "0.02", "keep"], env=_env())
    deadline = time.time() + 60
    while time.time() < deadline and len(list(shards.glob("shard_*.npz"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(shards.glob("shard_*.npz"))
    assert 3 <= len(done) < 10 and not out.exists(), "the run was not killed midway"
    mtimes = {p.name: p.stat().st_mtime_ns for p in done}
    # rerun the same command: finished shards are kept, the rest is produced, the npz assembled
    subprocess.run([sys.executable, str(script), str(out), "0", "keep"], env=_env(), check=True, timeout=120)
    for name, m in mtimes.items():
        assert (shards / name).stat().st_mtime_ns == m, f"{name} was recomputed"
    assert not list(shards.glob("*.tmp*"))
    with np.load(out) as z:
        np.testing.assert_array_equal(z["arr_0"], ref["arr_0"])
        np.testing.assert_array_equal(z["arr_1"], ref["arr_1"])


def test_torchrun_two_ranks_equal_one_process(tmp_path, reference):
    ref = reference
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "dist.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(out), "0"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(out) as z:
        np.testing.assert_array_equal(z["arr_0"], ref["arr_0"])
        np.testing.assert_array_equal(z["arr_1"], ref["arr_1"])
    assert not (tmp_path / "dist.npz.shards").exists()


def test_write_samples_refuses_other_protocol(tmp_path, tiny):
    out = tmp_path / "x.npz"
    write_samples(tiny, out, 4, num_steps=3, cfg_scale=1.5, batch_size=2, progress=False, keep_shards=True)
    with pytest.raises(RuntimeError, match="unfinished run with other settings"):
        write_samples(tiny, out, 4, num_steps=4, cfg_scale=1.5, batch_size=2, progress=False)
