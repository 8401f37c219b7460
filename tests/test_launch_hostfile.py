"""`deepspeed --hostfile` with two nodes: world size 3 over hosts node0 (2 slots) and node1 (1 slot).

No ssh/pdsh exists here, so each "node" is started with DeepSpeed's own `--no_ssh --node_rank R`
mode (one runner per node, both on 127.0.0.1): the hostfile parsing, the world info it encodes and
the per-node rank assignment are DeepSpeed's real multi-node path; only the remote start differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from launch_helpers import DEEPSPEED, REPO, TRAIN, finish_groups, free_port, start_group


def test_two_nodes_from_a_hostfile(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\nnode1 slots=1\n")
    out = tmp_path / "run"
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    procs = [
        start_group(
            [str(DEEPSPEED), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
             "--master_addr", "127.0.0.1", "--master_port", str(port), str(TRAIN),
             "--deepspeed_config", "configs/demo.json", "--model", "gpt2-tiny", "--steps", "2",
             "--seq-len", "32", "--out", str(out)],
            cwd=REPO, env=env,
        )
        for node_rank in (0, 1)
    ]
    for res in finish_groups(procs, timeout=420):
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / "memprof.json").read_text())
    assert (doc["run"]["world_size"], doc["run"]["nodes"]) == (3, 2)
    assert [r["rank"] for r in doc["ranks"]] == [0, 1, 2] and doc["missing_ranks"] == []
    assert all(r["complete"] and len(r["steps"]) == 2 for r in doc["ranks"])
