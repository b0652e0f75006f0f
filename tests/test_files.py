import numpy as np
import pytest

from hqdit_utils.files import atomic_path, write_text_atomic


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.npz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".npz" and tmp != target
        np.savez(tmp, x=np.arange(3))  # np.savez keeps a name that already ends in .npz
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            np.savez(tmp, x=np.zeros(5))
            raise RuntimeError("killed half-way")
    with np.load(target, allow_pickle=False) as z:  # the old content, untouched; no temporary left
        np.testing.assert_array_equal(z["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]


def test_write_text_atomic(tmp_path):
    write_text_atomic(tmp_path / "s.json", "{}")
    write_text_atomic(tmp_path / "s.json", '{"a": 1}')
    assert (tmp_path / "s.json").read_text() == '{"a": 1}' and len(list(tmp_path.iterdir())) == 1
