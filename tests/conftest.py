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


def _toy_features(images):
    """A cheap stand-in feature network: 4 pooled statistics per image, the first 4 doubling as logits."""
    x = torch.from_numpy(images).float().flatten(1)
    pool = torch.stack([x.mean(1), x.std(1), x[:, :16].mean(1), x[:, 16:].mean(1)], dim=1)
    return {"pool": pool.numpy(), "logits": pool[:, :4].numpy()}


@pytest.fixture(scope="session")
def toy_extractor():
    from hqdit_utils.metrics.features import CallableExtractor

    return CallableExtractor(_toy_features, name="toy-features", weights_checksum="toy")
