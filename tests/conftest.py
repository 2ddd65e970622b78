"""Shared test settings: marker-based skips that say why, and a fixed seed per test."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _feature_cache(tmp_path_factory, monkeypatch):
    """Evaluations cache features under $OPENDINO_CACHE: keep every test's cache out of the user's home."""
    monkeypatch.setenv("OPENDINO_CACHE", str(tmp_path_factory.mktemp("feature-cache")))


@pytest.fixture
def one_thread():
    """One intra-op thread for tests of tiny tensors, where thread synchronisation dominates (10x slower and more on
    a busy machine); the previous setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
