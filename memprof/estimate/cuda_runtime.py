"""Device memory that PyTorch's CUDA libraries take through the caching allocator (not tensors).

cuBLAS and cuBLASLt workspaces are allocated with ``CUDACachingAllocator::allocate`` in
``aten/src/ATen/cuda/CublasHandlePool.cpp`` (torch 2.x), so ``torch.cuda.memory_allocated`` and
its peak count them, and they stay cached for the process's life:

* ``setWorkspaceForHandle``: one cuBLAS workspace per (handle, stream). Handles come from a
  thread-local ``PoolWindow``, so every thread that runs a GEMM has its own: the Python thread
  (forward) and the autograd engine's device thread (backward). Size: ``CUBLAS_WORKSPACE_CONFIG``
  or ``parseChosenWorkspaceSize``'s default ``:4096:8`` = 32 MiB on Hopper (compute capability
  9.x; newer torch also 10.x and 12.x, "32MiB for Hopper and Blackwell") and ``:4096:2:16:8`` =
  8 MiB + 128 KiB elsewhere.
* ``getCUDABlasLtWorkspace``: one cuBLASLt workspace per (handle, stream) of ``CUBLASLT_WORKSPACE_SIZE``
  (default 1024 KiB), taken by ``addmm`` with a 1-D bias (``gemm_and_bias``: GPT-2's Conv1D layers
  in forward). Backward's GEMMs (``mm``) use plain cuBLAS, so only the forward thread has one
  (the recomputed forward under activation checkpointing runs on the backward thread: two).

Measured on one H100 (torch 2.11, gpt2, world size 1, every ZeRO stage): the steady-state
``other`` is 2 x 32 MiB + 1 MiB = 68,157,440 bytes plus the loop's batch and loss and < 1 MiB
of allocator rounding.
"""

from __future__ import annotations

import re

from memprof.errors import MemprofError

MIB = 1024 * 1024
# parseChosenWorkspaceSize: ":4096:8" (32 MiB) on Hopper/Blackwell, else ":4096:2:16:8"
CUBLAS_WORKSPACE_32MIB = 4096 * 8 * 1024
CUBLAS_WORKSPACE_DEFAULT = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLASLT_WORKSPACE = 1024 * 1024  # parseCUDABlasLtWorkspaceSize: 1024 KiB
CUBLAS_32MIB_MAJORS = (9, 10, 12)  # Hopper (9.0), Blackwell (10.x, 12.x)
ASSUMED_CAPABILITY = "9.0"  # NVIDIA H100 (sm_90), the card the CUDA formulas were checked on

_CAPABILITY = re.compile(r"^(\d{1,2})\.(\d{1,2})$")


def parse_capability(text: str) -> tuple[int, int]:
    """``"9.0"`` -> ``(9, 0)``; MemprofError (one line) for anything else."""
    m = _CAPABILITY.match(str(text).strip())
    if not m:
        raise MemprofError(f"CUDA compute capability {text!r} is not MAJOR.MINOR: use e.g. --cuda-capability 9.0 (H100)")
    return int(m.group(1)), int(m.group(2))


def cublas_workspace_bytes(capability: str) -> int:
    """One cuBLAS workspace (per thread and stream) at torch's default ``CUBLAS_WORKSPACE_CONFIG``."""
    major, _ = parse_capability(capability)
    return CUBLAS_WORKSPACE_32MIB if major in CUBLAS_32MIB_MAJORS else CUBLAS_WORKSPACE_DEFAULT


def blas_workspace_bytes(capability: str, checkpointing: bool) -> int:
    """cuBLAS + cuBLASLt workspaces alive from the second step on: one cuBLAS workspace for the
    forward thread and one for the autograd thread, one cuBLASLt workspace per thread that runs a
    forward (bias ``addmm``)."""
    lt_threads = 2 if checkpointing else 1
    return 2 * cublas_workspace_bytes(capability) + lt_threads * CUBLASLT_WORKSPACE
