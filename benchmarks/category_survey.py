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
    python benchmarks/category_survey.py --find /tmp/pytest-basetemp --details  # every run folder under it

``--find`` walks folders for run folders (a ``memprof.json`` or ``rank<R>.jsonl`` files: the
integrations' runs, DDP and FSDP2 runs included), so the tests' own launches can be surveyed from
their ``--basetemp``. Each run is described (kind: launcher or integration, engine, ranks, ZeRO
stage, precision, accumulation, checkpointing, LoRA); a run memprof cannot compare (no complete
step, an estimator error) is listed with the reason and ``other``'s share measured alone.
``--details`` prints, per run and phase peak, ``other``'s share and every category beyond 3% of
the peak with its measured and estimated bytes.

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
    # as configs/stage0_{nesterov,rmsprop,adagrad,amsgrad}.json spell them
    "nesterov": {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.9, "nesterov": True}},
    "rmsprop": {"type": "RMSprop", "params": {"lr": 1e-4}},
    "adagrad": {"type": "Adagrad", "params": {"lr": 1e-3}},
    "amsgrad": {"type": "Adam", "params": {"lr": 1e-4, "amsgrad": True, "torch_adam": True}},
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
    # session 24: the rest of the optimizer zoo, 3 ranks at ZeRO-3 with checkpointing, offload at another width
    "new-llama-z0-nesterov-fp32-gas2-seq64": ("llama-tiny", 2, ds_config(0, "nesterov", False, gas=2), 64),
    "new-llamaw96-z1-rmsprop-bf16-gas3-seq40": (LLAMA_WIDE, 2, ds_config(1, "rmsprop", True, gas=3, **SMALL), 40),
    "new-gpt2w96-z3-adagrad-fp32-ckpt-n3-seq56": (GPT2_WIDE, 3, ds_config(3, "adagrad", False, top=CKPT, **Z3), 56),
    "new-gpt2w96-z2-amsgrad-fp32-offload-seq48": (GPT2_WIDE, 2, ds_config(2, "amsgrad", False, **SMALL, **OFFLOAD), 48),
    "new-llamaw96-z3-adamw-fp32-ckpt-seq64": (LLAMA_WIDE, 2, ds_config(3, "adamw", False, top=CKPT, **Z3), 64),
    "new-llama-z3-sgd-bf16-ckpt-mb1-seq96": ("llama-tiny", 3, ds_config(3, "sgd", True, micro=1, top=CKPT, **Z3), 96),
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


def compare_json(run: Path, recorded: bool = False) -> dict[str, Any]:
    """``memprof compare RUN --fresh-estimate --json``, in-process: memprof's own comparison (the
    run's recorded estimate instead with ``recorded``)."""
    from memprof.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["compare", str(run), "--json", *([] if recorded else ["--fresh-estimate"])])
    if code != 0:
        raise RuntimeError(f"memprof compare {run} exited {code}: {err.getvalue().strip()}")
    return json.loads(out.getvalue())


def is_run_folder(d: Path) -> bool:
    return (d / "memprof.json").is_file() or any(d.glob("rank*.jsonl"))


def find_runs(roots: list[Path]) -> dict[str, Path]:
    """Every run folder under ``roots`` (a folder holding memprof.json or rank<R>.jsonl), named by
    its path below its root (the root's own name when the root is one)."""
    found: dict[str, Path] = {}
    for root in roots:
        for d in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
            if is_run_folder(d):
                rel = d.relative_to(root)
                found[str(Path(root.name) / rel) if str(rel) != "." else root.name] = d
    return found


