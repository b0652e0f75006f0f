"""Reliability (issue 10): resume after SIGKILL, clear errors for bad inputs, no unsafe unpickling,
bit-identical reruns, experiments-cache integrity.

The long jobs live in ``reliability_child.py`` (beside this file): each kill test starts one in a child
process, lets it run a seeded random number of transformer calls (the child reports them through a
progress file), waits a seeded random delay, sends SIGKILL, restarts the job in this process and checks
that the artefact equals the one of an uninterrupted run, that nothing partial was left under a final
name, and that the restart did not redo finished work. (Sections run in the order 2, 3, 5, 4, 1: the
tests that start child processes come last, see the ``processes`` fixture.)
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import reliability_child as child
from hqdit_utils.engine import lowbit
from hqdit_utils.runs import digits, experiments
from hqdit_utils.engine.calibration import Calibration, CalibrationError, calibrate
from hqdit_utils.engine.formats import FloatFormat, IntFormat, NoFormat, parse_format
from hqdit_utils.engine.lowbit import int_mm_fast as _this_cpu_int_mm_fast
from hqdit_utils.dit.models import MissingWeightsError, WeightsError, load_dit, tiny_dit
from hqdit_utils.engine.qlinear import QuantLinear
from hqdit_utils.engine.qmodel import QuantizationError, load_quantized, quantize_, save_quantized
from hqdit_utils.engine.quantizer import fake_quantize

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hqdit_utils"


@pytest.fixture(scope="module", autouse=True)
def processes():
    """A ``forkserver`` multiprocessing context whose server has imported torch, diffusers and the package
    once (started with the worktree on ``PYTHONPATH`` and one OpenMP thread): each child is a fresh fork of
    that clean process, so the five child processes of this file do not pay ~5 s of imports each. Started
    when the module starts, so its imports overlap the quick tests; the tests that need children (sections
    4 and 1) come last."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["reliability_child", "hqdit_utils.commands.cli", "hqdit_utils.chapters.analysis",
                                "hqdit_utils.runs.experiments", "hqdit_utils.dit.sampling", "hqdit_utils.runs.train_embedded",
                                "hqdit_utils.metrics.adm", "diffusers"])
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + (saved["PYTHONPATH"] or "")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        forkserver.ensure_running()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return ctx


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class CountCalls:
    """Counts forward calls of DiT transformers in this process (a global module forward hook)."""

    def __enter__(self):
        from diffusers import DiTTransformer2DModel

        self.n = 0

        def hook(module, args, output):
            if isinstance(module, DiTTransformer2DModel):
                self.n += 1

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def kill_midway(processes, job: str, work: Path, total_calls: int, seed: int, pause: float = 0.05) -> int:
    """Run ``job`` in a child process and SIGKILL it after a seeded random number ``k`` (1 … total/2) of
    transformer calls plus a seeded random delay in [0, 2·pause]. Returns the calls it finished.

    The child sleeps ``pause`` after every call, so at least ``total/2 · pause`` seconds of work remain
    when the kill is sent: the kill always lands mid-job (asserted)."""
    rng = random.Random(seed)
    k = rng.randint(2, total_calls // 2)
    delay = rng.uniform(0.0, 2 * pause)
    progress = work / "progress"
    work.mkdir(parents=True, exist_ok=True)
    proc = processes.Process(target=child.main, args=([job, str(work), str(progress), str(pause)],))
    proc.start()
    deadline = time.monotonic() + 180
    try:
        while (progress.stat().st_size if progress.exists() else 0) < k:
            if not proc.is_alive():
                pytest.fail(f"child {job} ended (exit code {proc.exitcode}) before it was killed")
            if time.monotonic() > deadline:
                pytest.fail(f"child {job} made no progress in 180 s")
            time.sleep(0.005)
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
    done = progress.stat().st_size
    assert proc.exitcode == -signal.SIGKILL and k <= done < total_calls, (k, done, total_calls)
    return done


# ==================================================================================================
# 2. bad inputs: each raises a clear error naming the problem and the fix
# ==================================================================================================
_FORMAT_TOKENS = st.sampled_from(["fp", "int", "uint", "e", "m", "_", "fn", "fp32", "none", "4", "2", "1", "0", "8",
                                  "16", "99", "-1", " ", "\n", "E", "M", "٤", "x", "."])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=16), st.lists(_FORMAT_TOKENS, max_size=8).map("".join),
                 st.integers(), st.floats(), st.none(), st.binary(max_size=8), st.lists(st.integers(), max_size=2)))
