"""Shared test configuration and fixtures."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for the whole suite: the tensors here are small, and on a shared 2-core
    machine OpenMP threads competing with another process made tests 3-5x slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _int_path_as_on_a_vnni_cpu(monkeypatch):
    """The tests see the integer path as a CPU with int8 dot-product instructions does ("auto" chooses it
    wherever it is exact), whatever CPU runs them; tests/test_lowbit.py checks the rule for other CPUs."""
    from hqdit_utils.engine import lowbit

    monkeypatch.setattr(lowbit, "int_mm_fast", lambda: True)


def _toy_features(images):
    """A cheap stand-in feature network: 4 pooled statistics per image, the first 4 doubling as logits."""
    x = torch.from_numpy(images).float().flatten(1)
    pool = torch.stack([x.mean(1), x.std(1), x[:, :16].mean(1), x[:, 16:].mean(1)], dim=1)
    return {"pool": pool.numpy(), "logits": pool[:, :4].numpy()}


@pytest.fixture(scope="session")
def toy_extractor():
    from hqdit_utils.metrics.features import CallableExtractor

    return CallableExtractor(_toy_features, name="toy-features", weights_checksum="toy")
