"""The ``hqdit`` command line end to end on the embedded model — quantize → sample --quantized → evaluate
--reference embedded — and every expected error as one line ``hqdit <cmd>: error: … (…)`` with exit code 2."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hqdit_utils.commands.cli import main
from hqdit_utils.files import strict_json
from hqdit_utils.engine.qlinear import QuantLinear

ROOT = Path(__file__).resolve().parent.parent
TINY_CALIB = ["--trajectories", "1", "--timesteps", "2", "--steps", "2", "--rows-per-timestep", "16"]


def _reject_constant(name):
    raise ValueError(f"non-strict JSON constant {name}")


def strict_load(path):
    return json.loads(Path(path).read_text(), parse_constant=_reject_constant)


def one_error_line(capsys, cmd, fix_in_parentheses=True):
    """The stderr of a failed command: exactly one line, in the house form; returns it."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"hqdit {cmd}: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert "Traceback" not in "\n".join(lines)
    assert errors[0].endswith(")") or not fix_in_parentheses, errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "q"
    assert main(["quantize", "--recipe", "hqdit-w4a4", "--out", str(out), "--rotation-block", "16",
                 *TINY_CALIB]) == 0
    return out


def test_quantize_writes_packed_weights_plan_report_and_strict_json(quantized):
    for f in ("packed_weights.safetensors", "quant_state.safetensors", "plan.json", "report.csv", "run.json",
              "quant_config.json"):
        assert (quantized / f).is_file(), f
    run = strict_load(quantized / "run.json")
    assert run["recipe"] == "hqdit-w4a4-rb16" and run["model"] == "embedded"
    assert strict_load(quantized / "quant_config.json")["recipe_fields"]["rotation_block"] == 16
    strict_load(quantized / "plan.json")


def test_quantize_shows_each_stage_with_its_time(tmp_path, capsys):
    assert main(["quantize", "--recipe", "fp32", "--out", str(tmp_path / "q")]) == 0
    err = capsys.readouterr().err
    for stage in ("loaded", "no calibration needed", "quantized 36 layers", "saved to"):
        assert f"[hqdit quantize] {stage}" in err
    run = strict_load(tmp_path / "q" / "run.json")  # fp32: every SQNR is infinite -> null
    assert run["summary"]["weight_sqnr"] is None


