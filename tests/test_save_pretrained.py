"""Issue 32: the diffusers round trip of a quantized transformer cannot break silently, and every load checks
identity (weight fingerprints) and integrity (every file's sha256 in MANIFEST.json)."""
import copy
import json
import warnings

import pytest
import torch

from hqdit_utils import load_quantized
from hqdit_utils.engine.calibration import calibrate
from hqdit_utils.files import MANIFEST
from hqdit_utils.engine.qlinear import QuantLinear
from hqdit_utils.engine.qmodel import QuantizationError, folder_tag, quantize_, save_quantized
from hqdit_utils.engine.recipes import get_recipe

CALIB = dict(num_trajectories=2, num_timesteps=2, num_steps=3, rows_per_timestep=16)
X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
ARGS = dict(timestep=torch.tensor([5, 5]), class_labels=torch.tensor([0, 1]))


def _dit(seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                 num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                 norm_type="ada_norm_zero").eval()


@torch.no_grad()
def _out(m):
    return m(X, **ARGS).sample


@pytest.fixture(scope="module")
def fp32():
    return _dit()


@pytest.fixture(scope="module")
def calib(fp32):
    return calibrate(fp32, **CALIB)


def _quantized(fp32, calib, recipe="hqdit-w4a4"):
    q = copy.deepcopy(fp32)
    quantize_(q, get_recipe(recipe).replace(clip_grid=(10, 0.3, 1.0)), calib)
    return q


@pytest.mark.parametrize("recipe", ["hqdit-w4a4", "hqdit-no-rotation"])
def test_save_pretrained_reloads_bit_for_bit_and_plain_from_pretrained_refuses(fp32, calib, recipe, tmp_path):
    """Before issue 32, save_pretrained wrote the rotated weights as a plain model that from_pretrained loaded
    silently (error 0.32 vs FP32), or, without rotation, one that silently dropped activation quantization."""
    from diffusers import DiTTransformer2DModel

    q = _quantized(fp32, calib, recipe)
    q.save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="hqdit_utils.load_quantized"):
        DiTTransformer2DModel.from_pretrained(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["quantization_config"]["recipe"].startswith(recipe)
    reloaded = load_quantized(tmp_path / "t")
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == 6
    assert torch.equal(_out(reloaded), _out(q))  # activation quantization included: ≠ FP32 below
    assert not torch.allclose(_out(reloaded), _out(fp32), atol=1e-4)
    reloaded.save_pretrained(tmp_path / "again")  # a reloaded model saves the same way
    assert torch.equal(_out(load_quantized(tmp_path / "again")), _out(q))


def test_pipeline_save_pretrained_goes_through_hqdit(fp32, calib, tmp_path):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    q = _quantized(fp32, calib)
    pipe = DiTPipeline(transformer=q, vae=_tiny_vae(), scheduler=DDIMScheduler())
    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="hqdit_utils.load_quantized"):
        DiTTransformer2DModel.from_pretrained(tmp_path / "pipe", subfolder="transformer")
    again = DiTPipeline.from_pretrained(tmp_path / "pipe", transformer=load_quantized(tmp_path / "pipe" / "transformer"))
    assert torch.equal(_out(again.transformer), _out(q))


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         layers_per_block=1, norm_num_groups=4, sample_size=8).eval()


def test_load_quantized_swapped_or_wrong_folder_is_one_line(fp32, calib, tmp_path):
    q = _quantized(fp32, calib)
    save_quantized(q, tmp_path / "q")
    q.save_pretrained(tmp_path / "p")
    for call, match in ((lambda: load_quantized(tmp_path / "q", copy.deepcopy(fp32)), "swapped"),
                        (lambda: load_quantized(str(tmp_path / "q")), "load_quantized\\(model"),
                        (lambda: load_quantized(copy.deepcopy(fp32), tmp_path / "p"), "without a model")):
        with pytest.raises(QuantizationError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


# -- integrity: every file hashed ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["packed_weights.safetensors", "quant_state.safetensors", "quant_config.json"])
def test_a_flipped_byte_in_any_file_is_one_line_naming_it(fp32, calib, tmp_path, name):
    q = _quantized(fp32, calib)
    folder = save_quantized(q, tmp_path / "q", packed=True)
    tag = folder_tag(folder)
    load_quantized(copy.deepcopy(fp32), folder)  # intact: loads
    f = folder / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    assert folder_tag(folder) == tag or name == MANIFEST  # the tag hashes the manifest…
    with pytest.raises(QuantizationError, match=f"{name} fails its sha256 check") as err:
        load_quantized(copy.deepcopy(fp32), folder)  # …and the manifest every file
    assert "\n" not in str(err.value)


def test_the_tag_covers_every_file(fp32, calib, tmp_path):
    folder = save_quantized(_quantized(fp32, calib), tmp_path / "q", packed=True)
    before = folder_tag(folder)
    (folder / "packed_weights.safetensors").write_bytes((folder / "packed_weights.safetensors").read_bytes() + b"x")
    from hqdit_utils.files import write_manifest
    write_manifest(folder)
    assert folder_tag(folder) != before


def test_a_folder_without_manifest_loads_with_a_warning(fp32, calib, tmp_path):
    q = _quantized(fp32, calib)
    folder = save_quantized(q, tmp_path / "q")
    (folder / MANIFEST).unlink()  # as written before issue 32
    with pytest.warns(UserWarning, match="no MANIFEST.json"):
        m = load_quantized(copy.deepcopy(fp32), folder)
    assert torch.equal(_out(m), _out(q))
    assert "state file only" in folder_tag(folder)


# -- identity: the base model's weights ----------------------------------------------------------------------
def test_loading_into_a_model_of_other_weights_warns_as_quantize_does(fp32, calib, tmp_path):
    folder = save_quantized(_quantized(fp32, calib), tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_quantized(copy.deepcopy(fp32), folder)  # the same model: silent
    with pytest.warns(UserWarning, match="quantized state was made from a model with other weights"):
        load_quantized(_dit(seed=1), folder)
    with pytest.warns(UserWarning, match="calibration was recorded on a model with other weights"):
        quantize_(_dit(seed=1), get_recipe("hqdit-w4a4").replace(clip_grid=(10, 0.3, 1.0)), calib)
