"""Feature extractors, ADM .npz batches, evaluate() and `hqdit evaluate`."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import argparse

from hqdit_utils.runs.digits import embedded_reference
from hqdit_utils.commands.cli_common import run_command
from hqdit_utils.commands import evaluate as evaluate_cli
from hqdit_utils.metrics.adm import MetricReport, evaluate, load_reference, load_samples, save_samples
from hqdit_utils.metrics.features import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILE,
    INCEPTION_WEIGHTS_SHA256,
    CallableExtractor,
    InceptionExtractor,
    ProxyExtractor,
    check_images,
)
from hqdit_utils.metrics.frechet import FeatureStats
from hqdit_utils.metrics.sfid import spatial_features


class StandInProxy(nn.Module):
    """Same interface as proxy_net.ProxyNet: uint8 [N,16,16,1] -> pool [N,32], spatial [N,8,4,4], logits [N,10]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.proj = nn.Linear(8 * 4 * 4, 32)  # from the spatial map
        self.head = nn.Linear(32, 10)

    def forward(self, images):
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
        spatial = torch.tanh(nn.functional.max_pool2d(self.conv(x), 4))  # [N, 8, 4, 4]
        pool = torch.tanh(self.proj(spatial.flatten(1)))
        return {"pool": pool, "spatial": spatial, "logits": self.head(pool)}


def hqdit(argv):
    """``hqdit`` with only the ``evaluate`` sub-command (the full CLI imports every module, slowly)."""
    parser = argparse.ArgumentParser(prog="hqdit")
    evaluate_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return run_command("hqdit evaluate", args.func, args)


def digits(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def proxy():
    return ProxyExtractor(StandInProxy())


@pytest.fixture(scope="module")
def random_inception():
    return InceptionExtractor.with_random_weights(seed=0)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "images, error, match",
    [
        (np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32), TypeError, r"range \[0\.\d+, 0\.\d+\].*\(x \* 255\)"),
        (np.full((2, 8, 8, 3), -1.0), TypeError, r"\[-1, 1\]"),
        (np.full((2, 8, 8, 3), 300, dtype=np.int16), TypeError, r"uint8 with values 0\.\.255; got int16 with range \[300, 300\]"),
        (np.zeros((8, 8, 3), np.uint8), ValueError, "4-D NHWC"),
        (np.zeros((2, 3, 8, 8), np.uint8), ValueError, "looks like NCHW"),
        (np.zeros((2, 8, 8, 2), np.uint8), ValueError, "1 or 3 channels"),
        (np.zeros((0, 8, 8, 3), np.uint8), ValueError, "empty batch"),
    ],
)
def test_bad_images_are_rejected_clearly(images, error, match):
    with pytest.raises(error, match=match):
        check_images(images)


def test_nan_features_are_rejected_with_the_extractor_name():
    def broken(images):
        pool = np.ones((len(images), 4))
        pool[1, 2] = np.nan
        return {"pool": pool}

    with pytest.raises(ValueError, match=r"'broken-net' returned NaN/inf 'pool' features for 1 of 3"):
        CallableExtractor(broken, "broken-net")(digits(3))
    with pytest.raises(ValueError, match="must return 'pool'"):
        CallableExtractor(lambda im: {"feat": np.ones((len(im), 2))}, "bad-keys")(digits(2))
    with pytest.raises(ValueError, match="'logits' must have 2 dims and 2 rows"):
        CallableExtractor(lambda im: {"pool": np.ones((2, 2)), "logits": np.ones((3, 2))}, "bad-shape")(digits(2))


# ------------------------------------------------------------------------------------------ extractors
@pytest.fixture(scope="module")
def inception_run(random_inception):
    """One forward pass of 2 images (the slow part), with the outputs of the three 17×17 blocks recorded."""
    blocks = {}
    hooks = [random_inception.net.get_submodule(name).register_forward_hook(
        lambda m, i, o, name=name: blocks.__setitem__(name, o.clone())) for name in ("Mixed_6c", "Mixed_6d", "Mixed_6e")]
    try:
        out = random_inception(np.random.default_rng(1).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8))
    finally:
        for h in hooks:
            h.remove()
    return out, blocks


