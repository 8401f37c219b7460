"""memprof/train/deepspeed_ops.py remember_cpu_info: py-cpuinfo is asked once per CPU, the answer
read back from beside the compiled ops, and DeepSpeed's op builders compute the same compile flags
from it as from py-cpuinfo itself."""

from __future__ import annotations

import json

import cpuinfo
import pytest

from memprof.train import deepspeed_ops
from memprof.train.deepspeed_ops import CPU_INFO_FILE, remember_cpu_info

ANSWER = {"arch": "X86_64", "flags": ["avx2", "avx512f"], "hz_advertised": [2100000000, 0]}


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch, tmp_path) -> list[int]:
    """A stand-in for py-cpuinfo that counts how often it is asked; the cache lives in tmp_path."""
    calls: list[int] = []

    def fake() -> dict:
        calls.append(1)
        return json.loads(json.dumps(ANSWER))

    monkeypatch.setattr(cpuinfo, "get_cpu_info", fake)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return calls


def test_asked_once_per_process_then_read_from_the_file(asked, tmp_path, monkeypatch) -> None:
    remember_cpu_info()
    assert cpuinfo.get_cpu_info() == ANSWER and cpuinfo.get_cpu_info() == ANSWER
    assert len(asked) == 1
    assert json.loads((tmp_path / CPU_INFO_FILE).read_text())["info"] == ANSWER
    remember_cpu_info()  # a second call does not wrap the wrapper
    cpuinfo.get_cpu_info()
    assert len(asked) == 1

    # a new process (py-cpuinfo's own function again) on the same CPU reads the file
    def never() -> dict:
        raise AssertionError("py-cpuinfo asked although the answer was stored")

    monkeypatch.setattr(cpuinfo, "get_cpu_info", never)
    remember_cpu_info()
    assert cpuinfo.get_cpu_info() == ANSWER


def test_another_cpu_asks_again(asked, tmp_path, monkeypatch) -> None:
    remember_cpu_info()
    cpuinfo.get_cpu_info()
    stored = json.loads((tmp_path / CPU_INFO_FILE).read_text())
    (tmp_path / CPU_INFO_FILE).write_text(json.dumps({**stored, "key": "another cpu"}))
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: (asked.append(1), dict(ANSWER, arch="ARM_8"))[1])
    remember_cpu_info()
    assert cpuinfo.get_cpu_info()["arch"] == "ARM_8" and len(asked) == 2


def test_a_broken_cache_file_is_asked_again_and_rewritten(asked, tmp_path) -> None:
    (tmp_path / CPU_INFO_FILE).write_text("{not json")
    remember_cpu_info()
    assert cpuinfo.get_cpu_info() == ANSWER and len(asked) == 1
    assert json.loads((tmp_path / CPU_INFO_FILE).read_text())["key"] == deepspeed_ops.cpu_key()


def test_deepspeeds_compile_flags_are_the_same_from_the_cache(tmp_path, monkeypatch) -> None:
    # the real py-cpuinfo, asked once (about a second): the flags DeepSpeed's CPU op builder
    # derives (deepspeed/ops/op_builder/builder.py cpu_arch, simd_width) from its answer and from
    # the stored one, read in a "new process" (py-cpuinfo's function restored)
    from deepspeed.ops.op_builder.cpu import FusedAdamBuilder

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    original = cpuinfo.get_cpu_info
    monkeypatch.setattr(cpuinfo, "get_cpu_info", original)
    remember_cpu_info()
    builder = FusedAdamBuilder()
    first = (builder.cpu_arch(), builder.simd_width())
    monkeypatch.setattr(cpuinfo, "get_cpu_info", original)
    remember_cpu_info()
    assert (builder.cpu_arch(), builder.simd_width()) == first
    assert (tmp_path / CPU_INFO_FILE).is_file()
