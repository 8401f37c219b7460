"""Per-category agreement of the estimator with the profiler at every phase peak (issue 17).

Launches a list of small multi-rank CPU runs of ``launch/train.py`` (gpt2-tiny and llama-tiny, ZeRO
0-3, fp32 and bf16, optimizer offload, gradient accumulation, activation checkpointing, and a few
shapes the tests do not contain), each under ``flock /tmp/memprof-heavy.lock`` (each launch takes
the lock itself: do not wrap the whole script in flock), or reads run folders given with ``--runs``.
For each run it takes memprof's own comparison (``memprof compare RUN --fresh-estimate --json``, run
in-process: its ``category_rows``, memprof/compare.py) and prints one table: run, rank, phase, the
phase's measured peak, ``other``'s share of it, and each category's (estimated - measured) as a
share of that peak, the worst row first.

    python benchmarks/category_survey.py --work /tmp/survey --out /tmp/survey.json --markdown
    python benchmarks/category_survey.py --runs /tmp/survey/* --markdown     # re-compare, no launch

The launches use the tests' settings (tests/launch_helpers.py launch_deepspeed: seq 32, micro-batch
2, the shipped text; tests/test_measured_vs_estimated*.py: 50,000-element buckets, persistence
threshold 256) unless a case says otherwise; accumulation runs take two whole cycles so the compared
cycle is not the first optimizer step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "launch" / "train.py"
LOCK = "/tmp/memprof-heavy.lock"
LAUNCH_TIMEOUT_S = 900

SMALL = {"reduce_bucket_size": 50_000, "allgather_bucket_size": 50_000}
Z3 = {**SMALL, "stage3_param_persistence_threshold": 256, "stage3_prefetch_bucket_size": 50_000}
OPTIMIZERS = {
    "sgd": {"type": "SGD", "params": {"lr": 1e-3}},
    "momentum": {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9}},
    "adamw": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
}
# shapes no test launches (HF config.json dicts for --model-config)
GPT2_WIDE = {"model_type": "gpt2", "vocab_size": 512, "n_positions": 256, "n_embd": 96, "n_layer": 3,
             "n_head": 4, "n_inner": None, "activation_function": "gelu_new", "tie_word_embeddings": True,
             "bos_token_id": 0, "eos_token_id": 0}
LLAMA_WIDE = {"model_type": "llama", "vocab_size": 512, "hidden_size": 96, "intermediate_size": 256,
              "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "hidden_act": "silu", "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
              "attention_dropout": 0.0, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}


def ds_config(stage: int, opt: str, bf16: bool, gas: int = 1, micro: int = 2, top: dict | None = None,
              **zero: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
                           "steps_per_print": 10**6, "optimizer": OPTIMIZERS[opt],
                           "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage, **zero}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return {**cfg, **(top or {})}


CKPT = {"activation_checkpointing": {"partition_activations": False}}
OFFLOAD = {"offload_optimizer": {"device": "cpu"}}

# name: (model preset or HF config dict, ranks, DeepSpeed config, seq len)
CASES: dict[str, tuple[Any, int, dict[str, Any], int]] = {
    "gpt2-z0-sgd-fp32": ("gpt2-tiny", 2, ds_config(0, "sgd", False), 32),
    "gpt2-z0-adamw-bf16-gas2": ("gpt2-tiny", 2, ds_config(0, "adamw", True, gas=2), 32),
    "gpt2-z0-adamw-fp32-ckpt-gas2": ("gpt2-tiny", 2, ds_config(0, "adamw", False, gas=2, top=CKPT), 32),
    "gpt2-z1-adamw-fp32": ("gpt2-tiny", 2, ds_config(1, "adamw", False, **SMALL), 32),
    "gpt2-z2-adamw-bf16": ("gpt2-tiny", 2, ds_config(2, "adamw", True, **SMALL), 32),
    "gpt2-z2-adamw-bf16-offload-gas2": ("gpt2-tiny", 2, ds_config(2, "adamw", True, gas=2, **SMALL, **OFFLOAD), 32),
    "gpt2-z2-adamw-fp32-gas2-n3": ("gpt2-tiny", 3, ds_config(2, "adamw", False, gas=2, **SMALL), 32),
    "gpt2-z3-adamw-fp32": ("gpt2-tiny", 2, ds_config(3, "adamw", False, **Z3), 32),
    "llama-z0-sgd-fp32": ("llama-tiny", 2, ds_config(0, "sgd", False), 32),
    "llama-z1-adamw-fp32-ckpt": ("llama-tiny", 2, ds_config(1, "adamw", False, top=CKPT, **SMALL), 32),
    "llama-z2-adamw-bf16": ("llama-tiny", 2, ds_config(2, "adamw", True, **SMALL), 32),
    "llama-z3-adamw-bf16": ("llama-tiny", 2, ds_config(3, "adamw", True, **Z3), 32),
    # not in the tests: other widths / depths, sequence lengths and micro-batches
    "new-gpt2w96-z1-adamw-fp32-mb3-seq64": (GPT2_WIDE, 2, ds_config(1, "adamw", False, micro=3, **SMALL), 64),
    "new-gpt2-z0-momentum-bf16-ckpt-mb4-seq96": ("gpt2-tiny", 2, ds_config(0, "momentum", True, micro=4, top=CKPT), 96),
    "new-llamaw96-z2-adamw-fp32-mb1-seq80": (LLAMA_WIDE, 2, ds_config(2, "adamw", False, micro=1, **SMALL), 80),
    "new-llamaw96-z3-momentum-bf16-mb3-seq48": (LLAMA_WIDE, 2, ds_config(3, "momentum", True, micro=3, **Z3), 48),
}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def launch(name: str, work: Path) -> Path:
    """One flocked `deepspeed --num_gpus N launch/train.py` run of case ``name``; its run folder."""
    from memprof.train.ports import free_local_port

    model, ranks, cfg, seq = CASES[name]
    out = work / name
    cfg_path = work / f"{name}.ds.json"
    cfg_path.write_text(json.dumps(cfg))
    if isinstance(model, dict):
        model_path = work / f"{name}.model.json"
        model_path.write_text(json.dumps(model))
        model_args = ["--model-config", str(model_path)]
    else:
        model_args = ["--model", model]
    steps = 2 * int(cfg["gradient_accumulation_steps"])  # two cycles: the second is steady
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = ["flock", LOCK, str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(free_local_port()),
           str(TRAIN), "--deepspeed_config", str(cfg_path), *model_args, "--steps", str(steps),
           "--seq-len", str(seq), "--out", str(out)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        raise RuntimeError(f"{name}: not finished in {LAUNCH_TIMEOUT_S} s, killed") from None
    if proc.returncode != 0 or not (out / "memprof.json").is_file():
        tail = "\n".join(text.splitlines()[-20:])
        raise RuntimeError(f"{name}: launch exited {proc.returncode}\n{tail}")
    say(f"{name}: done in {time.monotonic() - start:.0f} s (lock wait included)")
    return out


def compare_json(run: Path) -> dict[str, Any]:
    """``memprof compare RUN --fresh-estimate --json``, in-process: memprof's own comparison."""
    from memprof.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["compare", str(run), "--fresh-estimate", "--json"])
    if code != 0:
        raise RuntimeError(f"memprof compare {run} exited {code}: {err.getvalue().strip()}")
    return json.loads(out.getvalue())