def test_parse_format_fuzz_raises_value_error_and_nothing_else(name):
    try:
        fmt = parse_format(name)
    except ValueError as err:
        assert "Grammar" in str(err) or "must" in str(err) or "needs" in str(err)
        return
    assert isinstance(name, str) and isinstance(fmt, (FloatFormat, IntFormat, NoFormat))
    assert parse_format(str(fmt)) == fmt  # whatever parses has a canonical name that parses back


@pytest.mark.parametrize("name, hint", [("fp4_e3m1", "fp5_e3m1"), ("fp4", "Grammar"), ("int1", "2..16 bits"),
                                        ("fp8_e4m3fnx", "Grammar"), ("fp4_e0m3", "E >= 1"), ("e2m1", "fp4_e2m1")])
def test_malformed_format_strings_name_the_grammar_or_nearest_names(name, hint):
    with pytest.raises(ValueError, match=re.escape(hint)):
        parse_format(name)


@pytest.fixture(scope="module")
def tiny():
    return tiny_dit(0)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_activations_name_layer_and_timestep(tiny, value):
    import copy

    b = copy.copy(tiny)
    b.transformer = copy.deepcopy(tiny.transformer)
    with torch.no_grad():
        b.transformer.transformer_blocks[0].attn1.to_out[0].weight[0, 0] = value
    with pytest.raises(CalibrationError, match=r"layer 'transformer_blocks\.0\.ff\.net\.0\.proj', timestep \d+.*"
                                               r"NaN/Inf\. Check the model's weights"):
        calibrate(b, num_trajectories=1, num_timesteps=2, num_steps=2, rows_per_timestep=4)


