"""experiments: run end to end on a tiny random DiT, cache hits, stale-cache detection, paired seeds; cached
calibrations; cache keys by dependency."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hqdit_utils.runs import experiments
from hqdit_utils.config import Profile
from hqdit_utils.runs.experiments import run, run_table, sample_plan, summarize
from hqdit_utils.dit.models import tiny_dit

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


def _ship(cache: Path, shipped: Path) -> Path:
    """Move the one finished run of ``cache/`` into ``shipped/`` as ``make book-results`` does; its folder."""
    (folder,) = [d for d in cache.iterdir() if d.is_dir()]
    shipped.mkdir()
    shutil.copytree(folder, shipped / folder.name, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(cache)
    return shipped / folder.name


def test_a_shipped_run_is_adopted_only_when_its_key_material_matches(bundle, reference, tmp_path, toy_extractor,
                                                                      monkeypatch):
    kw = dict(profile=PROF, extractor=toy_extractor, reference=reference, progress=False)
    made = run(bundle, "int4-rtn", cache_dir=tmp_path / "a", **kw)
    entry = _ship(tmp_path / "a", tmp_path / "shipped")

    def no_compute(*a, **k):
        raise AssertionError("computed although a matching shipped run exists")
    with monkeypatch.context() as m:
        m.setattr(experiments, "_compute", no_compute)
        adopted = run(bundle, "int4-rtn", cache_dir=tmp_path / "b", shipped_dir=tmp_path / "shipped", **kw)
        again = run(bundle, "int4-rtn", cache_dir=tmp_path / "b", shipped_dir=None, **kw)  # now in the cache
    assert adopted.cached and adopted.shipped and again.shipped
    np.testing.assert_equal(adopted.metrics, made.metrics)
    assert adopted.samples.startswith(str(tmp_path / "b"))  # the copy, not the path it was made at
    np.testing.assert_array_equal(np.load(adopted.samples)["arr_0"], np.load(entry / "samples.npz")["arr_0"])

    # another seed, another recipe or protocol has another key: computed, never served from the shipped run
    other = run(bundle, "int4-rtn", seed=1, cache_dir=tmp_path / "c", shipped_dir=tmp_path / "shipped", **kw)
    assert not other.cached and not other.shipped
    # a shipped entry whose material was edited (e.g. results made by other code), or whose samples are
    # damaged, is not adopted
    original = (entry / "result.json").read_text()
    stored = json.loads(original)
    stored["material"]["numerics"] = -1
    (entry / "result.json").write_text(json.dumps(stored))
    assert not run(bundle, "int4-rtn", cache_dir=tmp_path / "d", shipped_dir=tmp_path / "shipped", **kw).cached
    (entry / "result.json").write_text(original)
    assert run(bundle, "int4-rtn", cache_dir=tmp_path / "e", shipped_dir=tmp_path / "shipped", **kw).shipped
    with open(entry / "samples.npz", "ab") as f:
        f.write(b"garbage")
    late = run(bundle, "int4-rtn", cache_dir=tmp_path / "f", shipped_dir=tmp_path / "shipped", **kw)
    assert not late.cached and not late.shipped


def test_fp32_recipe_reproduces_plain_sampling(bundle, reference, tmp_path, toy_extractor):
    from hqdit_utils.dit.sampling import sample

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


# --- cache keys: what determines the numbers -----------------------------------------------------
def test_the_key_holds_the_declared_numerics_version_not_the_code_text(bundle, reference, tmp_path, toy_extractor,
                                                                      monkeypatch):
    """A refactor (any change of the code's text) keeps the key; a declared numerics change re-keys every run."""
    kw = dict(profile=PROF, extractor=toy_extractor, reference=reference, progress=False, cache_dir=tmp_path)
    first = run(bundle, "fp32", **kw)
    entry = json.loads(Path(first.samples).with_name("result.json").read_text())
    assert entry["material"]["numerics"] == experiments.NUMERICS_VERSION
    assert not {"code", "version"} & set(entry["material"])  # neither the code's text nor the release re-keys
    assert run(bundle, "fp32", **kw).cached
    monkeypatch.setattr(experiments, "NUMERICS_VERSION", experiments.NUMERICS_VERSION + 1)
    bumped = run(bundle, "fp32", **kw)
    assert not bumped.cached and Path(bumped.samples).parent != Path(first.samples).parent


def test_recipe_description_is_not_part_of_the_key():
    from hqdit_utils.engine.recipes import get_recipe

    r = get_recipe("fp4-clip")
    assert experiments.recipe_material(r) == experiments.recipe_material(r.replace(description="reworded"))
    assert experiments.recipe_material(r) != experiments.recipe_material(r.replace(clip_p=2.0))


# --- calibration cache ----------------------------------------------------------------------------
def test_cached_calibrate_reuses_the_file_and_keys_on_weights_and_seed(tmp_path, monkeypatch):
    bundle = tiny_dit(0, width=144, heads=2, num_layers=1)
    kw = dict(num_trajectories=2, num_timesteps=2, num_steps=3, rows_per_timestep=8, batch_size=2)
    first = experiments.cached_calibrate(bundle, seed=0, cache_dir=tmp_path, **kw)
    files = list((tmp_path / "calibration").glob("*.pt"))
    assert len(files) == 1

    def boom(*a, **k):
        raise AssertionError("calibrate must not run again")

    monkeypatch.setattr(experiments, "calibrate", boom)
    again = experiments.cached_calibrate(bundle, seed=0, cache_dir=tmp_path, **kw)
    name = "transformer_blocks.0.ff.net.2"
    assert torch.equal(again[name].rows(), first[name].rows())
    assert again.timesteps == first.timesteps and again.meta["num_trajectories"] == 2

    k0 = experiments.calibration_key(bundle, seed=0, **kw)
    assert experiments.calibration_key(bundle, seed=1, **kw) != k0
    assert experiments.calibration_key(bundle, seed=0, **{**kw, "rows_per_timestep": 9}) != k0
    with torch.no_grad():
        bundle.transformer.transformer_blocks[0].ff.net[2].weight[0, 0] += 1e-3
    assert experiments.calibration_key(bundle, seed=0, **kw) != k0

    files[0].write_bytes(b"damaged")  # a damaged file is recomputed (calibrate is patched: it must raise)
    bundle2 = tiny_dit(0, width=144, heads=2, num_layers=1)
    with pytest.raises(AssertionError, match="must not run again"):
        experiments.cached_calibrate(bundle2, seed=0, cache_dir=tmp_path, **kw)


# -- the one run pipeline ----------------------------------------------------------------------------------
def _forward(model):
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(x, timestep=torch.tensor([500, 20]), class_labels=torch.tensor([0, 1])).sample


def test_quantized_copy_makes_stores_and_reloads_the_same_model(bundle, tmp_path):
    spec = experiments.CalibrationSpec(PROF, seed=0, cfg_scale=1.5)
    store = experiments.qmodel_store(bundle, "int4-rtn", spec, cache_dir=tmp_path)
    assert store.parent == tmp_path and store.name.startswith("int4-rtn-s0-")
    assert store != experiments.qmodel_store(bundle, "int4-rtn", experiments.CalibrationSpec(PROF, seed=1),
                                             cache_dir=tmp_path)
    q1, report, seconds = experiments.quantized_copy(bundle, "int4-rtn", calibration=spec, store=store)
    assert report is not None and report.summary()["layers"] > 0 and seconds > 0
    assert (store / "quant_config.json").is_file()
    q2, again, _ = experiments.quantized_copy(bundle, "int4-rtn", calibration=spec, store=store)
    assert again is None  # loaded, not quantized again
    out1, out2, fp = _forward(q1.transformer), _forward(q2.transformer), _forward(bundle.transformer)
    assert torch.equal(out1, out2) and not torch.equal(out1, fp)
    # the same calibration given as a Calibration (what the CLI and the benchmarks pass) gives the same model
    calib = experiments.calibration_for(bundle, experiments.get_recipe("int4-rtn"), PROF, 0, 1.5,
                                        experiments.model_checksum(bundle))
    q3, _, _ = experiments.quantized_copy(bundle.transformer, "int4-rtn", calibration=calib)
    assert torch.equal(_forward(q3), out1)
    fp_copy, none, _ = experiments.quantized_copy(bundle, "fp32", calibration=spec)
    assert none is None and torch.equal(_forward(fp_copy.transformer), fp)
    with pytest.raises(ValueError, match="needs a DiTBundle"):
        experiments.quantized_copy(bundle.transformer, "int4-rtn", calibration=spec)


def test_run_protocol_has_the_shipped_runs_schema(bundle):
    """The one protocol record keeps the keys, in order, of the runs the book ships (``data/book-runs``)."""
    shipped = sorted(Path(experiments.SHIPPED_RUNS_DIR).glob("*/result.json"))
    if not shipped:
        pytest.skip("no shipped runs in this checkout")
    keys = list(json.loads(shipped[0].read_text())["result"]["protocol"])
    record = experiments.run_protocol(bundle, sampler="ddpm", steps=3, cfg_scale=1.5, samples=8, seeds="s+i",
                                      calibration=experiments.CalibrationSpec(PROF), model="m", mkey="k",
                                      extractor="x", extractor_sha256=None, reference="r", n_reference=16,
                                      profile=PROF.name, seconds={})
    assert list(record) == keys
    assert record["calibration"] == {"trajectories": 2, "timesteps": 2, "seed": 0}
    assert list(experiments.run_protocol(bundle, sampler="ddpm", steps=3, cfg_scale=1.5, samples=8, seeds="s",
                                         calibration=None, model="m", mkey="k", extractor="x", extractor_sha256=None,
                                         reference="r", n_reference=16, profile="p", seconds={}, world_size=2)
                ) == keys + ["world_size"]


def test_a_rotation_seed_tied_to_the_run_is_the_calibration_seed(bundle):
    tied = experiments.get_recipe("fp4-rtn-plus-rotation").replace(name="tied", rotation_seed=None)
    spec = experiments.CalibrationSpec(PROF, seed=1)
    outs = {name: _forward(experiments.quantized_copy(bundle, r, calibration=spec)[0].transformer)
            for name, r in [("tied", tied), ("one", tied.replace(name="one", rotation_seed=1)),
                            ("zero", tied.replace(name="zero", rotation_seed=0))]}
    assert torch.equal(outs["tied"], outs["one"])  # the run's seed (1) drew the signs
    assert not torch.equal(outs["tied"], outs["zero"])  # control: another rotation gives another model
    with pytest.raises(ValueError, match="CalibrationSpec"):
        experiments.quantized_copy(bundle.transformer, tied, calibration=None)
