"""Shared pytest setup: GPU tests skip without CUDA; Ray stays quiet and local; the tiny
LM and the local Ray instance the LM tests share."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlft_ray.lm.tiny import make_tiny_model

# Tests never reach a model hub; short Ray Train polls keep short runs short.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 (1 layer, hidden 32) with the char tokenizer; tests only read it."""
    return make_tiny_model(
        tmp_path_factory.mktemp("m") / "tiny", n_layer=1, hidden=32, n_head=2, max_positions=64
    )


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local 2-CPU Ray instance for one test module (``pytestmark`` uses it)."""
    import ray

    ray.init(address="local", num_cpus=2, logging_level="WARNING")
    yield
    ray.shutdown()
