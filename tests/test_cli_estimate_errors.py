"""Bad input to `memprof estimate` / `memprof plan`: one line on stderr, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

MEMPROF = [sys.executable, "-m", "memprof"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MEMPROF, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bad_configs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ds")
    (d / "malformed.json").write_text('{"zero_optimization": {"stage": 2,', encoding="utf-8")
    (d / "list.json").write_text("[1, 2]", encoding="utf-8")
    (d / "neg_bucket.json").write_text('{"zero_optimization": {"reduce_bucket_size": -5}}', encoding="utf-8")
    (d / "bf16_string.json").write_text('{"bf16": {"enabled": "true"}}', encoding="utf-8")
    (d / "fp16_number.json").write_text('{"fp16": {"enabled": 1}}', encoding="utf-8")
    (d / "momentum_string.json").write_text('{"optimizer": {"type": "SGD", "params": {"momentum": "abc"}}}', encoding="utf-8")
    (d / "momentum_list.json").write_text('{"optimizer": {"type": "SGD", "params": {"momentum": [1]}}}', encoding="utf-8")
    (d / "nesterov_no_momentum.json").write_text('{"optimizer": {"type": "SGD", "params": {"nesterov": true}}}', encoding="utf-8")
    (d / "rmsprop_momentum.json").write_text('{"optimizer": {"type": "RMSprop", "params": {"momentum": 0.9}}}', encoding="utf-8")
    return {p.stem: p for p in d.iterdir()}


BAD = [
    (["estimate", "--params", "-5"], "positive"),
    (["estimate", "--params", "lots"], "not a number"),
    (["estimate", "--params", "0"], "positive"),
    (["estimate", "--model", "gpt2", "--world-size", "0"], "--world-size"),
    (["estimate", "--model", "gpt2", "--zero-stage", "5"], "stage"),
    (["estimate", "--model", "gpt2", "--optimizer", "lamb"], "optimizer"),
    (["estimate", "--model", "gpt2", "--precision", "int3"], "precision"),
    (["estimate", "--model", "gpt2", "--gpu-memory", "eighty"], "eighty"),
    (["estimate", "--model", "gpt2", "--gpu-memory", "-80GB"], "gpu-memory"),
    (["estimate", "--model", "gpt2", "--micro-batch", "0"], "positive"),
    (["estimate", "--model", "gpt2", "--seq-len", "4096"], "n_positions"),
    (["estimate", "--model", "gpt5"], "preset"),
    (["estimate", "--model", "gpt2", "--deepspeed-config", "/nonexistent/ds.json"], "does not exist"),
    (["estimate", "--model", "gpt2", "--no-such-flag"], "no-such-flag"),
    (["estimate"], "no model"),
    (["estimate", "--model", "gpt2", "--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps"),
    (["estimate", "--model", "gpt2", "--gradient-accumulation-steps", "two"], "--gradient-accumulation-steps"),
    (["estimate", "--model", "gpt2", "--accelerate-config", "/nonexistent/acc.yaml"], "does not exist"),
    (["plan", "--model", "gpt2", "--gpus", "8", "--gpu-memory", "80GiB", "--accelerate-config", "/nonexistent/acc.yaml"],
     "does not exist"),
    (["plan", "--model", "gpt2", "--gpus", "8"], "gpu-memory"),
    (["plan", "--model", "gpt2", "--gpu-memory", "80GiB"], "--gpus"),
]


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(args, needle):
    out = run(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert needle.lower() in lines[0].lower()


@pytest.mark.parametrize("name,needle", [("malformed", "not valid JSON"), ("list", "JSON object"),
                                         ("neg_bucket", "reduce_bucket_size"),
                                         ("bf16_string", "bf16.enabled is 'true': use true or false"),
                                         ("fp16_number", "fp16.enabled is 1: use true or false"),
                                         ("momentum_string", "optimizer.params.momentum is 'abc'"),
                                         ("momentum_list", "optimizer.params.momentum is [1]"),
                                         ("nesterov_no_momentum", "nesterov needs momentum > 0"),
                                         ("rmsprop_momentum", "RMSprop with momentum")])
def test_bad_deepspeed_config(bad_configs, name, needle):
    for flag in ("--deepspeed-config", "--deepspeed_config"):
        out = run("estimate", "--model", "gpt2", flag, str(bad_configs[name]))
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
        assert needle in out.stderr and "Traceback" not in out.stderr


def test_gb_and_gib_are_both_accepted_with_their_meanings():
    gb = json.loads(run("estimate", "--params", "1e9", "--gpu-memory", "80GB", "--json").stdout)
    gib = json.loads(run("estimate", "--params", "1e9", "--gpu-memory", "80GiB", "--json").stdout)
    assert gb["gpu_memory_bytes"] == 80 * 10**9 and gib["gpu_memory_bytes"] == 80 * 2**30


def test_settings_come_from_the_deepspeed_config(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "bf16": {"enabled": True},
                               "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
                               "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}}))
    out = run("estimate", "--params", "1e6", "--world-size", "2", "--deepspeed_config", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    inputs = json.loads(out.stdout)["inputs"]
    assert (inputs["micro_batch"], inputs["precision"], inputs["optimizer"], inputs["zero_stage"]) == (3, "bf16", "momentum", 2)
    assert inputs["zero"]["reduce_bucket_size"] == 1000
    # a flag beats the config
    out = run("estimate", "--params", "1e6", "--deepspeed-config", str(cfg), "--zero-stage", "1", "--json")
    assert json.loads(out.stdout)["inputs"]["zero_stage"] == 1


def test_zero_paper_cli_prints_the_figures():
    for stage, gb in ((0, "120.0"), (1, "31.4"), (2, "16.6"), (3, "1.9")):
        out = run("estimate", "--params", "7.5e9", "--world-size", "64", "--precision", "fp16", "--optimizer", "adam",
                  "--zero-stage", str(stage), "--layout", "zero-paper")
        assert out.returncode == 0 and f"{gb} GB" in out.stdout
