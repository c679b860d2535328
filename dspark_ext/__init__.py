"""dspark_ext: kernels for DSpark speculative decoding, reached as torch.ops.dspark.*."""
import torch

from . import _C  # noqa: F401  (loads the library: registers the ops' CPU/CUDA kernels)
from . import ops, reference, scheduler, sts  # noqa: F401
from .ops import confidence, markov_draft, verify  # noqa: F401

__all__ = ["ops", "reference", "scheduler", "sts", "verify", "markov_draft", "confidence", "cuda_available"]


def cuda_available() -> bool:
    """True when the extension was built with CUDA kernels and a GPU is visible."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("dspark::verify", "CUDA")
