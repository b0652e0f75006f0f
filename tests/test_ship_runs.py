"""`make book-results` (hqdit_utils/runs/run_store.py) and the store it fills
(data/book-runs/)."""
import json
from pathlib import Path

import numpy as np
import pytest

from hqdit_utils.runs import run_store
from hqdit_utils.files import sha256_file

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "data" / "book-runs"


@pytest.fixture(scope="module")
def ship_runs():
    return run_store


AVX2 = {"cpu": "AMD EPYC", "torch cpu capability": "AVX2", "kind": "AVX2"}
AMX = {"cpu": "Intel Xeon", "torch cpu capability": "AVX512", "kind": "AMX"}


def _run_folder(runs: Path, name: str, finished: bool = True, machine: dict | None = AVX2) -> Path:
    d = runs / name
    d.mkdir(parents=True)
    np.savez(d / "samples.npz", images=np.arange(12, dtype=np.uint8).reshape(3, 4))
    if finished:
        protocol = {} if machine is None else {"machine": machine}
        entry = {"material": {"recipe": name}, "samples_sha256": sha256_file(d / "samples.npz"),
                 "result": {"recipe": name.split("-")[0], "seed": 0, "samples": str(d / "samples.npz"),
                            "metrics": {"FID*": 1.0}, "protocol": protocol}}
        (d / "result.json").write_text(json.dumps(entry))
    return d


def test_ship_copies_finished_runs_without_the_local_samples_path(ship_runs, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "store"
    _run_folder(runs, "a-s0")
    _run_folder(runs, "b-s0")
    _run_folder(runs, "c-s0", finished=False)  # no result.json: not shipped
    (out / "stale").mkdir(parents=True)  # the store is replaced, not merged
    assert ship_runs.ship(runs, out) == 2
    assert sorted(p.name for p in out.iterdir()) == ["a-s0", "b-s0", "machine.json"]
    for name in ("a-s0", "b-s0"):
        entry = json.loads((out / name / "result.json").read_text())
        assert "samples" not in entry["result"] and entry["result"]["metrics"] == {"FID*": 1.0}
        assert (out / name / "samples.npz").read_bytes() == (runs / name / "samples.npz").read_bytes()
    facts = json.loads((out / "machine.json").read_text())
    assert facts["machines"] == [{**AVX2, "runs": 2, "recipes": ["a", "b"]}] and "written" in facts


def test_add_keeps_the_store_and_machine_json_names_every_machine(ship_runs, tmp_path):
    runs, more, out = tmp_path / "runs", tmp_path / "more", tmp_path / "store"
    _run_folder(runs, "a-s0")
    _run_folder(runs, "b-s0")
    ship_runs.ship(runs, out)
    _run_folder(more, "c-s0", machine=AMX)
    _run_folder(more, "c-s1", machine=AMX)
    _run_folder(more, "d-s0", machine=None)  # a run that predates the per-run record
    _run_folder(more, "a-s0", machine=AMX)  # already in the store: kept as it is
    assert ship_runs.ship(more, out, add=True) == 3
    assert sorted(p.name for p in out.iterdir()) == ["a-s0", "b-s0", "c-s0", "c-s1", "d-s0", "machine.json"]
    assert ship_runs.run_machine(json.loads((out / "a-s0" / "result.json").read_text())) == AVX2
    facts = json.loads((out / "machine.json").read_text())["machines"]
    assert facts == [{**AVX2, "runs": 2, "recipes": ["a", "b"]}, {**AMX, "runs": 2, "recipes": ["c"]},
                     {"cpu": "unknown", "torch cpu capability": "unknown", "kind": "unknown", "runs": 1,
                      "recipes": ["d"]}]
    assert ship_runs.ship(more, out) == 4 and not (out / "b-s0").exists()  # without add: replaced


def test_every_shipped_run_names_its_machine():
    kinds = {m["kind"] for m in run_store.machines(STORE)}
    assert kinds and "unknown" not in kinds


def _store_problems(store: Path) -> list[str]:
    """What is wrong with a shipped store: a machine-local samples path left in, or samples whose sha256 is not
    the one the entry records."""
    bad = []
    for result in sorted(store.glob("*/result.json")):
        entry = json.loads(result.read_text())
        if "samples" in entry["result"]:
            bad.append(f"{result.parent.name}: machine-local samples path")
        if sha256_file(result.parent / "samples.npz") != entry["samples_sha256"]:
            bad.append(f"{result.parent.name}: samples sha256")
    return bad


def test_the_shipped_store_is_clean():
    assert len(list(STORE.glob("*/result.json"))) > 0 and (STORE / "machine.json").is_file()
    assert _store_problems(STORE) == []


def test_the_store_check_finds_a_local_path_and_changed_samples(ship_runs, tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "store"
    d = _run_folder(runs, "a-s0")
    ship_runs.ship(runs, out)
    assert _store_problems(out) == []
    (out / "a-s0" / "result.json").write_text((d / "result.json").read_text())  # the unstripped entry
    np.savez(out / "a-s0" / "samples.npz", images=np.zeros((3, 4), dtype=np.uint8))
    assert _store_problems(out) == ["a-s0: machine-local samples path", "a-s0: samples sha256"]


def test_a_wrong_call_is_one_usage_line(tmp_path, capsys):
    assert run_store.main([str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m hqdit_utils.runs.run_store [--add]") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