def rows_of(name: str, cmp: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (rank, phase): the phase's measured peak, other's share, each category's error."""
    by_peak: dict[tuple[int, str], dict[str, Any]] = {}
    for r in cmp["category_rows"]:
        phase, category = r["name"].split("/", 1)
        row = by_peak.setdefault((r["rank"], phase), {"run": name, "rank": r["rank"], "phase": phase,
                                                     "step": r["step"], "peak": r["share_of"], "errors": {},
                                                     "measured": {}, "estimated": {}})
        row["measured"][category], row["estimated"][category] = r["measured"], r["estimated"]
        if r["error"] is not None:
            row["errors"][category] = r["error"]
    for row in by_peak.values():
        row["other_share"] = row["measured"].get("other", 0) / row["peak"] if row["peak"] else 0.0
        row["worst"] = max((abs(e) for e in row["errors"].values()), default=0.0)
    return list(by_peak.values())


def table(rows: list[dict[str, Any]], top: int | None, markdown: bool) -> str:
    rows = sorted(rows, key=lambda r: -r["worst"])[:top]
    cats = [c for c in ("params", "master_params", "grads", "optimizer_state", "activations", "comm_buffers", "other")
            if any(abs(r["errors"].get(c, 0)) >= 0.0005 for r in rows)]
    head = ["run", "rank", "phase", "peak KiB", "other/peak %", *[f"Δ {c} %" for c in cats]]
    body = [[r["run"], str(r["rank"]), r["phase"], f"{r['peak'] / 1024:,.0f}", f"{100 * r['other_share']:.1f}",
             *[f"{100 * r['errors'].get(c, 0):+.1f}" for c in cats]] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head, *body])


