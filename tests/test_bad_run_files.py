"""Corrupted run files given to `memprof compare` and `memprof report`: one line on stderr, exit 2,
no traceback, nothing written. Plus the end-of-run gather's choice of CUDA device (no GPU needed)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from memprof.categories import PHASES, empty_breakdown
from memprof.run.files import SCHEMA_VERSION, write_json_atomic

MEMPROF = [sys.executable, "-m", "memprof"]


def _phases() -> dict:
    rest = empty_breakdown()
    rest["device"]["params"] = 4000
    return {p: {"end": rest, "peak": rest, "peak_total": 4000, "end_total": 4000} for p in PHASES}


def _run_meta(**over) -> dict:
    run = {"model": "m", "n_params": 1000, "zero_stage": 0, "optimizer": "sgd", "precision": "fp32",
           "world_size": 1, "nodes": 1, "micro_batch": 1, "seq_len": 8, "device_type": "cpu"}
    run.update(over)
    return run


def _doc(**run_over) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "run": _run_meta(**run_over),
        "ranks": [{"rank": 0, "host": "h", "device": "cpu", "steps": [{"step": 0, "loss": 1.0, "phases": _phases()}]}],
        "missing_ranks": [],
        "estimate": None,
    }


def _rank_file(folder: Path, rank: int, header_rank, extra_lines: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"type": "header", "schema_version": SCHEMA_VERSION, "rank": header_rank, "host": "h",
              "device": "cpu", "run": _run_meta()}]
    lines += [{"type": "step", "step": i, "loss": 1.0, "phases": _phases()} for i in range(extra_lines)]
    path = folder / f"rank{rank}.jsonl"
    path.write_text("".join(json.dumps(rec) + "\n" for rec in lines), encoding="utf-8")
    return path


def _one_line_exit_2(args: list[str]) -> str:
    res = subprocess.run([*MEMPROF, *args], capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    return lines[0]


def _both(tmp_path: Path, run: Path) -> list[str]:
    """The error line of `memprof compare RUN` and of `memprof report RUN -o ...` (which writes nothing)."""
    out = tmp_path / "out" / "r.html"
    errs = [_one_line_exit_2(["compare", str(run)]), _one_line_exit_2(["report", str(run), "-o", str(out)])]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    return errs


def test_rank_file_not_utf8(tmp_path):
    path = _rank_file(tmp_path / "run", 0, 0)
    path.write_bytes(path.read_bytes() + b'{"type": "end", "x": "\xff\xfe"}\n')
    for err in _both(tmp_path, tmp_path / "run"):
        assert "rank0.jsonl is not UTF-8" in err


@pytest.mark.parametrize("header_rank", [None, "zero", 1.5, True, -1], ids=repr)
def test_rank_file_header_without_an_int_rank(tmp_path, header_rank):
    _rank_file(tmp_path / "run", 0, header_rank)
    for err in _both(tmp_path, tmp_path / "run"):
        assert "header's rank" in err and "rank0.jsonl" in err


def test_rank_file_header_rank_differs_from_its_name(tmp_path):
    _rank_file(tmp_path / "run", 1, 0)  # rank1.jsonl whose header says rank 0
    for err in _both(tmp_path, tmp_path / "run"):
        assert "header says rank 0" in err and "file name says rank 1" in err


def test_two_files_for_one_rank(tmp_path):
    _rank_file(tmp_path / "run", 7, 7)
    (tmp_path / "run" / "rank7.jsonl").rename(tmp_path / "run" / "rank07.jsonl")
    _rank_file(tmp_path / "run", 7, 7)  # rank7.jsonl and rank07.jsonl both claim rank 7
    for err in _both(tmp_path, tmp_path / "run"):
        assert "two files for rank 7" in err and "rank07.jsonl" in err and "rank7.jsonl" in err


def test_rank_file_header_missing_rank_key(tmp_path):
    path = _rank_file(tmp_path / "run", 0, 0)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    del header["rank"]
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    for err in _both(tmp_path, tmp_path / "run"):
        assert "header's rank is None" in err


@pytest.mark.parametrize(
    "mutate,where",
    [
        (lambda d: d["ranks"][0]["steps"][0]["phases"]["step"].pop("peak_total"), "phases.step.peak_total"),
        (lambda d: d["ranks"][0]["steps"][0]["phases"]["forward"].pop("end"), "phases.forward.end"),
        (lambda d: d["ranks"][0]["steps"][0]["phases"]["step"].__setitem__("end", "big"), "phases.step.end"),
        (lambda d: d["ranks"][0].pop("rank"), "ranks.0.rank"),
    ],
    ids=["no peak_total", "no end", "end not a breakdown", "no rank"],
)
def test_compare_validates_the_run_doc(tmp_path, mutate, where):
    doc = _doc()
    mutate(doc)
    path = tmp_path / "memprof.json"
    write_json_atomic(path, doc)
    err = _one_line_exit_2(["compare", str(path), "--fresh-estimate"])
    assert where in err


def test_compare_with_no_complete_step_is_one_line(tmp_path):
    doc = _doc()
    del doc["ranks"][0]["steps"][0]["phases"]["step"]  # no step phase: not a complete step
    path = tmp_path / "memprof.json"
    write_json_atomic(path, doc)
    assert "no complete step" in _one_line_exit_2(["compare", str(path), "--fresh-estimate"])


@pytest.mark.parametrize(
    "key,value",
    [(k, "two") for k in ("world_size", "nodes", "zero_stage", "micro_batch", "seq_len", "n_params")]
    + [("world_size", [1]), ("world_size", -1), ("n_params", 1.5), ("zero_stage", 4)],
)
def test_non_integer_run_fields_are_named(tmp_path, key, value):
    path = tmp_path / "memprof.json"
    write_json_atomic(path, _doc(**{key: value}))
    for err in _both(tmp_path, path):
        assert f"run.{key}" in err


@pytest.mark.parametrize("key", ["world_size", "nodes", "zero_stage", "micro_batch", "seq_len", "n_params"])
def test_fresh_estimate_names_a_bad_run_field(key):
    # inputs_from_run checks its own input (it is also reachable without the report schema)
    from memprof.errors import MemprofError
    from memprof.estimate import inputs_from_run

    with pytest.raises(MemprofError, match=f"the run's {key} is 'two'"):
        inputs_from_run(_run_meta(**{key: "two"}))


def test_fresh_estimate_without_a_model_says_to_rerun(tmp_path):
    doc = _doc()
    del doc["run"]["n_params"]
    path = tmp_path / "memprof.json"
    write_json_atomic(path, doc)
    err = _one_line_exit_2(["compare", str(path), "--fresh-estimate"])
    assert "records neither model_config nor n_params" in err and "newer memprof launcher" in err
    assert "--model" not in err  # compare has no such flag


def test_compare_a_valid_doc_still_works(tmp_path):
    path = tmp_path / "memprof.json"
    write_json_atomic(path, _doc(world_size=1.0))  # a JSON writer may emit whole floats
    res = subprocess.run([*MEMPROF, "compare", str(path), "--fresh-estimate", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["steps_compared"] == {"0": 0}


@pytest.mark.parametrize("argv,needle", [(["--no-such-flag"], "--no-such-flag"), ([], "run")], ids=["bad flag", "no run"])
def test_compare_bad_flags_are_one_line(tmp_path, argv, needle):
    path = tmp_path / "memprof.json"
    write_json_atomic(path, _doc())
    args = ["compare", *([str(path)] if argv else []), *argv]
    err = _one_line_exit_2(args)
    assert needle in err and "usage:" not in err


# ---- end-of-run gather: which CUDA device gather_object runs under -----------------------------


class _FakeDist:
    """Just enough of torch.distributed for gather_records: a 2-rank NCCL group, rank 0."""

    def __init__(self, log: list):
        self.log = log

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_rank(self):
        return 0

    def get_world_size(self):
        return 2

    def get_backend(self):
        return "nccl"

    def gather_object(self, obj, gathered, dst=0):
        self.log.append(("gather", list(self.log)))
        gathered[0] = obj
        gathered[1] = [{"type": "header", "rank": 1}]


def _patched_gather(monkeypatch, log):
    import torch

    from memprof.measure import gather

    monkeypatch.setattr(gather, "dist", _FakeDist(log))

    def no_set_device(*a, **k):
        raise AssertionError("gather_records must not call torch.cuda.set_device")

    @contextlib.contextmanager
    def device_ctx(dev):
        log.append(("enter", dev))
        yield
        log.append(("exit", dev))

    monkeypatch.setattr(torch.cuda, "set_device", no_set_device)
    monkeypatch.setattr(torch.cuda, "device", device_ctx)
    # a per-rank CUDA_VISIBLE_DEVICES leaves one GPU (ordinal 0) even on LOCAL_RANK 3
    monkeypatch.setenv("LOCAL_RANK", "3")
    return gather


def test_gather_runs_under_the_models_device_without_set_device(monkeypatch):
    import torch

    log: list = []
    gather = _patched_gather(monkeypatch, log)
    out = gather.gather_records([{"type": "header", "rank": 0}], device=torch.device("cuda", 0))
    assert sorted(out) == [0, 1]
    dev = torch.device("cuda", 0)
    assert [e[0] for e in log] == ["enter", "gather", "exit"] and log[0][1] == dev


def test_gather_without_a_device_keeps_the_current_one(monkeypatch):
    log: list = []
    gather = _patched_gather(monkeypatch, log)
    out = gather.gather_records([{"type": "header", "rank": 0}])
    assert sorted(out) == [0, 1]
    assert [e[0] for e in log] == ["gather"]
