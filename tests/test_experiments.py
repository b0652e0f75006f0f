"""experiments.run: end to end on a tiny random DiT, cache hits, stale-cache detection, paired seeds."""
import numpy as np
import pytest
import torch

from hqdit_utils.config import Profile
from hqdit_utils.experiments import run, run_table, sample_plan, summarize
from hqdit_utils.models import tiny_dit

PROF = Profile("test", calib_trajectories=2, calib_timesteps=2, eval_samples=8, sampling_steps=3, seeds=2, batch_size=8)



@pytest.fixture(scope="module")
def bundle():
    return tiny_dit(seed=0)


@pytest.fixture
def reference():
    return np.random.default_rng(0).integers(0, 256, size=(16, 8, 8, 1), dtype=np.uint8)


def test_run_is_cached_and_leaves_the_model_untouched(bundle, reference, tmp_path, toy_extractor):
    before = {k: v.clone() for k, v in bundle.transformer.state_dict().items()}
    r1 = run(bundle, "int4-rtn", profile=PROF, extractor=toy_extractor, reference=reference, cache_dir=tmp_path, progress=False)
    assert not r1.cached and r1.quant["layers"] > 0 and "FID*" in r1.metrics
    assert all(torch.equal(v, bundle.transformer.state_dict()[k]) for k, v in before.items())
    r2 = run(bundle, "int4-rtn", profile=PROF, extractor=toy_extractor, reference=reference, cache_dir=tmp_path, progress=False)
    assert r2.cached
    np.testing.assert_equal(r2.metrics, r1.metrics)  # NaN-aware (the toy network has no spatial map)


def test_corrupted_cache_entry_is_recomputed(bundle, reference, tmp_path, toy_extractor):
    r1 = run(bundle, "fp32", profile=PROF, extractor=toy_extractor, reference=reference, cache_dir=tmp_path, progress=False)
    with open(r1.samples, "ab") as f:
        f.write(b"garbage")
    r2 = run(bundle, "fp32", profile=PROF, extractor=toy_extractor, reference=reference, cache_dir=tmp_path, progress=False)
    assert not r2.cached  # recomputed …
    np.testing.assert_equal(r2.metrics, r1.metrics)  # … and deterministic


def test_fp32_recipe_reproduces_plain_sampling(bundle, reference, tmp_path, toy_extractor):
    from hqdit_utils.sampling import sample

    r = run(bundle, "fp32", profile=PROF, extractor=toy_extractor, reference=reference, cache_dir=tmp_path, progress=False)
    labels, seeds = sample_plan(bundle.num_classes, PROF.eval_samples, 0)
    direct = sample(bundle, labels, num_steps=PROF.sampling_steps, cfg_scale=1.5, seeds=seeds, progress=False)
    assert np.array_equal(np.load(r.samples, allow_pickle=False)["arr_0"], direct.numpy())


def test_every_recipe_sees_the_same_labels_and_seeds_for_a_seed():
    a, b = sample_plan(10, 5, seed=1), sample_plan(10, 5, seed=1)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert set(sample_plan(10, 5, seed=0)[1]).isdisjoint(sample_plan(10, 5, seed=1)[1])


def test_run_table_and_summary(bundle, reference, tmp_path, toy_extractor):
    df = run_table(bundle, ["fp32", "int4-rtn"], profile=PROF, extractor=toy_extractor, reference=reference,
                   cache_dir=tmp_path, progress=False)
    assert list(df["recipe"]) == ["fp32", "fp32", "int4-rtn", "int4-rtn"] and list(df["seed"]) == [0, 1, 0, 1]
    s = summarize(df)
    assert list(s.index) == ["fp32", "int4-rtn"] and " ± " in s.loc["fp32", "FID*"] and s.loc["fp32", "seeds"] == 2