def test_inception_wrapper_shapes_with_random_weights(random_inception, inception_run):
    out, _ = inception_run
    assert out["pool"].shape == (2, 2048)
    assert out["spatial"].shape == (2, 192, 17, 17)
    assert out["logits"].shape == (2, 1008)
    assert all(v.dtype == np.float32 for v in out.values())
    assert spatial_features(out["spatial"]).shape == (2, 2023)
    assert random_inception.proxy and "RANDOM" in random_inception.name  # never mistaken for ADM numbers
    with pytest.raises(ValueError, match="3 channels"):
        random_inception(digits(2))


def test_inception_spatial_map_is_mixed_6d_branch1x1(inception_run):
    """The mapping of TF mixed_6/conv:0 (see sfid.py): the first 192 channels of Mixed_6d's output,
    and *not* the same channels of the neighbouring 17×17 blocks (the wrong-block pitfall)."""
    out, blocks = inception_run
    np.testing.assert_array_equal(out["spatial"], blocks["Mixed_6d"][:, :192].numpy())
    for wrong in ("Mixed_6c", "Mixed_6e"):
        assert not np.allclose(out["spatial"], blocks[wrong][:, :192].numpy())


def test_inception_missing_weights_error_says_what_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError) as err:
        InceptionExtractor()
    msg = str(err.value)
    for needle in (INCEPTION_WEIGHTS_FILE, "95,628,359 bytes", INCEPTION_WEIGHTS_SHA256, "https://github.com/toshas/torch-fidelity/releases",
                   str(tmp_path / "torch" / "hub" / "checkpoints"), INCEPTION_WEIGHTS_ENV, "--inception-weights", "--proxy"):
        assert needle in msg
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "elsewhere.pth"))
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        InceptionExtractor()


def test_inception_rejects_weights_with_another_checksum(tmp_path, random_inception):
    path = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(random_inception.net.state_dict(), path)
    with pytest.raises(ValueError, match="sha256 .* not the expected"):
        InceptionExtractor(path)
    unverified = InceptionExtractor(path, verify=False)  # loads strictly; reported as non-ADM
    assert unverified.proxy and unverified.name.endswith("-unverified") and unverified.weights_checksum != INCEPTION_WEIGHTS_SHA256


def test_inception_real_weights_load_and_verify():
    path = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if not path or not os.path.isfile(path):
        pytest.skip(f"real Inception weights are not available here (set {INCEPTION_WEIGHTS_ENV}); "
                    "only shapes and plumbing are tested, with random weights")
    ext = InceptionExtractor(path)
    out = ext(np.full((2, 64, 64, 3), 128, np.uint8))
    assert not ext.proxy and ext.weights_checksum == INCEPTION_WEIGHTS_SHA256
    assert (out["pool"] >= 0).all() and (out["spatial"] >= 0).all()  # both follow a ReLU / average of ReLUs


def test_proxy_extractor_with_stand_in(proxy):
    out = proxy(digits(5))
    assert out["pool"].shape == (5, 32) and out["spatial"].shape == (5, 8, 4, 4) and out["logits"].shape == (5, 10)
    assert proxy.proxy and len(proxy.weights_checksum) == 64
    assert ProxyExtractor(StandInProxy()).weights_checksum == proxy.weights_checksum  # content hash, deterministic


def test_proxy_extractor_loads_shipped_format(tmp_path):
    proxy_net = pytest.importorskip("hqdit_utils.metrics.proxy_net")
    path = proxy_net.save_proxy_net(proxy_net.ProxyNet(), tmp_path / "proxy")
    ext = ProxyExtractor(path=tmp_path / "proxy")
    from hqdit_utils.files import sha256_file

    assert ext.weights_checksum == sha256_file(path)
    out = ext(digits(3))
    assert out["pool"].shape == (3, proxy_net.POOL_DIM) and out["logits"].shape == (3, proxy_net.NUM_CLASSES)
    # sFID* sees the network's 8×8 map pooled to 4×4: 7 × 4 × 4 = 112 features, fewer than the 360
    # held-out reference images and the book's 256 samples per run (full-rank covariances).
    with torch.no_grad():
        raw = ext.net(torch.from_numpy(digits(3)))["spatial"]
    np.testing.assert_allclose(out["spatial"], nn.functional.avg_pool2d(raw, 2).numpy(), rtol=1e-6, atol=1e-7)
    assert spatial_features(out["spatial"]).shape == (3, 112)


