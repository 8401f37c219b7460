"""Build DeepSpeed's JIT-compiled ops ahead of a launch.

Why: DeepSpeed compiles an op (``cpu_adam``, ``fused_adam`` on CPU, the shm communication op) the
first time a rank needs it, inside ``deepspeed.init_distributed`` or ``deepspeed.initialize``, while
the other ranks wait on torch's build lock. That is one to several minutes of compiling on a
2-core machine inside a launch (and inside a test's timeout), and it happens again whenever the
build directory's recorded include paths change: torch keys its cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) by op name only, so two
checkouts with different virtual environments rebuild each other's ops on every switch. ``make
install`` runs this once per virtual environment, with ``TORCH_EXTENSIONS_DIR`` inside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# The ops a CPU run of the shipped configs loads: ZeRO-Offload's Adam, DeepSpeed's Adam on the CPU
# accelerator, and the shared-memory communication op init_distributed builds under `deepspeed`.
CPU_OPS: tuple[str, ...] = ("CPUAdamBuilder", "FusedAdamBuilder", "ShareMemCommBuilder")


def use_venv_extensions_dir() -> None:
    """Point torch's JIT build cache at this virtual environment's ``torch_extensions`` (where
    ``make install`` compiled the ops), unless ``TORCH_EXTENSIONS_DIR`` is set or no venv is active."""
    if sys.prefix != sys.base_prefix:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


CPU_INFO_FILE = "memprof_cpu_info.json"
# The /proc/cpuinfo fields py-cpuinfo's answer that DeepSpeed reads ('arch', 'flags') follows from:
# a machine whose CPU differs in any of them gets its own answer, not this cache's.
_CPU_KEY_FIELDS = ("vendor_id", "cpu family", "model", "model name", "flags", "Features", "CPU implementer", "CPU part")


def cpu_key() -> str | None:
    """A digest of what identifies this CPU (the machine type and the first processor's fields of
    /proc/cpuinfo named in _CPU_KEY_FIELDS), or None where /proc/cpuinfo cannot be read."""
    try:
        first = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split("\n\n", 1)[0]
    except OSError:
        return None
    fields = [line for line in first.splitlines() if line.split(":", 1)[0].strip() in _CPU_KEY_FIELDS]
    return hashlib.sha256("\n".join([platform.machine(), *fields]).encode()).hexdigest()


def _read_cpu_info(path: Path, key: str) -> dict[str, Any] | None:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key or not isinstance(stored.get("info"), dict):
        return None
    return stored["info"]


def remember_cpu_info() -> None:
    """Answer py-cpuinfo's ``get_cpu_info()`` once per CPU, not twice per op load per rank.

    Why: every JIT op load (DeepSpeed's ``OpBuilder.jit_load`` -> ``cxx_args`` -> ``cpu_arch`` and
    ``simd_width``, deepspeed/ops/op_builder/builder.py and cpu/builder.py) calls
    ``cpuinfo.get_cpu_info()``, which starts a Python subprocess that times the CPU: about 1.2 s
    each, two per op load, 2.4 s of every rank's start-up on a 2-core machine, for an answer (the
    compile flags of ops already built) that does not change. The answer is kept in
    ``$TORCH_EXTENSIONS_DIR/memprof_cpu_info.json`` beside the ops it built, keyed by :func:`cpu_key`
    (another CPU asks py-cpuinfo again), and in memory for the rest of the process. Without
    ``TORCH_EXTENSIONS_DIR`` only the in-memory half applies. DeepSpeed imports the function at each
    call (``from cpuinfo import get_cpu_info``), so replacing the module's attribute reaches it."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then falls back to lscpu itself
        return
    asked = cpuinfo.get_cpu_info
    if getattr(asked, "memprof_remembered", False):
        return
    directory = os.environ.get("TORCH_EXTENSIONS_DIR")
    key = cpu_key()
    path = Path(directory) / CPU_INFO_FILE if directory and key else None
    memo: dict[str, dict[str, Any]] = {}

    def get_cpu_info() -> dict[str, Any]:
        if "info" not in memo:
            info = _read_cpu_info(path, key) if path is not None else None
            if info is None:
                info = asked()
                if path is not None:
                    from memprof.run.files import write_text_atomic

                    try:
                        write_text_atomic(path, json.dumps({"key": key, "info": info}, default=list))
                    except OSError:  # a read-only venv: the in-memory answer still serves this process
                        pass
            memo["info"] = info
        return dict(memo["info"])

    get_cpu_info.memprof_remembered = True  # type: ignore[attr-defined]
    cpuinfo.get_cpu_info = get_cpu_info


def build_ops(builder_names: Sequence[str] = CPU_OPS, log: Callable[[str], None] = print) -> list[str]:
    """Load (compiling when not cached) each op the current accelerator offers; returns the built names."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    remember_cpu_info()  # the launches' ranks read the answer this build asked for
    accelerator = get_accelerator()
    built = []
    for name in builder_names:
        builder = accelerator.create_op_builder(name)
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            log(f"{name}: not offered by the {accelerator.device_name()} accelerator, skipped")
            continue
        start = time.monotonic()
        log(f"{builder.NAME}: loading (compiles on first use, about a minute on 2 cores) ...")
        builder.load(verbose=False)
        log(f"{builder.NAME}: ready in {time.monotonic() - start:.0f} s")
        built.append(builder.NAME)
    return built


def build_allocation_hook(log: Callable[[str], None] = print) -> bool:
    """Compile memprof's CPU allocation hook (memprof/measure/native/) into the same cache. A
    failure is not fatal: the profiler then uses its dispatch-mode tracker and says so."""
    from memprof.measure import native

    start = time.monotonic()
    log(f"{native.NAME}: loading (compiles on first use, about a minute on 2 cores) ...")
    try:
        native.load(quiet=True)
    except native.HookUnavailable as e:
        log(f"{native.NAME}: not built ({e}); CPU profiling will use the dispatch-mode tracker")
        return False
    log(f"{native.NAME}: ready in {time.monotonic() - start:.0f} s")
    return True
