"""trajectory: per-step local error and drift of a quantized denoiser against FP32."""
import copy
from dataclasses import replace

import pytest
import torch

from hqdit_utils.config import Profile
from hqdit_utils.dit.models import tiny_dit
from hqdit_utils.engine.qmodel import is_quantized
from hqdit_utils.chapters.trajectory import quantized_bundle, trajectory_error

PROF = Profile("test", calib_trajectories=2, calib_timesteps=2, eval_samples=8, sampling_steps=4, seeds=1, batch_size=8)


@pytest.fixture(scope="module")
def bundle():
    return tiny_dit(seed=0)


def test_identical_models_have_zero_error(bundle):
    same = replace(bundle, transformer=copy.deepcopy(bundle.transformer))
    df = trajectory_error(bundle, same, [0, 1, 2], [5, 6, 7], num_steps=4)
    assert list(df["step"]) == [0, 1, 2, 3] and df["timestep"].is_monotonic_decreasing
    assert (df["local error"] == 0).all() and (df["drift"] == 0).all() and df.attrs["final drift"] == 0


def test_quantized_model_errors_and_cache(bundle, tmp_path):
    before = {k: v.clone() for k, v in bundle.transformer.state_dict().items()}
    qb, info = quantized_bundle(bundle, "int4-rtn", profile=PROF, seed=0, cache_dir=tmp_path)
    assert is_quantized(qb.transformer) and not is_quantized(bundle.transformer) and info["cached"] is False
    assert all(torch.equal(v, bundle.transformer.state_dict()[k]) for k, v in before.items())
    df = trajectory_error(bundle, qb, [0, 1, 2, 3], [1, 2, 3, 4], num_steps=4)
    assert (df["local error"] > 0).all() and df.loc[0, "drift"] == 0 and (df["drift"].iloc[1:] > 0).all()
    qb2, info2 = quantized_bundle(bundle, "int4-rtn", profile=PROF, seed=0, cache_dir=tmp_path)
    assert info2["cached"] is True
    df2 = trajectory_error(bundle, qb2, [0, 1, 2, 3], [1, 2, 3, 4], num_steps=4)
    torch.testing.assert_close(torch.tensor(df2["local error"].values), torch.tensor(df["local error"].values))
    fp, info_fp = quantized_bundle(bundle, "fp32", profile=PROF)
    assert info_fp == {} and not is_quantized(fp.transformer)