# ------------------------------------------------------------------------------------------ .npz files
def test_samples_round_trip_and_stream_in_batches(tmp_path):
    images, labels = digits(11), np.arange(11) % 10
    path = save_samples(tmp_path / "s.npz", images, labels)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(npz["arr_1"], labels)
    batch = load_samples(path)
    assert batch.shape == (11, 16, 16, 1) and len(batch) == 11
    parts = list(batch.iter_batches(4))
    assert [len(p) for p in parts] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(parts), images)
    np.testing.assert_array_equal(batch.read(), images)
    with pytest.raises(ValueError, match="labels"):
        save_samples(tmp_path / "bad.npz", images, labels[:3])


def test_bad_npz_files_are_rejected(tmp_path):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="uint8"):
        load_samples(tmp_path / "float.npz")
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="empty batch"):
        load_samples(tmp_path / "empty.npz")
    np.savez(tmp_path / "nchw.npz", arr_0=np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="NCHW"):
        load_samples(tmp_path / "nchw.npz")
    np.savez(tmp_path / "objects.npz", arr_0=np.array([None, 1], dtype=object))
    with pytest.raises(TypeError, match="allow_pickle"):
        load_samples(tmp_path / "objects.npz")
    np.savez(tmp_path / "other.npz", images=digits(2))
    with pytest.raises(KeyError, match="arr_0"):
        load_samples(tmp_path / "other.npz")
    np.savez(tmp_path / "partial.npz", arr_0=digits(2), mu=np.zeros(3))
    with pytest.raises(ValueError, match="only \\['mu'\\]"):
        load_reference(tmp_path / "partial.npz")
    with pytest.raises(FileNotFoundError):
        load_samples(tmp_path / "missing.npz")
    np.save(tmp_path / "plain.npy", digits(2))
    with pytest.raises(ValueError, match="not an .npz archive"):
        load_reference(tmp_path / "plain.npy")


# ------------------------------------------------------------------------------------------ evaluate
def test_evaluate_a_set_against_itself(proxy):
    x = digits(120)
    report = evaluate(x, x, proxy, batch_size=50)
    assert abs(report.fid) < 1e-6 and abs(report.sfid) < 1e-6
    assert (report.precision, report.recall) == (1.0, 1.0)
    assert 1.0 <= report.inception_score <= 10.0
    assert (report.n_samples, report.n_reference, report.proxy) == (120, 120, True)
    frame = report.to_frame()
    assert len(frame) == 1
    assert list(frame.columns[:5]) == ["FID*", "sFID*", "IS*", "P*", "R*"]
    assert frame["weights sha256"][0] == proxy.weights_checksum and frame["extractor"][0] == proxy.name
    assert "proxy" in report.footnote()


def test_evaluate_does_not_depend_on_batch_size_and_reads_files(tmp_path, proxy):
    samples, ref = digits(90, seed=1), digits(80, seed=2)
    a = evaluate(samples, ref, proxy, batch_size=7)
    save_samples(tmp_path / "s.npz", samples)
    save_samples(tmp_path / "r.npz", ref)
    b = evaluate(tmp_path / "s.npz", tmp_path / "r.npz", proxy, batch_size=64)
    for field in ("fid", "sfid", "inception_score"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-6)
    assert (a.precision, a.recall) == (b.precision, b.recall)
    assert a.fid > 0.01 and a.sfid > 0.01