def summary(rows: list[dict[str, Any]], markdown: bool) -> str:
    """Per phase: peaks, how many have a category off by more than 3% of the peak, and the worst."""
    head = ["phase", "peaks", "beyond 3% of the peak", "worst (run, rank: category Δ % of peak)"]
    body = []
    for phase in ("forward", "backward", "step"):
        mine = [r for r in rows if r["phase"] == phase]
        if not mine:
            continue
        worst = max(mine, key=lambda r: r["worst"])
        cat = max(worst["errors"], key=lambda c: abs(worst["errors"][c]))
        body.append([phase, str(len(mine)), str(sum(r["worst"] > 0.03 for r in mine)),
                     f"{worst['run']}, {worst['rank']}: {cat} {100 * worst['errors'][cat]:+.1f}"])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(b) + " |" for b in body])
    return "\n".join("  ".join(line) for line in [head, *body])


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, help="run folders to compare instead of launching")
    p.add_argument("--work", type=Path, default=Path("/tmp/category_survey"), help="where launches write")
    p.add_argument("--only", nargs="+", choices=sorted(CASES), help="launch only these cases")
    p.add_argument("--keep", action="store_true", help="do not launch a case whose run folder under --work has a memprof.json")
    p.add_argument("--out", type=Path, help="write every row (measured and estimated bytes too) as JSON")
    p.add_argument("--top", type=int, default=None, help="print only the N worst rows")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.runs:
        bad = [str(d) for d in args.runs if not (d / "memprof.json").is_file()]
        if bad:
            print(f"error: no memprof.json in {', '.join(bad)}", file=sys.stderr)
            return 2
        runs = {d.name: d for d in args.runs}
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        names = args.only or list(CASES)
        runs = {}
        for i, name in enumerate(names, 1):
            if args.keep and (args.work / name / "memprof.json").is_file():
                say(f"kept {i}/{len(names)}: {name} (already in {args.work})")
                runs[name] = args.work / name
                continue
            say(f"launching {i}/{len(names)}: {name} (load {os.getloadavg()[0]:.2f})")
            try:
                runs[name] = launch(name, args.work)
            except RuntimeError as e:
                say(f"FAILED {e}")
    rows: list[dict[str, Any]] = []
    for name, run in runs.items():
        rows += rows_of(name, compare_json(run))
    if args.out:
        args.out.write_text(json.dumps(sorted(rows, key=lambda r: -r["worst"]), indent=1))
    print(table(rows, args.top, args.markdown))
    print()
    print(summary(rows, args.markdown))
    say(f"{len(runs)} runs, {len(rows)} phase peaks; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
