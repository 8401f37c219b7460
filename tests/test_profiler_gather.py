"""finish() over a real 2-process gloo group: rank 0 gathers both ranks' records (no shared
folder: each rank writes its rank file to its own directory) and writes memprof.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from launch_helpers import free_port

from memprof.run.files import load_run

WORLD = 2


def _worker(rank: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from memprof.measure import MemoryProfiler

        torch.manual_seed(rank)
        # rank r's model is (r + 1) times wider, so its params differ by a known factor
        model = torch.nn.Linear(16, 8 * (rank + 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        prof = MemoryProfiler(model=model, optimizer=optimizer, out_dir=Path(root) / f"r{rank}",
                              run={"model": "linear", "world_size": WORLD})
        with prof:
            with prof.step(0) as s:
                with s.phase("forward"):
                    loss = model(torch.randn(4, 16)).sum()
                with s.phase("backward"):
                    loss.backward()
                with s.phase("step"):
                    optimizer.step()
                s.loss = loss
        doc = prof.finish()
        result = {"rank": rank, "doc_is_none": doc is None,
                  "params": (16 * 8 * (rank + 1) + 8 * (rank + 1)) * 4}
        (Path(root) / f"result{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_finish_gathers_every_rank_to_rank0(tmp_path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = {r: json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(WORLD)}
    assert results[0]["doc_is_none"] is False and results[1]["doc_is_none"] is True
    assert not (tmp_path / "r1" / "memprof.json").exists()
    doc = load_run(tmp_path / "r0" / "memprof.json")
    assert [r["rank"] for r in doc["ranks"]] == [0, 1] and doc["missing_ranks"] == []
    for r in range(WORLD):
        entry = doc["ranks"][r]
        assert entry["complete"]
        assert entry["steps"][0]["phases"]["forward"]["end"]["device"]["params"] == results[r]["params"]
