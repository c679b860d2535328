"""The CUDA emulation in the tests: the library `make emulate` builds
(build/emulate-*/dspark_emulated.so, named by DSPARK_EMULATED_LIB) holds the CUDA kernels
of verify, confidence and markov_draft compiled as host C++ (include/dspark/emulate), registered as
torch.ops.dspark_emulated.*. While `kernels_on_cpu()` is active, torch.ops.dspark.* on CPU
tensors run those CUDA kernels instead of the CPU ones, so a test written for a device runs
unchanged against the CUDA code, with CPU tensors standing for device memory.
"""

from __future__ import annotations

import contextlib
import os

import torch

OPS = ("verify", "confidence", "markov_draft", "markov_draft_")


def _load() -> str | None:
    """None when the emulated kernels are loaded, else why not."""
    path = os.environ.get("DSPARK_EMULATED_LIB")
    if not path:
        return "CUDA emulation not loaded (make emulate / make emulate-tsan run these)"
    torch.ops.load_library(path)
    return None


SKIP_REASON = _load()
LOADED = SKIP_REASON is None
_active = False


def active() -> bool:
    """True while torch.ops.dspark.* on CPU tensors run the emulated CUDA kernels."""
    return _active


def size(full: int, emulated: int) -> int:
    """A test's problem size: `emulated` while emulating (every CUDA thread is a fiber
    there, so a large batch costs minutes), else `full`."""
    return emulated if _active else full


@contextlib.contextmanager
def kernels_on_cpu():
    """Routes torch.ops.dspark.{verify,confidence,markov_draft,markov_draft_} on CPU tensors to the emulated CUDA kernels."""
    global _active
    if not LOADED:
        raise RuntimeError(SKIP_REASON)
    library = torch.library.Library("dspark", "IMPL")
    for name in OPS:
        emulated = getattr(torch.ops.dspark_emulated, name)
        library.impl(name, lambda *args, op=emulated, **kwargs: op(*args, **kwargs), "CPU")
    _active = True
    try:
        yield
    finally:
        _active = False
        library._destroy()
