"""Session-wide test set-up: where launches find DeepSpeed's compiled ops, the launches tests share
across modules, and a closing line on the shared memory the launch tests depend on."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
from launch_helpers import SharedLaunches, launch_resident_harness

from memprof.run.deepspeed_shm import SEGMENT_PREFIX, SHM_DIR
from memprof.train.deepspeed_ops import use_venv_extensions_dir

SHM_AT_START = pytest.StashKey[str]()
LOAD_AT_START = pytest.StashKey[str]()


def _load_state() -> str:
    # launch deadlines stretch with this (tests/launch_helpers.py load_stretch): a failure on a busy
    # machine says how busy it was
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def _shm_state() -> str:
    if not SHM_DIR.is_dir():
        return "absent"
    usage = shutil.disk_usage(SHM_DIR)
    stale = [p for p in SHM_DIR.glob(f"{SEGMENT_PREFIX}_*") if p.is_file()]
    stale_bytes = sum(p.stat().st_size for p in stale)
    return (
        f"{usage.used / 2**30:.1f} of {usage.total / 2**30:.1f} GiB used, "
        f"{len(stale)} DeepSpeed shm segments ({stale_bytes / 2**30:.2f} GiB)"
    )


def pytest_sessionstart(session: Any) -> None:
    session.config.stash[SHM_AT_START] = _shm_state()
    session.config.stash[LOAD_AT_START] = _load_state()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    # /dev/shm is RAM. Stale DeepSpeed segments (left by other programs, or by DeepSpeed launches
    # that do not unlink theirs) shrink the memory the launch tests run in, and a machine short of
    # memory shows up as launches that hang rather than fail: say so in every run's output.
    start = config.stash.get(SHM_AT_START, "unknown")
    terminalreporter.write_line(f"/dev/shm before the tests: {start}; after: {_shm_state()}")
    load = config.stash.get(LOAD_AT_START, "unknown")
    terminalreporter.write_line(f"load average before the tests: {load}; after: {_load_state()}")


@pytest.fixture(scope="session")
def shared_launches(tmp_path_factory: pytest.TempPathFactory) -> SharedLaunches:
    """DeepSpeed runs launched once per session, read by every test (in any module) asking for an
    equal run (tests/launch_helpers.py SharedLaunches)."""
    return SharedLaunches(tmp_path_factory.mktemp("launches"))


@pytest.fixture(scope="session")
def resident_harness_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """tests/ds_harness/resident.py launched once for the cases of every module of this session that
    defines ``resident_spec()`` (the GPT-2 and the Llama-family ownership tests): one start-up, not
    one per module. Each rank's results; a module reads its own cases by name."""
    modules = {item.module for item in request.session.items if hasattr(getattr(item, "module", None), "resident_spec")}
    cases = [case for module in sorted(modules, key=lambda m: m.__name__) for case in module.resident_spec()]
    names = [case["name"] for case in cases]
    assert len(set(names)) == len(names), f"case names shared between modules: {names}"
    return launch_resident_harness(tmp_path_factory.mktemp("ownership"), cases)


# Launches started by the tests use the ops `make install` compiled into this virtual environment
# (see memprof/train/deepspeed_ops.py); an explicit TORCH_EXTENSIONS_DIR wins.
use_venv_extensions_dir()
