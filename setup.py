"""Builds dspark_ext._C: a CUDAExtension when torch has CUDA and a toolkit is found,
else a CPU-only CppExtension. Set DSPARK_CPU_ONLY=1 to force the CPU build.

Environment:
    CUDA_HOME               the CUDA toolkit (else nvcc on PATH)
    TORCH_CUDA_ARCH_LIST    defaults to "9.0a" (H100/H200)
    DSPARK_CUTLASS_DIR      CUTLASS include dir (default: the nvidia-cutlass package)
    MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cutlass_include_dir():
    explicit = os.environ.get("DSPARK_CUTLASS_DIR")
    if explicit:
        return explicit
    try:
        import cutlass_library  # from the nvidia-cutlass package
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.isdir(path) else None


def want_cuda():
    if os.environ.get("DSPARK_CPU_ONLY", "0") == "1":
        return False, "DSPARK_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, "this torch has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"CUDA {torch.version.cuda}, toolkit at {cpp_extension.CUDA_HOME}"


def make_extension():
    use_cuda, reason = want_cuda()
    sources = ["csrc/torch_bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "include")]
    cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for
    if not use_cuda:
        print(f"dspark_ext: building the CPU-only extension ({reason})", file=sys.stderr)
        return cpp_extension.CppExtension("dspark_ext._C", sources, include_dirs=include_dirs,
                                          extra_compile_args={"cxx": cxx_flags})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    cutlass = cutlass_include_dir()
    if not cutlass:
        raise RuntimeError("dspark_ext: the CUDA build needs the CUTLASS/CuTe headers (markov_draft's tensor-core "
                           "tiles): pip install nvidia-cutlass, or set DSPARK_CUTLASS_DIR to CUTLASS's include dir; "
                           "DSPARK_CPU_ONLY=1 builds the CPU-only extension")
    include_dirs.append(cutlass)
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                  "-DDSPARK_WITH_CUDA"]  # no --use_fast_math: sampling needs IEEE math
    print(f"dspark_ext: building the CUDA extension ({reason}; arch {os.environ['TORCH_CUDA_ARCH_LIST']};"
          f" CUTLASS {cutlass or 'not found'})", file=sys.stderr)
    return cpp_extension.CUDAExtension("dspark_ext._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
                                       include_dirs=include_dirs,
                                       extra_compile_args={"cxx": cxx_flags + ["-DDSPARK_WITH_CUDA"],
                                                           "nvcc": nvcc_flags})


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
