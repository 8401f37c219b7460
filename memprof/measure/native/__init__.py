"""memprof's compiled CPU allocation hook (``allocation_hook.cpp``), built once with torch's JIT
extension builder (``torch.utils.cpp_extension.load``; cached under ``$TORCH_EXTENSIONS_DIR``,
which ``make install`` points into the virtual environment and builds ahead, like DeepSpeed's ops).

:func:`load` returns the module, or raises :class:`HookUnavailable` with the reason (no C++
compiler, a build error); the profiler then falls back to the dispatch-mode tracker and says so
in its diagnostics.

Every rank of every profiled CPU run loads it, often several processes at once, on machines where
builds get killed (test timeouts), from checkouts with different sources sharing one
``$TORCH_EXTENSIONS_DIR``. So:

* each source (and torch version, and flags) builds into its own directory
  (:func:`build_name`): two checkouts never rebuild each other's hook;
* a finished build is imported directly, without torch's build lock or a ninja run;
* a build holds an ``fcntl`` lock, which the kernel releases when its process dies. torch's own
  lock (``FileBaton``: a ``lock`` file that only a live builder removes) is left behind by a build
  that was killed, and every later ``cpp_extension.load`` of that name then waits for it forever;
  found under our lock, such a file can only be stale, and is removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

NAME = "memprof_allocation_hook"
SOURCE = Path(__file__).with_name("allocation_hook.cpp")
CFLAGS = ("-O2",)
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


def build_name() -> str:
    """The extension's name for this source, torch version and flags: its own build directory."""
    import torch

    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(f"{torch.__version__} {' '.join(CFLAGS)}".encode())
    return f"{NAME}_{digest.hexdigest()[:12]}"


@contextmanager
def _build_lock(build_dir: Path, exclusive: bool) -> Iterator[None]:
    """memprof's lock on ``build_dir`` (released by the kernel if the holder dies)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "memprof.flock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _import_built(name: str, build_dir: Path) -> ModuleType | None:
    """The finished build in ``build_dir``, imported as torch's loader does; None if there is none
    (or it does not load: it is then rebuilt)."""
    library = build_dir / f"{name}.so"
    if not library.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, library)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - a broken build is rebuilt below
        return None
    return module


def _build(name: str, build_dir: Path, quiet: bool) -> ModuleType:
    from torch.utils import cpp_extension

    # under our exclusive lock no live memprof build of this name exists: torch's lock file is
    # a killed build's, and would make cpp_extension.load wait forever (FileBaton.wait)
    (build_dir / "lock").unlink(missing_ok=True)
    if not quiet and not any(build_dir.glob(f"{name}*.so")):
        print(f"memprof: compiling its CPU allocation hook into {build_dir} (once; about a minute)",
              file=sys.stderr, flush=True)
    return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=list(CFLAGS), verbose=False)


def load(*, quiet: bool = False) -> ModuleType:
    """The compiled hook, building it the first time (about a minute on 2 cores)."""
    global _module, _failure
    if _module is not None:
        return _module
    if _failure is not None:
        raise HookUnavailable(_failure)
    try:
        from torch.utils import cpp_extension

        name = build_name()
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        with _build_lock(build_dir, exclusive=False):
            module = _import_built(name, build_dir)
        if module is None:
            with _build_lock(build_dir, exclusive=True):
                module = _import_built(name, build_dir) or _build(name, build_dir, quiet)
        _module = module
    except Exception as e:  # noqa: BLE001 - any build/load failure means: use the fallback
        _failure = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        raise HookUnavailable(_failure) from None
    return _module