def test_sample_quantized_folder_then_evaluate_embedded(quantized, tmp_path, capsys, monkeypatch):
    from hqdit_utils.commands import quantize_cli

    bundle, tag = quantize_cli.load_quantized_folder(quantized)
    layers = [m for m in bundle.transformer.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 36 and all(m.weight is None for m in layers)  # weights come from the packed codes
    assert tag.startswith("quantized hqdit-w4a4-rb16 sha256 ")
    out = tmp_path / "s.npz"
    assert main(["sample", "--quantized", str(quantized), "--out", str(out), "--n", "8", "--steps", "3",
                 "--batch-size", "8", "--no-progress"]) == 0
    with np.load(out) as z:
        assert z["arr_0"].shape == (8, 16, 16, 1) and z["arr_0"].dtype == np.uint8
    assert tag in strict_load(tmp_path / "s.json")["spec"]["tag"]
    capsys.readouterr()
    assert main(["evaluate", str(out), "--reference", "embedded", "--proxy", "--json", str(tmp_path / "m.json")]) == 0
    assert "FID*" in capsys.readouterr().out
    report = strict_load(tmp_path / "m.json")
    assert report["n_reference"] == 360 and report["n_samples"] == 8 and math.isfinite(report["fid"])


def test_sample_compile_runs_the_compiled_model_under_its_own_tag(quantized, tmp_path):
    """--compile samples through torch.compile; the spec's tag says so, so compiled and eager shards (which differ
    by float rounding) are never taken for one run."""
    out = tmp_path / "c.npz"
    assert main(["sample", "--quantized", str(quantized), "--out", str(out), "--n", "4", "--steps", "2",
                 "--batch-size", "4", "--no-progress", "--compile"]) == 0
    with np.load(out) as z:
        assert z["arr_0"].shape == (4, 16, 16, 1) and z["arr_0"].dtype == np.uint8
    tag = strict_load(tmp_path / "c.json")["spec"]["tag"]
    assert tag.startswith("quantized hqdit-w4a4-rb16 sha256 ") and tag.endswith(" compiled")


def test_strict_json_writes_null_for_nan_and_inf():
    text = strict_json({"a": float("nan"), "b": [float("inf"), np.float32("-inf")], "c": np.float64(1.5), "d": 2})
    assert json.loads(text, parse_constant=_reject_constant) == {"a": None, "b": [None, None], "c": 1.5, "d": 2}


# -------------------------------------------------------------------------------------- one-line errors
def test_quantize_refuses_a_non_empty_folder_without_force(quantized, capsys):
    before = (quantized / "run.json").read_text()
    assert main(["quantize", "--recipe", "fp32", "--out", str(quantized)]) == 2
    line = one_error_line(capsys, "quantize")
    assert "is not empty" in line and "--force" in line
    assert (quantized / "run.json").read_text() == before


def test_quantize_force_overwrites(tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert main(["quantize", "--recipe", "fp32", "--out", str(out), "--force"]) == 0
    assert strict_load(out / "run.json")["recipe"] == "fp32"


@pytest.mark.parametrize("argv, cmd, needle", [
    (["quantize", "--recipe", "hqdit-w4a4", "--out", "{tmp}/q", "--device", "cuda"], "quantize", "--device cpu"),
    (["sample", "--out", "{tmp}/s.npz", "--device", "cuda"], "sample", "--device cpu"),
    (["evaluate", "{tmp}/s.npz", "--reference", "embedded", "--proxy", "--device", "cuda"], "evaluate", "--device cpu"),
    (["reproduce", "--weights", "{tmp}/w.pt", "--device", "cuda", "--dry-run"], "reproduce", "--device cpu"),
])
def test_cuda_unavailable(argv, cmd, needle, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (tmp_path / "s.npz").write_bytes(b"")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert needle in one_error_line(capsys, cmd)


@pytest.mark.parametrize("argv, cmd, needle", [
    (["quantize", "--recipe", "nope", "--out", "{tmp}/q"], "quantize", "unknown recipe 'nope'"),
    (["quantize", "--recipe", "fp32"], "quantize", "--recipe and --out are required"),
    (["quantize", "--recipe", "fp32", "--out", "{tmp}/q", "--rotation-block", "16"], "quantize", "has no Hadamard"),
    (["quantize", "--recipe", "hqdit-w4a4", "--out", "{tmp}/q", "--rotation-block", "7"], "quantize",
     "no Hadamard matrix"),
    (["quantize", "--recipe", "hqdit-w4a4", "--out", "{tmp}/q", "--rotation-block", "52"], "quantize",
     "layer 'transformer_blocks.0.attn1.to_q' (in_features=144): recipe 'hqdit-w4a4-rb52' rotates with "
     "rotation_block=52, which does not fit (block size 52 must divide n = 144)"),
    (["quantize", "--recipe", "fp32", "--out", "{tmp}/q", "--model", "{tmp}/none"], "quantize",
     "(from --model) does not exist (pass --model PATH or set $HQDIT_DIT_WEIGHTS"),
    (["sample", "--quantized", "{tmp}/none", "--out", "{tmp}/s.npz"], "sample", "is not a folder"),
    (["sample", "--out", "{tmp}/s.png"], "sample", "must end in .npz"),
    (["sample", "--out", "{tmp}/s.npz", "--n", "0"], "sample", "--n must be a positive integer"),
    (["evaluate", "{tmp}/none.npz", "--reference", "embedded", "--proxy"], "evaluate", "not found"),
    (["evaluate", "{tmp}/s.npz", "--reference", "embedded"], "evaluate", "add --proxy"),
    (["evaluate", "{tmp}/s.npz", "--reference", "{tmp}/r.npz", "--proxy"], "evaluate", "reference batch"),
    (["evaluate", "{tmp}/s.npz", "--reference", "embedded", "--proxy-path", "{tmp}"], "evaluate", "needs --proxy"),
    (["reproduce", "--samples", "8"], "reproduce", "pass --weights PATH or set $HQDIT_DIT_WEIGHTS"),
    (["sample", "--out", "{tmp}/s.npz", "--steps", "2000"], "sample",
     "--steps 2000 exceeds the 1000 timesteps the model was trained with (pass --steps 1000 or fewer)"),
    (["reproduce", "--weights", "{tmp}/w.pt", "--samples", "8"], "reproduce",
     "(from --weights) does not exist (pass --weights PATH"),
    (["sample", "--bogus-flag", "--out", "x.npz"], "", "unrecognized arguments"),
    (["quantize", "--rotation-block", "x"], "quantize", "invalid int value"),
])
def test_expected_errors_are_one_line(argv, cmd, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HQDIT_DIT_WEIGHTS", raising=False)
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 16, 16, 1), np.uint8))
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert needle in one_error_line(capsys, cmd) if cmd else needle in capsys.readouterr().err


def test_weights_variable_is_honoured_and_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HQDIT_DIT_WEIGHTS", str(tmp_path / "from-env"))
    assert main(["reproduce", "--samples", "8"]) == 2
    line = one_error_line(capsys, "reproduce")
    assert "from-env (from $HQDIT_DIT_WEIGHTS) does not exist" in line
    assert main(["sample", "--out", str(tmp_path / "s.npz")]) == 2
    assert "(from $HQDIT_DIT_WEIGHTS)" in one_error_line(capsys, "sample")


def test_a_multi_line_package_error_becomes_one_line(tmp_path, capsys):
    """load_dit's message for a folder without weights spans lines (download help); the CLI joins them."""
    (tmp_path / "m").mkdir()
    assert main(["quantize", "--recipe", "fp32", "--out", str(tmp_path / "q"), "--model", str(tmp_path / "m")]) == 2
    line = one_error_line(capsys, "quantize", fix_in_parentheses=False)
    assert "no transformer config.json" in line and "huggingface-cli download" in line


def test_damaged_quantized_folder(quantized, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    data = (bad / "packed_weights.safetensors").read_bytes()
    (bad / "packed_weights.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["sample", "--quantized", str(bad), "--out", str(tmp_path / "s.npz")]) == 2
    assert "re-create it with" in one_error_line(capsys, "sample")
    (bad / "run.json").write_text("{not json")
    assert main(["sample", "--quantized", str(bad), "--out", str(tmp_path / "s.npz")]) == 2
    assert "run.json is damaged" in one_error_line(capsys, "sample")
    (bad / "run.json").unlink()
    assert main(["sample", "--quantized", str(bad), "--out", str(tmp_path / "s.npz")]) == 2
    assert "pass --model SOURCE" in one_error_line(capsys, "sample")
    (bad / "quant_state.safetensors").unlink()
    assert main(["sample", "--quantized", str(bad), "--model", "embedded", "--out", str(tmp_path / "s.npz")]) == 2
    assert "quant_state.safetensors not found" in one_error_line(capsys, "sample")


def test_the_command_in_a_process_exits_2_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, "-m", "hqdit_utils.commands.cli", "sample", "--quantized", str(tmp_path / "none"),
                          "--out", str(tmp_path / "s.npz")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"hqdit sample: error: --quantized {tmp_path / 'none'} is not a folder (create one with hqdit quantize "
        f"--recipe NAME --out {tmp_path / 'none'})"]


def test_unknown_profile_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HQDIT_PROFILE", "fast")
    assert main(["quantize", "--recipe", "hqdit-w4a4", "--out", str(tmp_path / "q")]) == 2
    assert "unknown $HQDIT_PROFILE 'fast': choose one of ['book', 'ci', 'full']" in one_error_line(capsys, "quantize")


def test_a_quantized_folder_as_model_points_to_quantized(quantized, tmp_path, capsys):
    assert main(["sample", "--model", str(quantized), "--out", str(tmp_path / "s.npz")]) == 2
    line = one_error_line(capsys, "sample")
    assert "is a quantized-model folder" in line and f"use hqdit sample --quantized {quantized}" in line
    assert "download" not in line


def _other_weights_folder(path, in_channels=None):
    """The embedded model's architecture with other weights (or a tiny 4-channel latent model), as a folder."""
    import torch

    from hqdit_utils.dit.models import load_dit, tiny_dit

    if in_channels:
        b = tiny_dit(0, in_channels=in_channels)
    else:
        b = load_dit("embedded")
        with torch.no_grad():
            for p in b.transformer.parameters():
                p.add_(0.01 * torch.randn_like(p))
    b.transformer.save_pretrained(path / "transformer")
    b.scheduler.save_pretrained(path / "scheduler")
    return path


def test_sample_quantized_into_other_weights_warns_and_the_tag_covers_every_file(quantized, tmp_path, capsys):
    from hqdit_utils.engine.qmodel import folder_tag

    other = _other_weights_folder(tmp_path / "other")
    out = tmp_path / "s.npz"
    assert main(["sample", "--quantized", str(quantized), "--model", str(other), "--out", str(out), "--n", "2",
                 "--steps", "2", "--batch-size", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "[hqdit] warning: the quantized state was made from a model with other weights" in err
    assert folder_tag(quantized) in json.loads(out.with_suffix(".json").read_text())["spec"]["tag"]
    assert "MANIFEST" not in folder_tag(quantized)  # hqdit quantize writes one, covering run.json too
    assert "run.json" in strict_load(quantized / "MANIFEST.json")["files"]


def test_latents_without_vae_are_written_with_a_warning(tmp_path, capsys):
    model = _other_weights_folder(tmp_path / "m", in_channels=4)
    assert main(["sample", "--model", str(model), "--out", str(tmp_path / "s.npz"), "--n", "2", "--steps", "2",
                 "--batch-size", "2", "--no-progress"]) == 0
    assert "4-channel latents are written as the images" in capsys.readouterr().err
