"""World size 3 over two torchrun "nodes" on 127.0.0.1 (2 ranks + 1 rank), one launch shared by
every assertion in this file."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from launch_helpers import finish_groups, free_port, start_group

from memprof.models import PRESETS
from memprof.run.files import load_run

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
CONFIG = REPO / "configs" / "demo.json"
TORCHRUN = Path(sys.executable).parent / "torchrun"
STEPS, SEQ_LEN, SEED = 2, 32, 11


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("torchrun") / "run"
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    procs = []
    for node_rank, nproc in ((0, 2), (1, 1)):
        cmd = [
            str(TORCHRUN), "--nnodes", "2", "--node_rank", str(node_rank), "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            str(TRAIN), "--deepspeed_config", str(CONFIG), "--model", "gpt2-tiny",
            "--steps", str(STEPS), "--seq-len", str(SEQ_LEN), "--seed", str(SEED), "--out", str(out),
        ]
        procs.append(start_group(cmd, cwd=REPO, env=env))
    results = [(res.returncode, res.stdout, res.stderr) for res in finish_groups(procs, timeout=420)]
    return {"out": out, "results": results}


def test_both_nodes_exit_cleanly(two_node_run: dict[str, Any]) -> None:
    for rc, stdout, stderr in two_node_run["results"]:
        assert rc == 0, stdout[-3000:] + stderr[-3000:]


def test_memprof_json_has_three_ranks_on_two_nodes(two_node_run: dict[str, Any]) -> None:
    out: Path = two_node_run["out"]
    assert sorted(p.name for p in out.glob("rank*.jsonl")) == ["rank0.jsonl", "rank1.jsonl", "rank2.jsonl"]
    doc = json.loads((out / "memprof.json").read_text())
    assert load_run(out)["ranks"] == doc["ranks"]  # the folder reads back as the same run
    assert [r["rank"] for r in doc["ranks"]] == [0, 1, 2] and doc["missing_ranks"] == []
    for r in doc["ranks"]:
        assert r["complete"] is True
        assert [s["step"] for s in r["steps"]] == list(range(STEPS))
    run = doc["run"]
    assert (run["world_size"], run["nodes"]) == (3, 2)
    assert (run["device_type"], run["backend"]) == ("cpu", "gloo")


def test_run_metadata_comes_from_the_flags_and_the_deepspeed_json(two_node_run: dict[str, Any]) -> None:
    run = json.loads((two_node_run["out"] / "memprof.json").read_text())["run"]
    ds = json.loads(CONFIG.read_text())
    assert run["deepspeed_config"] == ds
    assert run["zero_stage"] == ds["zero_optimization"]["stage"] == 2
    assert run["micro_batch"] == ds["train_micro_batch_size_per_gpu"]
    assert (run["optimizer"], run["precision"], run["offload_optimizer"], run["offload_param"]) == ("adamw", "fp32", "none", "none")
    assert (run["model"], run["model_config"]) == ("gpt2-tiny", PRESETS["gpt2-tiny"])
    assert (run["seq_len"], run["steps"], run["seed"]) == (SEQ_LEN, STEPS, SEED)
    assert run["activation_checkpointing"] is False and run["memory_budget_bytes"] is None
    # gpt2-tiny by hand: wte 512*64 + wpe 256*64 + 2 blocks * 49,984 + final norm 128 (lm_head tied)
    assert run["n_params"] == 512 * 64 + 256 * 64 + 2 * 49_984 + 128
    assert set(run["versions"]) >= {"torch", "deepspeed", "transformers", "memprof", "python"}


def test_ranks_train_on_different_data_from_a_random_init(two_node_run: dict[str, Any]) -> None:
    doc = json.loads((two_node_run["out"] / "memprof.json").read_text())
    first_losses = [r["steps"][0]["loss"] for r in doc["ranks"]]
    # random init -> near-uniform predictions over the 512-token vocabulary: loss ~ ln(512)
    assert all(math.isfinite(x) and abs(x - math.log(512)) < 0.3 for x in first_losses), first_losses
    # each rank reads its own shard, so the three first-step losses are not all equal
    assert len(set(first_losses)) == 3, first_losses


def test_rank_zero_prints_the_table_and_where_the_files_are(two_node_run: dict[str, Any]) -> None:
    (_, node0_out, _), (_, node1_out, _) = two_node_run["results"]
    out: Path = two_node_run["out"]
    assert f"memprof: run files in {out.resolve()}" in node0_out
    assert "memprof: run files in" not in node1_out  # only global rank 0 (on node 0) reports
    assert "peak memory per rank" in node0_out
    report = out / "report.html"
    assert report.is_file() or "report.html skipped" in node0_out
