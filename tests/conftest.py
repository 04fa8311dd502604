"""Shared pytest setup: GPU tests skip without CUDA; Ray stays quiet and local."""

from __future__ import annotations

import os

import pytest
import torch

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
