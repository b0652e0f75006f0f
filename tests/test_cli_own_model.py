"""The command-line round trip on a researcher's own diffusers folder passed with ``--model``: random
class-conditional DiTs of width 192 (Hadamard order 64 per block) and 156 (= 3 x 52: needs ``--rotation-block``),
saved with ``save_pretrained`` as a user's training run would; and a PixArt folder, which the CLI refuses in
one line that points to the Python API (tested in ``test_own_dit.py``)."""
import json
import math

import numpy as np
import pytest
import torch

from hqdit_utils.commands.cli import main
from hqdit_utils.engine.qlinear import QuantLinear
from hqdit_utils.commands.quantize_cli import load_quantized_folder

TINY_CALIB = ["--trajectories", "1", "--timesteps", "2", "--steps", "2", "--rows-per-timestep", "16"]


def _strict(path):
    def reject(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=reject)


def _one_error_line(capsys, cmd):
    """The one error line of a failed command (after its progress lines), in the house form."""
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(f"hqdit {cmd}: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1] and "Traceback" not in "\n".join(lines), lines
    return errors[0]


def _save_dit(folder, width, seed=0):
    """A pixel-space DiT with the embedded data's shape (16 x 16 x 1, 10 classes), so that ``hqdit evaluate
    --reference embedded --proxy`` applies to its samples; two blocks, two heads."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=width // 2, in_channels=1, out_channels=2,
                                  num_layers=2, sample_size=16, patch_size=2, num_embeds_ada_norm=10,
                                  norm_type="ada_norm_zero").eval()
    model.save_pretrained(folder / "transformer")
    return folder


@pytest.mark.parametrize("width, extra, recipe_name, n_layers", [
    (192, [], "hqdit-w4a4", 12),
    (156, ["--rotation-block", "4"], "hqdit-w4a4-rb4", 12),
])
def test_quantize_sample_evaluate_a_random_dit_folder(width, extra, recipe_name, n_layers, tmp_path, capsys):
    model = _save_dit(tmp_path / f"dit{width}", width)
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(model), "--recipe", "hqdit-w4a4", "--out", str(q), *extra,
                 *TINY_CALIB]) == 0
    run = _strict(q / "run.json")
    assert run["recipe"] == recipe_name and run["model"] == str(model.resolve())
    assert f"quantized {n_layers} layers" in capsys.readouterr().err

    bundle, tag = load_quantized_folder(q)  # the folder's own record says which model to load
    layers = [m for m in bundle.transformer.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == n_layers and all(m.weight is None for m in layers)  # packed codes, not FP32 weights
    assert bundle.transformer.config.num_attention_heads * bundle.transformer.config.attention_head_dim == width

    out = tmp_path / "s.npz"
    assert main(["sample", "--quantized", str(q), "--out", str(out), "--n", "6", "--steps", "2", "--batch-size", "6",
                 "--no-progress"]) == 0
    with np.load(out, allow_pickle=False) as z:
        assert z["arr_0"].shape == (6, 16, 16, 1) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].shape == (6,) and set(z["arr_1"].tolist()) <= set(range(10))
    assert tag in _strict(tmp_path / "s.json")["spec"]["tag"]
    capsys.readouterr()
    assert main(["evaluate", str(out), "--reference", "embedded", "--proxy", "--json", str(tmp_path / "m.json")]) == 0
    report = _strict(tmp_path / "m.json")
    assert report["n_samples"] == 6 and math.isfinite(report["fid"])


def test_width_156_without_a_rotation_block_names_the_cli_flag(tmp_path, capsys):
    model = _save_dit(tmp_path / "dit156", 156)
    assert main(["quantize", "--model", str(model), "--recipe", "hqdit-w4a4", "--out", str(tmp_path / "q"),
                 *TINY_CALIB]) == 2
    err = capsys.readouterr().err
    assert "[hqdit quantize] calibrated" not in err  # refused before the (long) calibration
    line = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert line.startswith("hqdit quantize: error: layer 'transformer_blocks.0.attn1.to_q' (in_features=156)")
    assert "--rotation-block 52" in line
    assert not (tmp_path / "q" / "run.json").exists()  # nothing half-written that looks finished


def test_a_pixart_folder_is_refused_with_the_api_route(tmp_path, capsys):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=1,
                             sample_size=8, patch_size=2, cross_attention_dim=64,
                             caption_channels=48).save_pretrained(tmp_path / "pixart" / "transformer")
    assert main(["quantize", "--model", str(tmp_path / "pixart"), "--recipe", "hqdit-w4a4",
                 "--out", str(tmp_path / "q")]) == 2
    line = _one_error_line(capsys, "quantize")
    assert "holds a PixArtTransformer2DModel" in line and "calibrate(transformer, conditioning=...)" in line
    assert "download" not in line  # the old message blamed a corrupted download
