"""hqdit reproduce: the plan (dry run), execution on a tiny model, resume, protocol guard, discovery by the book."""
import argparse
import json

import numpy as np
import pytest
import torch

from hqdit_utils.config import Profile
from hqdit_utils.dit.models import load_dit, tiny_dit
from hqdit_utils.commands.reproduce import TABLES, add_parser, dit_forward_flops, execute, make_plan, measure_cost
from hqdit_utils.chapters.tables import full_scale_results

PROF = Profile("test", calib_trajectories=2, calib_timesteps=2, eval_samples=8, sampling_steps=2, seeds=1, batch_size=4)



@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinydit")
    b = tiny_dit(seed=0)
    b.transformer.save_pretrained(d / "transformer")
    b.scheduler.save_pretrained(d / "scheduler")
    return d


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["reproduce", *argv])
    return args.func(args)


def test_dry_run_without_weights_prints_the_plan(tmp_path, capsys):
    rc = _cli(["--table", "sfid", "--weights", str(tmp_path / "missing.pt"), "--dry-run", "--out", str(tmp_path),
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "7 runs (7 to do)" in out and "not measured" in out
    for r in TABLES["sfid"]:
        assert f"missing-{r}-n50000-s100-cfg1.5" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_dry_run_without_any_weights_prints_the_full_scale_plan(tmp_path, capsys, monkeypatch):
    """Issue 32: no --weights (and no $HQDIT_DIT_WEIGHTS) -> the DiT-XL/2 plan: runs, disk, torchrun, GPU-hours."""
    monkeypatch.delenv("HQDIT_DIT_WEIGHTS", raising=False)
    rc = _cli(["--dry-run", "--out", str(tmp_path), "--device", "cpu", "--gpus", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "7 runs (7 to do)" in out and "DiT-XL-2-256x256-hqdit-w4a4-n50000-s100-cfg1.5" in out
    assert "torchrun --nproc-per-node 4 -m hqdit_utils.commands.cli reproduce --table sfid --weights DiT-XL-2-256x256.pt" in out
    assert "9.83 GB of samples per run" in out  # 50000 x 256 x 256 x 3 bytes
    # 50032 images (50000 + 32 calibration trajectories) x 100 steps x 2 (CFG) x 237.24 GFLOP / (312e12 x 0.4) / 3600
    gpu_h = 50032 * 100 * 2 * dit_forward_flops() / (312e12 * 0.4) / 3600
    assert f"= {gpu_h:.1f} GPU-hours per run, {7 * gpu_h:.1f} for the runs to do, about {7 * gpu_h / 4:.1f} h on 4 GPUs" in out
    assert "our assumption" in out
    assert not any(tmp_path.iterdir())


def test_dit_xl2_forward_flops_match_the_dit_paper():
    """Peebles & Xie (DiT paper, Table 4) give DiT-XL/2 at 256 px 118.6 Gflops, counting a multiply-add once;
    our count is in FLOPs (2 per multiply-add) from the config (28 blocks, width 1152, 256 tokens)."""
    assert abs(dit_forward_flops() / 2 / 1e9 - 118.6) < 0.5
    assert abs(dit_forward_flops(tokens=1024) / 2 / 1e9 - 524.6) < 2  # DiT-XL/2 at 512 px: 524.6 Gflops


def test_dry_run_measures_cost_and_disk(folder, tmp_path, capsys):
    rc = _cli(["--weights", str(folder), "--dry-run", "--samples", "1000", "--steps", "10", "--out", str(tmp_path),
               "--device", "cpu", "--recipes", "fp32,int4-rtn"])
    out = capsys.readouterr().out
    assert rc == 0 and "ms per image per guided step" in out and "GB of samples per run" in out
    plan = make_plan("sfid", str(folder), samples=1000, steps=10, cfg=1.5, out=tmp_path, recipes=["fp32"])
    measure_cost(load_dit(str(folder)), plan)
    assert plan.step_seconds > 0 and plan.bytes_per_run() == 1000 * 8 * 8 * 1


def test_execute_resume_and_guard(folder, tmp_path, toy_extractor):
    bundle = load_dit(str(folder))
    ref = np.random.default_rng(0).integers(0, 256, size=(16, 8, 8, 1), dtype=np.uint8)
    plan = make_plan("sfid", str(folder), samples=8, steps=2, cfg=1.5, out=tmp_path, batch_size=4,
                     recipes=["fp32", "int4-rtn"])
    paths = execute(plan, bundle, extractor=toy_extractor, reference=ref, reference_name="toy", progress=False,
                    calib_profile=PROF, log=lambda *a: None)
    assert len(paths) == 2
    res = json.loads(paths[1].read_text())
    assert res["recipe"] == "int4-rtn" and res["protocol"]["samples"] == 8 and "FID*" in res["metrics"]
    assert (paths[1].parent / "quant" / "quant_config.json").is_file()
    found = full_scale_results(tmp_path)
    assert sorted(found["recipe"]) == ["fp32", "int4-rtn"] and found["proxy metrics"].all()
    # resume: everything is done, nothing is recomputed
    mtimes = [p.stat().st_mtime_ns for p in paths]
    plan2 = make_plan("sfid", str(folder), samples=8, steps=2, cfg=1.5, out=tmp_path, batch_size=4,
                      recipes=["fp32", "int4-rtn"])
    assert [r.status for r in plan2.runs] == ["done", "done"]
    execute(plan2, bundle, extractor=toy_extractor, reference=ref, progress=False, calib_profile=PROF, log=lambda *a: None)
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    # an interrupted run resumes from its quantized state; a different protocol in the same folder is refused
    paths[1].unlink()
    (paths[1].parent / "samples.npz").unlink()
    assert make_plan("sfid", str(folder), samples=8, steps=2, cfg=1.5, out=tmp_path,
                     recipes=["int4-rtn"]).runs[0].status == "quantized"
    pf = paths[1].parent / "plan.json"
    spec = json.loads(pf.read_text())
    pf.write_text(json.dumps(spec | {"seed_offset": 99}))
    with pytest.raises(RuntimeError, match="unfinished run with other settings"):
        execute(make_plan("sfid", str(folder), samples=8, steps=2, cfg=1.5, out=tmp_path, batch_size=4,
                          recipes=["int4-rtn"]), bundle, extractor=toy_extractor, reference=ref, progress=False,
                calib_profile=PROF, log=lambda *a: None)
    pf.write_text(json.dumps(spec))
    again = execute(make_plan("sfid", str(folder), samples=8, steps=2, cfg=1.5, out=tmp_path, batch_size=4,
                              recipes=["int4-rtn"]), bundle, extractor=toy_extractor, reference=ref, progress=False,
                    calib_profile=PROF, log=lambda *a: None)
    assert json.loads(again[0].read_text())["metrics"] == res["metrics"]
