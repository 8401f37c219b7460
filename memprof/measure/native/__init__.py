"""memprof's compiled CPU allocation hook (``allocation_hook.cpp``), built once with torch's JIT
extension builder (``torch.utils.cpp_extension.load``; cached under ``$TORCH_EXTENSIONS_DIR``,
which ``make install`` points into the virtual environment and builds ahead, like DeepSpeed's ops).

:func:`load` returns the module, or raises :class:`HookUnavailable` with the reason (no C++
compiler, a build error); the profiler then falls back to the dispatch-mode tracker and says so
in its diagnostics.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

NAME = "memprof_allocation_hook"
SOURCE = Path(__file__).with_name("allocation_hook.cpp")
# MEMPROF_CPU_TRACKER=dispatch / =allocator forces one tracker (else: see backends.new_cpu_tracker)
TRACKER_ENV = "MEMPROF_CPU_TRACKER"

_module: ModuleType | None = None
_failure: str | None = None


class HookUnavailable(RuntimeError):
    """The allocation hook cannot be built or loaded here; the message says why."""


def requested() -> str | None:
    """``MEMPROF_CPU_TRACKER``: "allocator" or "dispatch" when set to one of them, else None."""
    value = os.environ.get(TRACKER_ENV, "").strip().lower()
    return value if value in ("allocator", "dispatch") else None


def load(*, quiet: bool = False) -> ModuleType:
    """The compiled hook, building it the first time (about a minute on 2 cores)."""
    global _module, _failure
    if _module is not None:
        return _module
    if _failure is not None:
        raise HookUnavailable(_failure)
    try:
        from torch.utils import cpp_extension

        build_dir = cpp_extension._get_build_directory(NAME, verbose=False)
        if not quiet and not any(Path(build_dir).glob(f"{NAME}*.so")):
            print(f"memprof: compiling its CPU allocation hook into {build_dir} (once; about a minute)",
                  file=sys.stderr, flush=True)
        _module = cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=["-O2"], verbose=False)
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use the fallback
        _failure = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        raise HookUnavailable(_failure) from None
    return _module
