"""Your own DiT (issue 17, API half): bare diffusers transformers (DiT of width 192 and 156, a tiny PixArt, any
transformer through ``conditioning=``) → calibrate → quantize_ → finite outputs, with autograd, in bf16, after
``.to()``; and every misuse answered by one message that says what to do."""
import copy
import warnings

import pytest
import torch

from hqdit_utils.engine.calibration import CalibrationError, calibrate
from hqdit_utils.dit.models import as_bundle, tiny_dit
from hqdit_utils.engine.qlinear import QuantLinear
from hqdit_utils.engine.qmodel import QuantizationError, quantize_
from hqdit_utils.engine.recipes import get_recipe

CALIB = dict(num_trajectories=2, num_timesteps=2, num_steps=3, rows_per_timestep=16)
RECIPE = get_recipe("hqdit-w4a4").replace(clip_grid=(10, 0.3, 1.0))


def _dit(width: int, heads: int, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4,
                                 out_channels=8, num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                 norm_type="ada_norm_zero").eval()


def _pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                    num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=64,
                                    caption_channels=48).eval()


def _run(model, dtype=torch.float32):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
    return model(x, timestep=torch.tensor([3, 3]), class_labels=torch.tensor([0, 1])).sample


@pytest.fixture(scope="module")
def dit192():
    return _dit(192, 2)


@pytest.fixture(scope="module")
def calib192(dit192):
    return calibrate(dit192, **CALIB)


def _n_quant(model):
    return sum(isinstance(m, QuantLinear) for m in model.modules())


# -- bare transformers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,heads,recipe", [(192, 2, RECIPE), (192, 3, RECIPE),
                                                (156, 3, RECIPE.replace(rotation_block=52))])
def test_bare_dit_calibrates_and_quantizes(width, heads, recipe):
    """A bare DiTTransformer2DModel needs no DiTBundle (it failed with "no attribute 'scheduler'")."""
    model = _dit(width, heads)
    calib = calibrate(model, **CALIB)
    assert calib.meta["cfg_scale"] == 1.5  # a DiT has a null class: guided trajectories
    quantize_(model, recipe, calib)
    assert _n_quant(model) == 6
    with torch.no_grad():
        assert torch.isfinite(_run(model)).all()


def test_bare_pixart_calibrates_and_quantizes():
    """PixArt failed with "unexpected keyword argument 'class_labels'": it gets random captions instead."""
    model = _pixart()
    calib = calibrate(model, **CALIB)
    assert calib.meta["cfg_scale"] == 1.0  # no null class: no guidance
    assert "transformer_blocks.0.ff.net.2" in calib
    quantize_(model, RECIPE, calib)
    cond = as_bundle(_pixart()).conditioning(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 3]), **cond).sample
    assert _n_quant(model) == 6 and torch.isfinite(out).all()


