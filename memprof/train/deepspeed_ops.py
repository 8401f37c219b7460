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

import os
import sys
import time
from collections.abc import Callable, Sequence

# The ops a CPU run of the shipped configs loads: ZeRO-Offload's Adam, DeepSpeed's Adam on the CPU
# accelerator, and the shared-memory communication op init_distributed builds under `deepspeed`.
CPU_OPS: tuple[str, ...] = ("CPUAdamBuilder", "FusedAdamBuilder", "ShareMemCommBuilder")


def use_venv_extensions_dir() -> None:
    """Point torch's JIT build cache at this virtual environment's ``torch_extensions`` (where
    ``make install`` compiled the ops), unless ``TORCH_EXTENSIONS_DIR`` is set or no venv is active."""
    if sys.prefix != sys.base_prefix:
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def build_ops(builder_names: Sequence[str] = CPU_OPS, log: Callable[[str], None] = print) -> list[str]:
    """Load (compiling when not cached) each op the current accelerator offers; returns the built names."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

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