def test_fake_quantize_rejects_bad_shapes_dtypes_axes_and_blocks():
    x = torch.randn(4, 8)
    cases = [
        (dict(x=x, scale=torch.ones(3)), "scale of shape \\(3,\\) does not broadcast to x of shape \\(4, 8\\)"),
        (dict(x=x.to(torch.int32)), "expected a floating-point tensor, got torch.int32"),
        (dict(x=x.to(torch.complex64)), "expected a floating-point tensor"),
        (dict(x=x, scale=torch.tensor(1 + 1j)), "scale must be a real number or a real tensor"),
        (dict(x=x, scale="0.5"), "scale must be a real number"),
        (dict(x=x, axis=2), "axis=2 is not a dimension of x of shape \\(4, 8\\); use an integer in \\[-2, 1\\]"),
        (dict(x=x, block_size=3), "block_size=3 must be a positive integer and must divide the last dimension.*divisor of 8"),
        (dict(x=x, block_size=4.0), "block_size=4.0 must be a positive integer"),
        (dict(x=x, scale=torch.tensor(0.0)), "scales must be finite and positive"),
        (dict(x=torch.tensor([1.0, float("nan")])), "1 NaN and 0 Inf"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fake_quantize(kw.pop("x"), "fp4_e2m1", **kw)


def test_quantlinear_rejects_mismatched_inputs_and_buffers():
    w = torch.randn(6, 8)
    q = QuantLinear(8, 6, weight=w, name="blk.fc")
    with pytest.raises(ValueError, match=r"blk\.fc: input of shape \(2, 5\) does not fit in_features=8"):
        q(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"input dtype torch\.float64 differs from the weight's torch\.float32; "
                                         r"cast the input"):
        q(torch.randn(2, 8, dtype=torch.float64))
    q16 = QuantLinear(8, 6, weight=w.to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are legitimate under autocast
        assert q16(torch.randn(2, 8)).dtype == torch.bfloat16
    for kw, msg in [(dict(weight=torch.randn(6, 7)), r"weight shape \(6, 7\) != \(6, 8\)"),
                    (dict(weight=w, bias=torch.zeros(5)), r"bias shape \(5,\) != \(6,\)"),
                    (dict(weight=w.to(torch.int64)), "weight must be a floating-point tensor"),
                    (dict(weight=w, act_format="fp4_e2m1", act_mode="block"), "needs a positive integer block_size"),
                    (dict(weight=w, act_format="fp4_e2m1", act_mode="static"), "needs act_scale")]:
        with pytest.raises(ValueError, match=msg):
            QuantLinear(8, 6, **kw)


def test_hadamard_size_with_no_construction_lists_alternatives(tiny):
    from hqdit_utils.engine.hadamard import HadamardSpec

    with pytest.raises(ValueError, match=r"no Hadamard matrix of order 92: .*Supported sizes near 92: \[80, 84, 88, "
                                         r"96.*block_diagonal_hadamard\(92, block=4\)"):
        HadamardSpec(92)
    with pytest.raises(ValueError, match="block size 5 must divide n = 72"):
        HadamardSpec(72, block=5)


def test_recipe_pattern_matching_no_layer_leaves_the_model_untouched(tiny):
    import copy

    from hqdit_utils.engine.recipes import get_recipe

    model = copy.deepcopy(tiny.transformer)
    recipe = get_recipe("int4-rtn").replace(layers=("*.attn1.to_q", "*.attn2.to_q"), act_format="fp32")
    with pytest.raises(QuantizationError, match=r"layer pattern '\*\.attn2\.to_q': it matches no module\. Linear "
                                                r"layers look like: "):
        quantize_(model, recipe)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def _diffusers_folder(tmp_path: Path, bundle) -> Path:
    folder = tmp_path / "dit"
    bundle.transformer.save_pretrained(str(folder / "transformer"))
    return folder


def test_corrupted_truncated_or_mismatched_safetensors(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    folder = _diffusers_folder(tmp_path, tiny)
    f = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    good = f.read_bytes()
    sd = load_file(str(f))
    sd["extra.weight"] = sd.pop("proj_out_1.weight")
    save_file(sd, str(f))
    with pytest.raises(WeightsError, match=r"missing keys \['proj_out_1\.weight'\], unexpected keys \['extra\.weight'\]"
                                           r".*download it again"):
        load_dit(str(folder))
    f.write_bytes(good[: len(good) // 2])
    with pytest.raises(WeightsError, match=r"(?s)cannot load the DiT transformer .*truncated.*download it again"):
        load_dit(str(folder))
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="corrupted"):
        load_dit(str(folder))


def test_quantized_state_missing_truncated_or_with_extra_keys(tmp_path, tiny):
    import copy

    from safetensors.torch import load_file, save_file

    from hqdit_utils.files import write_manifest
    from hqdit_utils.engine.recipes import get_recipe

    model = copy.deepcopy(tiny.transformer)
    quantize_(model, get_recipe("int4-rtn").replace(act_format="fp32"))  # weights only: no calibration needed
    out = save_quantized(model, tmp_path / "q")
    state = out / "quant_state.safetensors"
    good = state.read_bytes()
    fresh = lambda: copy.deepcopy(tiny.transformer)  # noqa: E731
    load_quantized(fresh(), out)  # the intact folder loads
    sd = load_file(str(state))
    sd["transformer_blocks.0.attn1.to_q.stray"] = torch.zeros(1)
    del sd["transformer_blocks.1.ff.net.2.weight"]
    save_file(sd, str(state))
    write_manifest(out)  # a deliberate edit, hashed again: the tensor check behind the manifest check
    m = fresh()
    with pytest.raises(QuantizationError, match=r"missing tensors \['transformer_blocks\.1\.ff\.net\.2\.weight'\], "
                                                r"unexpected tensors \['transformer_blocks\.0\.attn1\.to_q\.stray'\]; "
                                                r"re-create it with `hqdit quantize"):
        load_quantized(m, out)
    assert not any(isinstance(x, QuantLinear) for x in m.modules())  # nothing swapped half-way
    state.write_bytes(good[:-50])
    with pytest.raises(QuantizationError, match="quant_state.safetensors has .* bytes, MANIFEST.json says .*: the file "
                                                "is truncated or was changed after it was written; re-create it"):
        load_quantized(fresh(), out)
    write_manifest(out)  # the truncation hashed: the reader's own check behind the manifest's
    with pytest.raises(QuantizationError, match="corrupted or truncated; re-create it"):
        load_quantized(fresh(), out)
    with pytest.raises(QuantizationError, match=r"holds layer 'transformer_blocks\.0\.attn1\.to_q' \[72x72\], which "
                                                r"the model has not"):
        state.write_bytes(good)
        write_manifest(out)
        load_quantized(tiny_dit(0, width=144, heads=2).transformer, out)
    state.unlink()
    with pytest.raises(FileNotFoundError, match="quant_state.safetensors not found.*hqdit quantize"):
        load_quantized(fresh(), out)


def test_training_checkpoint_damaged_or_with_missing_keys(tmp_path):
    from hqdit_utils.runs import train_embedded as T

    cfg = T.TrainConfig(steps=2, batch_size=4, width=72, num_layers=1, warmup_steps=1, checkpoint_every_s=0)
    data = digits.load_digits16()
    ck = tmp_path / "train_state.pt"
    T.train_dit(data, cfg, tmp_path, progress=False)
    blob = torch.load(ck, weights_only=True)
    del blob["ema"]["proj_out_2.bias"]
    torch.save(blob, ck)
    with pytest.raises(RuntimeError, match=r"(?s)does not fit the model: .*proj_out_2\.bias.*Delete it"):
        T.train_dit(data, cfg, tmp_path, progress=False)
    ck.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="cannot be read .*Delete it to train from scratch"):
        T.train_dit(data, cfg, tmp_path, progress=False)


def test_missing_weights_and_reference_batch_say_what_to_download(tmp_path, monkeypatch):
    from hqdit_utils.metrics.adm import load_reference
    from hqdit_utils.metrics.features import InceptionExtractor

    monkeypatch.delenv("HQDIT_DIT_WEIGHTS", raising=False)
    with pytest.raises(MissingWeightsError, match=r"(?s)DiT-XL-2-256x256\.pt.*huggingface-cli download facebook/DiT-XL-2-256"):
        load_dit(str(tmp_path / "DiT-XL-2-256x256.pt"))
    monkeypatch.delenv("HQDIT_VAE", raising=False)
    with pytest.raises(MissingWeightsError, match="huggingface-cli download stabilityai/sd-vae-ft-ema"):
        from hqdit_utils.dit.models import _load_vae

        _load_vae(None, torch.float32)
    with pytest.raises(FileNotFoundError, match=r"(?s)Inception-v3 weights not found .*curl -L -o "
                                                r"weights-inception-2015-12-05-6726825d\.pth"):
        InceptionExtractor(tmp_path / "inception.pth")
    with pytest.raises(FileNotFoundError, match=r"(?s)reference batch not found: .*curl -L -o VIRTUAL_imagenet256_labeled"
                                                r"\.npz https://openaipublic\.blob\.core\.windows\.net/"):
        load_reference(tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    monkeypatch.setenv("HQDIT_EMBEDDED", str(tmp_path / "nowhere"))
    with pytest.raises(MissingWeightsError, match="(?s)git checkout -- data/embedded.*hqdit train-embedded"):
        load_dit("embedded")


@pytest.mark.parametrize("arr, err, msg", [
    (np.zeros((4, 8, 8, 1), np.float32) - 1, TypeError, r"holds float32\. Convert float images in \[-1, 1\]"),
    (np.zeros((4, 1, 8, 8), np.uint8), ValueError, "it looks like NCHW — transpose"),
    (np.zeros((4, 8, 8), np.uint8), ValueError, r"4-D NHWC array .*got shape \(4, 8, 8\)"),
    (np.zeros((0, 8, 8, 1), np.uint8), ValueError, "empty batch"),
    (np.zeros((4, 8, 8, 1), np.int64), TypeError, "holds int64"),
    (np.array([[[[object()]]]] * 2, dtype=object), TypeError, "allow_pickle=True"),
])
def test_sample_npz_with_wrong_shape_dtype_or_range(tmp_path, arr, err, msg, toy_extractor):
    from hqdit_utils.metrics.adm import evaluate

    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=arr)
    with pytest.raises(err, match=msg):
        evaluate(path, np.zeros((4, 8, 8, 1), np.uint8), toy_extractor)


def test_sample_array_range_hint(toy_extractor):
    from hqdit_utils.metrics.adm import evaluate

    with pytest.raises(TypeError, match=r"range \[0\.0, 1\.0\] — this looks like images in \[0, 1\]: convert"):
        evaluate(np.linspace(0, 1, 4 * 64).reshape(4, 8, 8, 1), np.zeros((4, 8, 8, 1), np.uint8), toy_extractor)


def test_empty_calibration_set(tiny):
    for kw, what in [(dict(num_trajectories=0), "num_trajectories=0"), (dict(num_timesteps=0), "num_timesteps=0"),
                     (dict(num_steps=0), "num_steps=0"), (dict(batch_size=0), "batch_size=0")]:
        with pytest.raises(CalibrationError, match=f"empty calibration set: {what}; .*pass .* >= 1"):
            calibrate(tiny, **{"num_trajectories": 1, "num_timesteps": 1, "num_steps": 2, **kw})
    calib = calibrate(tiny, num_trajectories=1, num_timesteps=1, num_steps=2, rows_per_timestep=0)
    import copy

    with pytest.raises(QuantizationError, match="holds no rows"):
        quantize_(copy.deepcopy(tiny.transformer), "int4-rtn", calib)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu():
    from hqdit_utils.metrics.features import ProxyExtractor

    for call in (lambda: load_dit("embedded", device="cuda"), lambda: ProxyExtractor(device="cuda:0")):
        with pytest.raises(RuntimeError, match=r"no usable CUDA GPU .*Pass device='cpu' / --device cpu"):
            call()


# ==================================================================================================
# 3. safety: nothing is unpickled beyond tensors and plain values
# ==================================================================================================
class _Payload:
    """Pickles to "call exec(code)": creates ``marker`` when unpickled by an unrestricted unpickler."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_malicious_pickles_are_refused_without_running_them(tmp_path, tiny):
    from hqdit_utils.runs import experiments, train_embedded
    from hqdit_utils.metrics.adm import load_reference, load_samples
    from hqdit_utils.metrics.features import InceptionExtractor

    marker = tmp_path / "PWNED"
    evil = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save({"model": {"x_embedder.proj.weight": _Payload(marker)}}, evil)
    refused = "pickled Python objects other than tensors and plain values, which are refused unread"
    refusals = [
        (lambda: load_dit(str(evil)), WeightsError, refused),
        (lambda: Calibration.load(evil), CalibrationError, f"cannot read calibration file .*{refused}"),
        (lambda: InceptionExtractor(evil, verify=False), ValueError, refused),
    ]
    ck = tmp_path / "ck"
    ck.mkdir()
    shutil.copy(evil, ck / "train_state.pt")
    cfg = train_embedded.TrainConfig(steps=1, width=72, num_layers=1)
    refusals.append((lambda: train_embedded.train_dit(None, cfg, ck), RuntimeError, f"cannot be read .*{refused}"))
    obj = tmp_path / "objects.npz"
    np.savez(obj, arr_0=np.array([_Payload(marker)] * 2, dtype=object), mu=np.array([_Payload(marker)], dtype=object),
             sigma=np.zeros((1, 1)), mu_s=np.zeros(1), sigma_s=np.zeros((1, 1)))
    refusals += [(lambda: load_samples(obj), TypeError, "allow_pickle"),
                 (lambda: load_reference(obj), ValueError, "allow_pickle=False")]
    for call, err, msg in refusals:
        with pytest.raises(err, match=msg):
            call()
        assert not marker.exists()
    # the cached calibration: even with a matching checksum the file is refused and recomputed
    key_dir = tmp_path / "cache" / "calibration"
    key_dir.mkdir(parents=True)
    kw = dict(num_trajectories=1, num_timesteps=1, num_steps=2, rows_per_timestep=4)
    path = key_dir / f"{experiments.calibration_key(tiny, seed=0, **kw)}.pt"
    shutil.copy(evil, path)
    path.with_suffix(".sha256").write_text(_sha(path))
    experiments.cached_calibrate(tiny, seed=0, cache_dir=tmp_path / "cache", **kw)
    assert not marker.exists()
    # the payload is live: an unrestricted load would have run it. This is the suite's one deliberate
    # unrestricted load, of a file this test wrote itself (its payload only creates `marker` in tmp_path).
    torch.load(evil, weights_only=False)
    assert marker.exists()


def _call_text(text: str, start: int) -> str:
    """The text of the call whose opening parenthesis is at ``start`` (up to the matching one)."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i + 1]
    return text[start:]


def test_package_source_loads_only_safely():
    """grep: every ``torch.load(`` in the package's source (code, docstrings, messages) passes
    ``weights_only=True``, every ``np.load(`` ``allow_pickle=False``, and ``pickle`` appears only as those
    flags or in prose. AST: no pickle-family module is imported, and every real ``torch.load`` /
    ``np.load`` call has the keyword as a literal (not a variable that could be True/False)."""
    import ast

    calls = {"torch.load": 0, "np.load": 0}
    for path in sorted(PACKAGE.rglob("*.py")):
        text, where = path.read_text(), path.relative_to(ROOT)
        for m in re.finditer(r"\b(torch|np|numpy)\.load\(", text):
            call = _call_text(text, m.end() - 1)
            flag = "weights_only=True" if m.group(1) == "torch" else "allow_pickle=False"
            assert flag in call, f"{where}: {m.group(0)}{call[1:]} lacks {flag}"
        for m in re.finditer(r"pickle", text):
            line = text[text.rfind("\n", 0, m.start()) + 1:text.find("\n", m.start())]
            assert not re.search(r"\bimport\s+(c?pickle|dill|cloudpickle|joblib)|\bpickle\.|Unpickler", line), \
                f"{where}: {line.strip()}"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                bad = [n for n in names if n and n.split(".")[0] in ("pickle", "_pickle", "dill", "cloudpickle",
                                                                     "joblib", "shelve", "marshal")]
                assert not bad, f"{where}:{node.lineno} imports {bad}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "np", "numpy"):
                key, want = ("weights_only", True) if node.func.value.id == "torch" else ("allow_pickle", False)
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get(key), ast.Constant) and kw[key].value is want, f"{where}:{node.lineno}"
                calls["torch.load" if node.func.value.id == "torch" else "np.load"] += 1
    assert calls["torch.load"] >= 4 and calls["np.load"] >= 2  # the check saw the real loaders


# ==================================================================================================
# 5. experiments cache integrity
# ==================================================================================================
PROF = child.table_profile()


def _run(bundle, tmp_path, **kw):
    return experiments.run(bundle, "fp32", profile=PROF, extractor=child.toy_extractor(),
                           reference=child.table_reference(), cache_dir=tmp_path, progress=False, **kw)


def test_stale_cache_entries_are_recomputed_not_served(tmp_path, monkeypatch):
    bundle = tiny_dit(0)
    first = _run(bundle, tmp_path)
    assert not first.cached and _run(bundle, tmp_path).cached
    # the declared numerics changed
    monkeypatch.setattr(experiments, "NUMERICS_VERSION", experiments.NUMERICS_VERSION + 1)
    assert not _run(bundle, tmp_path).cached
    monkeypatch.undo()
    # the model's weights changed
    changed = tiny_dit(0)
    with torch.no_grad():
        changed.transformer.proj_out_2.bias += 1e-3
    assert not _run(changed, tmp_path).cached
    # an entry whose recorded key material does not match its folder (stale, or tampered with)
    result = Path(first.samples).with_name("result.json")
    entry = json.loads(result.read_text())
    entry["material"]["numerics"] = "stale"
    result.write_text(json.dumps(entry))
    again = _run(bundle, tmp_path)
    assert not again.cached and again.metrics == pytest.approx(first.metrics, nan_ok=True)
    # a half-written result (from a writer that was not atomic) is recomputed, not a crash
    result.write_text(result.read_text()[:40])
    assert not _run(bundle, tmp_path).cached and _run(bundle, tmp_path).cached


def test_concurrent_writer_threads_compute_once_and_leave_a_valid_entry(tmp_path):
    bundle = tiny_dit(0)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: _run(bundle, tmp_path), range(4)))
    assert sum(not r.cached for r in results) == 1  # the others waited for the entry, then read it
    assert len({json.dumps(r.metrics, sort_keys=True) for r in results}) == 1
    (folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "result.json", "samples.npz"]
    assert _run(bundle, tmp_path).cached


def test_concurrent_writer_processes_compute_once_and_leave_a_valid_entry(tmp_path, processes):
    procs = [processes.Process(target=child.main, args=(["run_fp32", str(tmp_path), str(tmp_path / "p"), "0"],))
             for _ in range(2)]
    for p in procs:
        p.start()
    child.run_fp32(tmp_path)  # a third writer: this process
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    reports = [json.loads(f.read_text()) for f in tmp_path.glob("*.json")]
    assert len(reports) == 3 and sum(not r["cached"] for r in reports) == 1
    assert len({json.dumps(r["metrics"], sort_keys=True) for r in reports}) == 1
    (folder,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "result.json", "samples.npz"]
    assert child.run_fp32(tmp_path)["cached"]


# ==================================================================================================
# 4. determinism: the same command twice gives bit-identical plans, weights, samples and metrics
# ==================================================================================================
def test_embedded_w4a4_is_bit_identical_across_processes(tmp_path, processes, monkeypatch):
    monkeypatch.setattr(lowbit, "int_mm_fast", _this_cpu_int_mm_fast)  # as in the child: this CPU's path choice
    other = tmp_path / "process"
    proc = processes.Process(target=child.main, args=(["w4a4", str(other), str(tmp_path / "progress"), "0"],))
    proc.start()
    here = tmp_path / "here"
    try:
        child.w4a4(here)  # meanwhile, the same job in this process
    finally:
        proc.join(timeout=300)
    assert proc.exitcode == 0
    plan = json.loads((here / "plan.json").read_text())
    formats = {v[k] for v in plan["layers"].values() for k in ("weight_format", "act_format")}
    assert len(plan["layers"]) == 12 and formats <= {"fp4_e1m2", "fp4_e2m1", "fp4_e3m0"}
    for name in ("plan.json", "metrics.json", "weights.sha256"):
        assert (here / name).read_text() == (other / name).read_text(), name
    with np.load(here / "samples.npz") as a, np.load(other / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    metrics = json.loads((here / "metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and metrics["n_samples"] == 10


# ==================================================================================================
# 1. resume after a kill
# ==================================================================================================
def test_train_embedded_killed_and_resumed_gives_identical_weights(tmp_path, processes):
    ref = tmp_path / "ref"
    child.train(ref)
    work = tmp_path / "killed"
    shutil.copytree(ref / "out" / "proxy", work / "out" / "proxy")  # stage 1 done: the kill hits DiT training
    kill_midway(processes, "train", work, child.TRAIN_STEPS, seed=10, pause=0.1)
    assert not (work / "out" / "transformer").exists() and not (work / "out" / "MANIFEST.json").exists()
    step = int(torch.load(work / "ck" / "train_state.pt", weights_only=True)["step"])  # complete and readable
    assert 1 <= step < child.TRAIN_STEPS
    with CountCalls() as calls:
        child.train(work)  # the same command again
    assert calls.n == child.TRAIN_STEPS - step  # resumed from the checkpoint, not from scratch
    weights = "out/transformer/diffusion_pytorch_model.safetensors"
    assert _sha(work / weights) == _sha(ref / weights)
    m_ref, m_new = (json.loads((d / "out" / "MANIFEST.json").read_text()) for d in (ref, work))
    strip = lambda curve: [row[:2] for row in curve]  # noqa: E731  (drop wall times)
    assert strip(m_new["training"]["loss_curve"]) == strip(m_ref["training"]["loss_curve"])
    assert m_new["files"][weights[4:]]["sha256"] == m_ref["files"][weights[4:]]["sha256"]


def test_write_samples_killed_and_resumed_gives_identical_npz(tmp_path, processes):
    from hqdit_utils.dit.sampling import _load_shard

    ref = tmp_path / "ref"
    ref.mkdir()
    child.samples(ref)
    work = tmp_path / "killed"
    done = kill_midway(processes, "samples", work, child.SAMPLES_CALLS, seed=20)
    shards = sorted((work / "samples.npz.shards").glob("shard_*.npz"))
    assert not (work / "samples.npz").exists() and len(shards) <= done // 4
    labels = torch.arange(child.SAMPLES_N) % 4
    for p in shards:  # whatever carries a final name is complete
        k = int(p.stem.split("_")[1])
        _load_shard(p, 2 * k, 2 * k + 2, labels, (8, 8, 1))
    with CountCalls() as calls:
        child.samples(work)
    assert calls.n == child.SAMPLES_CALLS - 4 * len(shards)
    with np.load(work / "samples.npz", allow_pickle=False) as a, np.load(ref / "samples.npz", allow_pickle=False) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not (work / "samples.npz.shards").exists()


def test_calibration_capture_killed_and_restarted_gives_identical_calibration(tmp_path, processes):
    ref = tmp_path / "ref"
    child.calib(ref)
    work = tmp_path / "killed"
    kill_midway(processes, "calib", work, child.CALIB_CALLS, seed=30)
    assert not list((work / "calibration").glob("*.pt"))  # killed while calibrating: nothing final written
    child.calib(work)
    (a,), (b,) = (list((d / "calibration").glob("*.pt")) for d in (ref, work))
    assert a.name == b.name and (b.with_suffix(".sha256")).read_text().strip() == _sha(b)
    _assert_same_calibration(Calibration.load(a), Calibration.load(b))


def _assert_same_calibration(a: Calibration, b: Calibration) -> None:
    assert a.timesteps == b.timesteps and list(a.layers) == list(b.layers)
    assert {k: v for k, v in a.meta.items() if k != "seconds"} == {k: v for k, v in b.meta.items() if k != "seconds"}
    for name in a.layers:
        for t, sa in a[name].per_timestep.items():
            sb = b[name].per_timestep[t]
            for f in ("count", "absmax", "channel_absmax", "channel_sumsq", "moments", "hist", "rows", "priority",
                      "top_rows"):
                va, vb = getattr(sa, f), getattr(sb, f)
                assert (torch.equal(va, vb) if torch.is_tensor(va) else va == vb), (name, t, f)


def test_run_table_killed_and_resumed_gives_identical_table(tmp_path, processes):
    ref_table = child.table(tmp_path / "ref")
    work = tmp_path / "killed"
    kill_midway(processes, "table", work, child.TABLE_CALLS, seed=40)
    entries = [d for d in work.iterdir() if d.is_dir()]
    finished = [d for d in entries if (d / "result.json").is_file()]
    for d in finished:  # a finished entry is complete and valid
        entry = json.loads((d / "result.json").read_text())
        assert entry["samples_sha256"] == _sha(d / "samples.npz")
    assert len(finished) < len(child.TABLE_RECIPES) * len(child.TABLE_SEEDS)
    experiments._CALIBRATIONS.clear()  # a new process would not have the in-memory calibration either
    with CountCalls() as calls:
        table = child.table(work)
    assert table["cached"].sum() == len(finished)
    cost = {"fp32": 3, "int4-rtn": 6}  # transformer calls of one run (calibration + sampling)
    assert calls.n == sum(cost[r] for r in child.TABLE_RECIPES for _ in child.TABLE_SEEDS) - \
        sum(cost[d.name.split("-s")[0]] for d in finished)  # finished runs were not redone
    cols = [c for c in ref_table.columns if c not in ("seconds", "cached")]
    assert table[cols].equals(ref_table[cols])
    for d in work.iterdir():
        if d.is_dir():
            with np.load(d / "samples.npz") as z1, np.load(tmp_path / "ref" / d.name / "samples.npz") as z2:
                assert np.array_equal(z1["arr_0"], z2["arr_0"])


def test_damaged_shard_and_output_are_recomputed_not_read(tmp_path, capfd):
    """Failure injection: a truncated shard, a shard whose pixels changed, a damaged final output."""
    from hqdit_utils.dit.sampling import write_samples

    out = tmp_path / "keep.npz"
    write_samples(tiny_dit(0), out, child.SAMPLES_N, keep_shards=True, **child.SAMPLES_KW)
    with np.load(out) as z:
        good = z["arr_0"].copy()
    shards = tmp_path / "keep.npz.shards"
    s0, s1 = shards / "shard_00000.npz", shards / "shard_00001.npz"
    s0.write_bytes(s0.read_bytes()[:100])  # truncated
    with np.load(s1) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["arr_0"][0, 0, 0, 0] ^= 1  # one bit flipped, checksum now wrong
    np.savez(s1, **arrays)
    out.unlink()
    with CountCalls() as calls:
        write_samples(tiny_dit(0), out, child.SAMPLES_N, keep_shards=True, **child.SAMPLES_KW)
    assert calls.n == 2 * 4  # exactly the two damaged shards were sampled again
    err = capfd.readouterr().err
    assert "shard_00000.npz is unreadable" in err and "fails its sha256 check" in err
    with np.load(out) as z:
        assert np.array_equal(z["arr_0"], good)
    # a damaged finished output (same protocol) is made again, not returned
    with np.load(out) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["arr_0"][3] = 0
    np.savez(out, **arrays)
    write_samples(tiny_dit(0), out, child.SAMPLES_N, keep_shards=True, **child.SAMPLES_KW)
    assert "does not match the sha256" in capfd.readouterr().err
    with np.load(out) as z:
        assert np.array_equal(z["arr_0"], good)


def test_calibration_cache_without_checksum_or_damaged_is_recomputed(tmp_path, capfd):
    """Failure injection: a calibration file left without its checksum (killed between the two writes),
    a truncated one, and one whose checksum was updated but whose content is not a calibration."""
    child.calib(tmp_path)
    (pt,) = (tmp_path / "calibration").glob("*.pt")
    good = Calibration.load(pt)
    digest = pt.with_suffix(".sha256")
    cases = {"no checksum": lambda: digest.unlink(),
             "truncated": lambda: pt.write_bytes(pt.read_bytes()[:200]),
             "garbage with a matching checksum": lambda: (pt.write_bytes(b"not a zip"), digest.write_text(_sha(pt)))}
    for what, damage in cases.items():
        damage()
        with CountCalls() as calls:
            child.calib(tmp_path)
        assert calls.n == child.CALIB_CALLS, what  # recomputed …
        assert "recomputing" in capfd.readouterr().err, what
        _assert_same_calibration(Calibration.load(pt), good)  # … to the same result
