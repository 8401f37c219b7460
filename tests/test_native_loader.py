"""memprof.measure.native.load on a shared, busy machine: a killed build's lock file does not hang
every later run, and each source builds into its own directory. No compiler run: the builder is
replaced by a stand-in."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from memprof.measure import native


@pytest.fixture
def fresh_loader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """native.load with nothing loaded yet, building into ``tmp_path/<name>``."""
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose=False: str(tmp_path / name))
    return tmp_path


def test_a_killed_builds_lock_file_is_removed_not_waited_for(fresh_loader: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_dir = fresh_loader / native.build_name()
    build_dir.mkdir()
    (build_dir / "lock").touch()  # torch's FileBaton file, left by a build that was SIGKILLed
    built = types.ModuleType("stand_in")
    calls = []

    def stand_in_load(name: str, **_kw):
        # torch's loader would wait for this file forever (cpp_extension._jit_compile -> FileBaton.wait)
        assert not (build_dir / "lock").exists()
        calls.append(name)
        return built

    monkeypatch.setattr(cpp_extension, "load", stand_in_load)
    assert native.load(quiet=True) is built and calls == [native.build_name()]
    assert native.load(quiet=True) is built and len(calls) == 1  # loaded once per process


def test_a_broken_library_is_rebuilt(fresh_loader: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = native.build_name()
    (fresh_loader / name).mkdir()
    (fresh_loader / name / f"{name}.so").write_bytes(b"not an ELF file: a link that was killed")
    built = types.ModuleType("stand_in")
    monkeypatch.setattr(cpp_extension, "load", lambda name, **_kw: built)
    assert native.load(quiet=True) is built


def test_each_source_builds_into_its_own_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    name = native.build_name()
    assert name.startswith(native.NAME + "_") and name == native.build_name()
    other = tmp_path / "allocation_hook.cpp"
    other.write_text(native.SOURCE.read_text() + "\n// another checkout's edit\n")
    monkeypatch.setattr(native, "SOURCE", other)
    assert native.build_name() != name


def test_a_build_failure_is_the_fallback_reason(fresh_loader: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(**_kw):
        raise RuntimeError("Error building extension\nc++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.raises(native.HookUnavailable, match="c\\+\\+: command not found"):
        native.load(quiet=True)
