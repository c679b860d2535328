"""Shared pytest configuration for dspark_ext.

Tests that take a ``device`` argument run once on "cpu" and once on "cuda". The CUDA
parametrisation carries ``pytest.mark.cuda`` and is skipped, with the reason, when no
GPU is visible or when the extension was built without CUDA kernels.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run from anywhere, with or without PYTHONPATH=.
    sys.path.insert(0, _ROOT)

import dspark_ext  # noqa: E402,F401  (registers torch.ops.dspark.*)


def cuda_skip_reason() -> str | None:
    """None when the CUDA tests can run, else why they are skipped."""
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("dspark::verify", "CUDA"):
        return "extension built without CUDA"
    return None


CUDA_SKIP_REASON = cuda_skip_reason()
HAS_CUDA = CUDA_SKIP_REASON is None

requires_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or "")]

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=requires_cuda),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """"cpu", and "cuda" when a GPU and the extension's CUDA kernels are present."""
    return request.param


@pytest.fixture
def cuda_device() -> str:
    """For CUDA-only tests: skips (marked cuda) unless the CUDA kernels can run."""
    if not HAS_CUDA:
        pytest.skip(CUDA_SKIP_REASON)
    return "cuda"


def pytest_collection_modifyitems(config, items):
    # Tests that request the cuda_device fixture are CUDA tests: mark them so that
    # `-m "not cuda"` deselects them like the cuda parametrisations.
    for item in items:
        if "cuda_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda)
