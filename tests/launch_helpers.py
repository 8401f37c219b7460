"""Shared by the tests that launch real DeepSpeed runs: a free port and a launch wrapper."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_deepspeed(
    n_ranks: int, ds_config: dict[str, Any], out: Path, *, steps: int = 3, seq_len: int = 32, model: str = "gpt2-tiny", timeout: int = 420
) -> subprocess.CompletedProcess:
    """Run launch/train.py under `deepspeed --num_gpus N` on CPU ranks with the given DS config."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = out.parent / f"{out.name}.ds.json"
    cfg.write_text(json.dumps(ds_config))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [
        str(DEEPSPEED), "--num_gpus", str(n_ranks), "--master_port", str(free_port()), str(TRAIN),
        "--deepspeed_config", str(cfg), "--model", model, "--steps", str(steps), "--seq-len", str(seq_len),
        "--out", str(out),
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