def test_any_transformer_through_the_conditioning_adapter():
    """A transformer of a kind calibrate does not know needs `conditioning=`, and works with it."""
    from diffusers import PixArtTransformer2DModel

    class MyTransformer(PixArtTransformer2DModel):
        pass

    torch.manual_seed(0)
    model = MyTransformer(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=1,
                          sample_size=8, patch_size=2, cross_attention_dim=64, caption_channels=48).eval()
    with pytest.raises(TypeError, match="pass conditioning=callable"):
        calibrate(model, **CALIB)
    calls = []

    def conditioning(batch_size, generator):
        calls.append(batch_size)
        return {"encoder_hidden_states": torch.randn(batch_size, 3, 48, generator=generator),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    calib = calibrate(model, conditioning=conditioning, **CALIB)
    assert calls == [2] and len(calib.unique()) == 4  # to_q/k/v share one record


def test_bf16_model_calibrates_and_its_quantized_forward_is_finite():
    model = _dit(192, 2).to(torch.bfloat16)
    calib = calibrate(model, **CALIB)
    quantize_(model, RECIPE, calib)
    with torch.no_grad():
        out = _run(model, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantized_model_backward_with_grad_enabled(dit192, calib192, dtype):
    """Forward and backward outside torch.no_grad() (the rotation once used out= ops, which autograd refuses)."""
    model = copy.deepcopy(dit192)
    quantize_(model, RECIPE, calib192)
    model = model.to(dtype)
    x = torch.randn(2, 4, 8, 8, dtype=dtype, requires_grad=True)
    out = model(x, timestep=torch.tensor([3, 3]), class_labels=torch.tensor([0, 1])).sample
    out.float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_to_dtype_moves_the_quantizer_and_keeps_outputs_close(dit192, calib192):
    model = copy.deepcopy(dit192)
    quantize_(model, get_recipe("fp4-hybrid").replace(clip_grid=(10, 0.3, 1.0)), calib192)
    with torch.no_grad():
        ref = _run(model)
        out64 = _run(model.double(), torch.float64)
        ql = model.transformer_blocks[0].attn1.to_q
        assert ql.weight.dtype == torch.float64 and ql.act_scale.dtype == torch.float32
        torch.testing.assert_close(out64.float(), ref, rtol=1e-4, atol=1e-4)
        out16 = _run(model.to(torch.bfloat16), torch.bfloat16)
        assert ql.weight.dtype == torch.bfloat16 and ql.act_scale.dtype == torch.float32  # the scale is not rounded
        assert (out16.float() - ref).abs().max() < 0.05 * ref.abs().max()
        back = _run(model.float())
        assert (back - ref).abs().max() < 0.05 * ref.abs().max()


# -- misuse: one message that says what to do ------------------------------------------------------------------
def test_pipeline_or_bundle_passed_to_quantize_says_pass_the_transformer(calib192):
    bundle = tiny_dit(0, width=72)

    class Pipeline:  # what matters about a diffusers pipeline here: not a module, holds .transformer
        transformer = bundle.transformer
    for wrong in (bundle, Pipeline()):
        with pytest.raises(QuantizationError, match=r"pass pipe\.transformer / bundle\.transformer"):
            quantize_(wrong, RECIPE, calib192)


def test_swapped_arguments_are_named(dit192, calib192):
    with pytest.raises(QuantizationError, match=r"the arguments are swapped; call quantize_\(model, recipe, "
                                                r"calibration\)"):
        quantize_(copy.deepcopy(dit192), calib192, RECIPE)


def test_calibration_of_another_shape_is_refused_before_any_swap(calib192):
    model = _dit(128, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match=r"layer 'transformer_blocks\.0\.attn1\.to_q' is \[128 x 128\] "
                                               r"\(out x in\) here, \[192 x 192\] in the calibration"):
        quantize_(model, RECIPE, calib192)
    assert _n_quant(model) == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_calibration_of_other_weights_warns(calib192):
    with pytest.warns(UserWarning, match="recorded on a model with other weights"):
        quantize_(_dit(192, 2, seed=1), RECIPE, calib192)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(_dit(192, 2, seed=0), RECIPE, calib192)  # the model it was recorded on: silent


def test_unsupported_hadamard_width_names_the_layer_and_the_recipe_field():
    model = _dit(156, 3)
    calib = calibrate(model, **CALIB)
    for recipe in (RECIPE, RECIPE.replace(rotation_block=64)):
        with pytest.raises(QuantizationError, match=r"layer 'transformer_blocks\.0\.attn1\.to_q' \(in_features=156\)"
                                                    r".*set the recipe field rotation_block, e\.g\. "
                                                    r"recipe\.replace\(rotation_block=52\)"):
            quantize_(model, recipe, calib)
    assert _n_quant(model) == 0


def test_quantized_model_deepcopies_after_a_forward_with_grad(dit192, calib192):
    """The shared to_q/to_k/to_v input on the integer path was keyed on a fresh view per call, so it was never
    reused and kept the last input (with its autograd graph) alive: deepcopy then failed."""
    model = copy.deepcopy(dit192)
    quantize_(model, RECIPE, calib192)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    model(x, timestep=torch.tensor([3, 3]), class_labels=torch.tensor([0, 1])).sample.sum().backward()
    shared = model.transformer_blocks[0].attn1.to_q.shared
    assert shared.x is None  # released after its three readers
    copy.deepcopy(model)