def test_evaluate_uses_precomputed_statistics_only_for_the_adm_network(tmp_path, proxy):
    samples, ref = digits(60, seed=3), digits(70, seed=4)
    pool = proxy(ref)["pool"]
    spatial = spatial_features(proxy(ref)["spatial"])
    st, st_s = FeatureStats.from_features(pool), FeatureStats.from_features(spatial)
    # Statistics that disagree with the images, to see which ones are used.
    np.savez(tmp_path / "ref.npz", arr_0=ref, mu=st.mean + 1.0, sigma=st.cov, mu_s=st_s.mean, sigma_s=st_s.cov)
    as_proxy = evaluate(samples, tmp_path / "ref.npz", proxy)
    assert as_proxy.fid == pytest.approx(evaluate(samples, ref, proxy).fid, rel=1e-9)  # statistics ignored
    adm_like = CallableExtractor(proxy, "adm-like", proxy=False)  # claims to be the ADM network
    used = evaluate(samples, tmp_path / "ref.npz", adm_like)
    delta = FeatureStats.from_features(proxy(samples)["pool"]).mean - st.mean
    assert used.fid == pytest.approx(as_proxy.fid - delta @ delta + (delta - 1.0) @ (delta - 1.0), rel=1e-6)
    assert used.sfid == pytest.approx(as_proxy.sfid, rel=1e-6)
    np.savez(tmp_path / "stats_only.npz", mu=st.mean, sigma=st.cov, mu_s=st_s.mean, sigma_s=st_s.cov)
    stats_only = evaluate(samples, load_reference(tmp_path / "stats_only.npz"), adm_like)
    assert np.isnan(stats_only.precision) and stats_only.n_reference == 0 and stats_only.fid > 0
    with pytest.raises(ValueError, match="only precomputed Inception statistics"):
        evaluate(samples, tmp_path / "stats_only.npz", proxy)


def test_evaluate_rejects_bad_inputs(proxy):
    with pytest.raises(TypeError, match="uint8"):
        evaluate(digits(4).astype(np.float32) / 255, digits(4), proxy)
    with pytest.raises(ValueError, match="empty batch"):
        evaluate(np.zeros((0, 16, 16, 1), np.uint8), digits(4), proxy)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate(digits(1), digits(4), proxy)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(digits(4), digits(4), proxy, batch_size=0)


def test_report_without_star_for_the_adm_network():
    report = MetricReport(1.0, 2.0, 3.0, 0.5, 0.6, 10, 10, "inception-v3-tf-2015-12-05", INCEPTION_WEIGHTS_SHA256, False)
    assert list(report.to_frame().columns[:5]) == ["FID", "sFID", "IS", "P", "R"]
    assert json.loads(json.dumps(report.to_dict()))["fid"] == 1.0


def test_embedded_reference_is_the_heldout_split():
    pytest.importorskip("hqdit_utils.runs.digits")
    ref = embedded_reference()
    assert ref.shape == (360, 16, 16, 1) and ref.dtype == np.uint8
    assert ref.max() == 255 and ref.min() == 0
    assert embedded_reference("train").shape == (1437, 16, 16, 1)
    with pytest.raises(ValueError, match="split"):
        embedded_reference("test")


# ------------------------------------------------------------------------------------------ CLI
def test_cli_evaluate_with_proxy_prints_starred_table(tmp_path, capsys):
    proxy_net = pytest.importorskip("hqdit_utils.metrics.proxy_net")
    proxy_net.save_proxy_net(proxy_net.ProxyNet(), tmp_path / "proxy")
    save_samples(tmp_path / "s.npz", digits(40, seed=5))
    save_samples(tmp_path / "r.npz", digits(30, seed=6))
    code = hqdit(["evaluate", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "r.npz"), "--proxy",
                  "--proxy-path", str(tmp_path / "proxy"), "--batch-size", "16", "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert code == 0
    header = out.splitlines()[0].split()
    assert header[:5] == ["FID*", "sFID*", "IS*", "P*", "R*"]
    assert "* proxy metrics" in out
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["proxy"] is True and saved["n_samples"] == 40


def test_cli_evaluate_reports_missing_inception_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    save_samples(tmp_path / "s.npz", np.zeros((2, 8, 8, 3), np.uint8))
    code = hqdit(["evaluate", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "s.npz"),
                  "--inception-weights", str(tmp_path / "nope.pth")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("hqdit evaluate: error: ") and len(err.strip().splitlines()) == 1
    assert INCEPTION_WEIGHTS_FILE in err
