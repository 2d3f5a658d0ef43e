"""Shared test configuration: hypothesis profiles and torch settings for fast, stable tests."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

# The tests compare CPU runs bit for bit and are written for CI's CPU-only machines; a brain's
# default device is the GPU where there is one. So the GPUs are hidden from the tests (and the
# processes they start) unless TYPEDBRAIN_TEST_CUDA=1 asks for tests/test_cuda.py to run on
# them (run that file alone then). Set before torch is imported, so before CUDA starts.
if os.environ.get("TYPEDBRAIN_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest
import torch
from hypothesis import HealthCheck, settings

# "ci" (the default, used by `make test`) keeps property tests quick; "dev" digs deeper.
settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Small tensors run fastest on one thread, and two test processes share two cores.
torch.set_num_threads(1)


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    """Take away the handlers a test added to the root logger, and put its level back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
