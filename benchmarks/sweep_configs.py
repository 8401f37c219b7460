"""Launch every shipped DeepSpeed config and compare the estimate with the measurement.

  .venv/bin/python benchmarks/sweep_configs.py [--ranks 2] [--models gpt2-tiny llama-tiny ...]
      [--steps 3] [--seq-len 32] [--out runs/sweep] [--configs configs/stage0_*.json ...]

For each config: `deepspeed --num_gpus N launch/train.py` (CPU ranks with DS_ACCELERATOR=cpu when no
GPU is visible and DS_ACCELERATOR is unset; GPUs otherwise), then
`memprof compare RUN --fresh-estimate --json`. Prints one line per config (the worst checked error
and every figure outside tolerance) and exits 1 if any launch failed or any figure is outside
`memprof compare`'s tolerances. A sweep of the shipped configs with the *default* settings they
ship with (default bucket sizes included) is what a user runs first, and what the test matrix,
which uses small buckets, does not cover.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from memprof.train.ports import free_local_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _launch_env() -> dict[str, str]:
    env = dict(os.environ)
    if "DS_ACCELERATOR" not in env:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"  # CPU ranks are CPU ranks: gloo, no pretend GPU
    return env


def _launch(config: Path, model: str, out: Path, args: argparse.Namespace, steps: int) -> tuple[int, str]:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", str(args.ranks), "--master_port", str(free_local_port()),
           str(REPO / "launch" / "train.py"), "--deepspeed_config", str(config), "--model", model,
           "--steps", str(steps), "--seq-len", str(args.seq_len), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks
        except ProcessLookupError:
            pass
        log, _ = proc.communicate()
        return 124, log
    return proc.returncode, log


def _compare(out: Path) -> dict:
    res = subprocess.run([sys.executable, "-m", "memprof", "compare", str(out), "--fresh-estimate", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip())
    return json.loads(res.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", type=Path, default=sorted((REPO / "configs").glob("*.json")))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["gpt2-tiny"], help="presets; every config runs with each")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "sweep")
    parser.add_argument("--timeout", type=int, default=600)
    args = parser.parse_args(argv)

    failures = 0
    print(f"{'model':11} {'config':42} {'launch':>7} {'worst error':>12}  outside tolerance", flush=True)
    runs = [(model, config) for model in args.models for config in args.configs]
    for model, config in runs:
        name = f"{model:11} {config.stem:42}"
        out = args.out / model / config.stem
        start = time.monotonic()
        # two whole accumulation cycles at least: compare's steady cycle is then not the first
        # optimizer step, in which lazily created optimizer state does not exist yet
        gas = json.loads(config.read_text()).get("gradient_accumulation_steps", 1)
        steps = max(args.steps, 2 * gas if isinstance(gas, int) else args.steps)
        rc, log = _launch(config, model, out, args, steps)
        took = time.monotonic() - start
        if rc != 0:
            failures += 1
            tail = " | ".join(log.strip().splitlines()[-3:])
            print(f"{name} {took:6.0f}s  launch failed (exit {rc}): {tail}", flush=True)
            continue
        try:
            cmp = _compare(out)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            failures += 1
            print(f"{name} {took:6.0f}s  compare failed: {exc}", flush=True)
            continue
        checked = [r for r in cmp["rows"] if r["ok"] is not None and r["error"] is not None]
        if not checked:
            failures += 1
            print(f"{name} {took:6.0f}s  nothing was checked (no complete step?)", flush=True)
            continue
        worst = max((abs(r["error"]) for r in checked), default=0.0)
        bad = [f"rank {r['rank']} {r['what']} {r['location']} {r['name']} {r['error']:+.2%}"
               for r in cmp["rows"] if r["ok"] is False]
        failures += bool(bad)
        print(f"{name} {took:6.0f}s {worst:12.3%}  {'; '.join(bad) or '-'}", flush=True)
    print(f"{len(runs)} runs ({len(args.models)} models x {len(args.configs)} configs), "
          f"{failures} with a failed launch or a figure outside tolerance")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