def describe(run: dict[str, Any]) -> dict[str, Any]:
    """What kind of run this is, from its ``run`` record (memprof/run/files.py, observed_run.py)."""
    from memprof.estimate.from_run import recorded_engine
    from memprof.report.run_engine import precision_of

    engine = recorded_engine(run).value
    ds = run.get("deepspeed_config") or {}
    if engine == "deepspeed" and not ds and run.get("integration"):
        engine = "torch"  # an integration's run without DeepSpeed, DDP or FSDP2 (the estimate takes it as stage 0)
    trainer = run.get("trainer") or {}
    # launch/train.py records its data set's bytes; a user's script under MemoryProfiler does not
    kind = run.get("integration") or ("launcher" if "data_tensor_bytes" in run else "MemoryProfiler")
    if kind == "trainer" and isinstance(trainer, dict) and trainer.get("trainer_class"):
        kind = f"trainer:{trainer['trainer_class']}"
    return {"kind": kind, "engine": engine, "ranks": run.get("world_size"),
            "zero_stage": run.get("zero_stage") if engine == "deepspeed" else None,
            "precision": precision_of(run), "gas": run.get("gradient_accumulation_steps") or 1,
            "ckpt": bool(run.get("activation_checkpointing")), "lora": bool(run.get("peft_config")),
            "offload": run.get("offload_optimizer") not in (None, "none"),
            "optimizer": run.get("optimizer"), "model": run.get("model"),
            "micro_batch": run.get("micro_batch"), "seq_len": run.get("seq_len"),
            "ds_optimizer": (ds.get("optimizer") or {}).get("type") if isinstance(ds, dict) else None}


