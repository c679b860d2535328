"""Shared pytest configuration for dspark_ext.

Tests that take a ``device`` argument run on "cpu", on "cuda" and "emulated":
* cuda carries ``pytest.mark.cuda`` and is skipped, with the reason, when no GPU is
  visible or when the extension was built without CUDA kernels;
* emulated carries ``pytest.mark.emulated``: the CUDA kernels run on the CPU under the
  emulation (python_tests/emulation.py), with CPU tensors, so the fixture's value is "cpu".
  It runs under `make emulate` / `make emulate-tsan` and is skipped otherwise. Tests too
  large for it carry ``pytest.mark.no_emulation(reason)`` and are deselected there.
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

import emulation  # noqa: E402


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

requires_emulation = [pytest.mark.emulated, pytest.mark.skipif(not emulation.LOADED, reason=emulation.SKIP_REASON or "")]

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=requires_cuda),
    pytest.param("emulated", id="emulated", marks=requires_emulation),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """"cpu"; "cuda" when a GPU and the extension's CUDA kernels are present; and, for the
    emulated parametrisation, "cpu" with the CUDA kernels emulated behind torch.ops.dspark."""
    if request.param == "emulated":
        with emulation.kernels_on_cpu():
            yield "cpu"
    else:
        yield request.param


@pytest.fixture
def cuda_semantics(request) -> bool:
    """True when the `device` of the test is "cuda" or "emulated", i.e. the op under test is
    a CUDA kernel: bad values mark the request instead of raising (no host synchronisation)."""
    callspec = getattr(request.node, "callspec", None)
    return callspec is not None and callspec.params.get("device") in ("cuda", "emulated")


@pytest.fixture
def cuda_device() -> str:
    """For CUDA-only tests: skips (marked cuda) unless the CUDA kernels can run."""
    if not HAS_CUDA:
        pytest.skip(CUDA_SKIP_REASON)
    return "cuda"


def pytest_collection_modifyitems(config, items):
    # Tests that request the cuda_device fixture are CUDA tests: mark them so that
    # `-m "not cuda"` deselects them like the cuda parametrisations. Emulated runs of tests
    # marked no_emulation are deselected (each has a small-shape sibling or is statistical).
    keep, dropped = [], []
    for item in items:
        if "cuda_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda)
        callspec = getattr(item, "callspec", None)
        emulated = callspec is not None and callspec.params.get("device") == "emulated"
        (dropped if emulated and item.get_closest_marker("no_emulation") else keep).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