def measured_only_rows(name: str, run_doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Without an estimate: per (rank, phase) the measured peak and other's share, at the snapshot
    memprof compare would read (memprof.compare.steady_cycle / peak_snapshots)."""
    from memprof.compare import peak_snapshots, run_gas, steady_cycle

    rows = []
    for entry in run_doc["ranks"]:
        for phase, snap in peak_snapshots(steady_cycle(entry, run_gas(run_doc))).items():
            rec = snap["phases"][phase]
            peak, dev = int(rec["peak_total"]), rec["peak"].get("device") or {}
            rows.append({"run": name, "rank": int(entry["rank"]), "phase": phase, "step": int(snap["step"]),
                         "peak": peak, "errors": {}, "measured": {k: int(v) for k, v in dev.items()}, "estimated": {},
                         "other_share": int(dev.get("other", 0)) / peak if peak else 0.0, "worst": 0.0,
                         "estimated_peak": None})
    return rows


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
    for r in cmp["rows"]:
        if r["what"] == "peak" and (r["rank"], r["name"]) in by_peak:
            by_peak[(r["rank"], r["name"])]["estimated_peak"] = r["estimated"]
    for row in by_peak.values():
        row["other_share"] = row["measured"].get("other", 0) / row["peak"] if row["peak"] else 0.0
        row["worst"] = max((abs(e) for e in row["errors"].values()), default=0.0)
    return list(by_peak.values())


def mark_first_cycle(info: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flag the rows of a run whose only complete cycle is its first (a run stopped early on
    purpose, tests/test_integration_trainer.py ``raised`` / ``killed``): lazily created optimizer
    state does not exist in that cycle's forward and backward, so its rows differ from the steady
    estimate for that reason alone (compare's own warning); :func:`summary` counts them apart."""
    first = any("first optimizer step" in w for w in info.get("warnings") or [])
    info["first_cycle_only"] = first
    for r in rows:
        r["first_cycle_only"] = first
    return rows


def survey_run(name: str, run: Path, recorded: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's description and its rows; a run memprof cannot compare gets measured-only rows
    and its reason under ``error``."""
    from memprof.run.files import load_run

    doc = load_run(run)
    info = {"run": name, "path": str(run), **describe(doc["run"]), "error": None, "note": None}
    try:
        cmp = compare_json(run, recorded)
        info["warnings"] = cmp.get("warnings") or []
        return info, mark_first_cycle(info, rows_of(name, cmp))
    except Exception as e:  # noqa: BLE001 - the survey lists what it could not compare, and why
        info["error"] = " ".join(str(e).split())[:300]
    if "not a multiple of the node count" in info["error"] and not recorded:
        # ranks spread unevenly over nodes (tests/test_launch_torchrun.py: 2 + 1): the estimator
        # refuses the node count, which only sizes host memory per node; each rank's device
        # estimate does not depend on it, so compare against the estimate for one node
        from memprof.compare import compare_run
        from memprof.estimate import estimate, inputs_from_run

        one_node = {**doc["run"], "nodes": 1}
        cmp = compare_run(doc, estimate(inputs_from_run(one_node)).to_json()).to_json()
        info["note"], info["error"] = f"estimated as 1 node ({info['error'].split('error: ')[-1]})", None
        info["warnings"] = cmp.get("warnings") or []
        return info, mark_first_cycle(info, rows_of(name, cmp))
    if info["error"]:
        try:
            return info, measured_only_rows(name, doc)
        except Exception as e2:  # noqa: BLE001
            info["error"] += f"; measured rows: {e2}"
    return info, []


TOLERANCE = 0.03


def details(infos: list[dict[str, Any]], rows: list[dict[str, Any]], markdown: bool) -> str:
    """Per run and phase peak: other's share and every category beyond 3% of the peak (measured ->
    estimated KiB, Δ % of the peak); ranks with the same figures are merged."""
    head = ["run", "kind", "engine", "ranks", "stage", "prec", "gas/ckpt/lora", "phase", "ranks shown", "peak KiB",
            "est. peak KiB", "other/peak %", "categories beyond 3% of the peak: measured -> estimated KiB (Δ % of peak)"]
    body = []
    for info in infos:
        mine = [r for r in rows if r["run"] == info["run"]]
        flags = f"{info['gas']}/{'y' if info['ckpt'] else 'n'}/{'y' if info['lora'] else 'n'}"
        label = info["run"] + (" (first cycle only)" if info.get("first_cycle_only") else "")
        lead = [label, info["kind"], info["engine"], str(info["ranks"]),
                "-" if info["zero_stage"] is None else str(info["zero_stage"]), str(info["precision"]), flags]
        if not mine:
            body.append([*lead, "-", "-", "-", "-", "-", f"not compared: {info['error']}"])
            continue
        merged: dict[tuple, list[int]] = {}
        for phase in ("forward", "backward", "step"):
            for r in sorted((r for r in mine if r["phase"] == phase), key=lambda r: r["rank"]):
                misses = tuple(sorted((c, r["measured"].get(c, 0), r["estimated"].get(c, 0), round(e, 3))
                                      for c, e in r["errors"].items() if abs(e) > TOLERANCE))
                key = (phase, r["peak"] // 1024, (r.get("estimated_peak") or 0) // 1024, round(r["other_share"], 3), misses)
                merged.setdefault(key, []).append(r["rank"])
        for (phase, peak, est_peak, other, misses), ranks in merged.items():
            text = "; ".join(f"{c} {m / 1024:,.0f} -> {e / 1024:,.0f} ({100 * d:+.1f})" for c, m, e, d in misses)
            if info["error"]:
                text = f"no estimate: {info['error']}"
            elif info.get("note"):
                text = f"{text or 'none'} [{info['note']}]"
            body.append([*lead, phase, ",".join(map(str, ranks)), f"{peak:,}", f"{est_peak:,}" if est_peak else "-",
                         f"{100 * other:.1f}", text or "none"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head, *body])


def per_run(infos: list[dict[str, Any]], rows: list[dict[str, Any]], markdown: bool) -> str:
    """One line per run: what it is, ``other``'s largest share of each phase's peak (over ranks),
    how many phase peaks have a category beyond 3% of the peak, and the worst such category with
    its measured and estimated bytes."""
    head = ["run", "kind", "engine", "ranks", "stage", "prec", "gas/ckpt/lora", "other/peak % fwd/bwd/step",
            "peaks beyond 3%", "worst: rank phase category measured -> estimated KiB (Δ % of peak)"]
    body = []
    for info in infos:
        mine = [r for r in rows if r["run"] == info["run"]]
        flags = f"{info['gas']}/{'y' if info['ckpt'] else 'n'}/{'y' if info['lora'] else 'n'}"
        other = "/".join(f"{100 * max((r['other_share'] for r in mine if r['phase'] == ph), default=0):.1f}"
                         for ph in ("forward", "backward", "step"))
        beyond = [r for r in mine if r["worst"] > TOLERANCE]
        worst_text = "-"
        if info["error"]:
            worst_text = f"not compared: {info['error']}"
        elif beyond:
            w = max(beyond, key=lambda r: r["worst"])
            c = max(w["errors"], key=lambda k: abs(w["errors"][k]))
            worst_text = (f"{w['rank']} {w['phase']} {c} {w['measured'].get(c, 0) / 1024:,.0f} -> "
                          f"{w['estimated'].get(c, 0) / 1024:,.0f} ({100 * w['errors'][c]:+.1f})")
        name = info["run"] + (" (first cycle only)" if info.get("first_cycle_only") else "")
        body.append([name, info["kind"], info["engine"], str(info["ranks"]),
                     "-" if info["zero_stage"] is None else str(info["zero_stage"]), str(info["precision"]), flags,
                     other, f"{len(beyond)} of {len(mine)}", worst_text])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head, *body])


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
    """Per phase: peaks, how many have a category off by more than 3% of the peak, and the worst
    (runs whose only complete cycle is the first left out: :func:`mark_first_cycle`)."""
    head = ["phase", "peaks compared", "beyond 3% of the peak", "worst (run, rank: category Δ % of peak)"]
    body = []
    for phase in ("forward", "backward", "step"):
        mine = [r for r in rows if r["phase"] == phase and not r.get("first_cycle_only")]
        if not mine:
            continue
        worst = max(mine, key=lambda r: r["worst"])
        compared = [r for r in mine if r["errors"]]
        if not worst["errors"]:
            body.append([phase, f"{len(compared)} of {len(mine)}", "0", "-"])
            continue
        cat = max(worst["errors"], key=lambda c: abs(worst["errors"][c]))
        other_over = sum(r["other_share"] > 0.01 for r in mine)
        body.append([phase, f"{len(compared)} of {len(mine)}", str(sum(r["worst"] > TOLERANCE for r in compared)),
                     f"{worst['run']}, {worst['rank']}: {cat} {100 * worst['errors'][cat]:+.1f}; "
                     f"other > 1% of the peak at {other_over} of {len(mine)}"])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(b) + " |" for b in body])
    return "\n".join("  ".join(line) for line in [head, *body])


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, help="run folders to compare instead of launching")
    p.add_argument("--find", nargs="+", type=Path, help="compare every run folder under these folders instead of launching")
    p.add_argument("--recorded", action="store_true", help="compare against the run's recorded estimate, not a fresh one")
    p.add_argument("--per-run", action="store_true", help="print one line per run (other's share per phase, the worst category)")
    p.add_argument("--details", action="store_true",
                   help="print per run and phase peak other's share and each category beyond 3%% (bytes)")
    p.add_argument("--work", type=Path, default=Path("/tmp/category_survey"), help="where launches write")
    p.add_argument("--only", nargs="+", choices=sorted(CASES), help="launch only these cases")
    p.add_argument("--keep", action="store_true", help="do not launch a case whose run folder under --work has a memprof.json")
    p.add_argument("--out", type=Path,
                   help='write {"runs": each run\'s description, "rows": every row (measured and estimated bytes too)} as JSON')
    p.add_argument("--top", type=int, default=None, help="print only the N worst rows")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.find:
        bad = [str(d) for d in args.find if not d.is_dir()]
        if bad:
            print(f"error: not a folder: {', '.join(bad)}", file=sys.stderr)
            return 2
        runs = find_runs(args.find)
    elif args.runs:
        bad = [str(d) for d in args.runs if not is_run_folder(d)]
        if bad:
            print(f"error: no memprof.json or rank<R>.jsonl in {', '.join(bad)}", file=sys.stderr)
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
    infos: list[dict[str, Any]] = []
    for name, run in runs.items():
        info, mine = survey_run(name, run, args.recorded)
        infos.append(info)
        rows += mine
        if info["error"]:
            say(f"{name}: not compared: {info['error']}")
    if args.out:
        args.out.write_text(json.dumps({"runs": infos, "rows": sorted(rows, key=lambda r: -r["worst"])}, indent=1))
    if args.per_run:
        print(per_run(infos, rows, args.markdown))
        print()
    if args.details:
        print(details(infos, rows, args.markdown))
        print()
    print(table(rows, args.top, args.markdown))
    print()
    print(summary(rows, args.markdown))
    say(f"{len(runs)} runs, {len(rows)} phase peaks; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
