"""Proof that a refactor leaves every estimate byte-identical.

Runs ``memprof estimate --json`` in-process over a grid of setups (every preset family, ZeRO stage,
precision, optimizer of the zoo, world size, micro-batch, checkpointing, accumulation, offload, the
shipped configs in ``configs/`` and the user-style configs in ``tests/user_configs/``) and over the
run documents under ``tests/fixtures`` (the ``inputs_from_run`` path: launcher, Trainer, DDP runs),
and writes one JSON object ``{setup: sha256 of the estimate's JSON}``. The estimate's ``inputs``
echo is left out (its field names are an internal API a refactor may rename); every number, rank,
phase, category and assumption is in.

    .venv/bin/python benchmarks/estimate_fingerprint.py --out /tmp/before.json      # on the old tree
    .venv/bin/python benchmarks/estimate_fingerprint.py --check /tmp/before.json    # on the new tree

``--check`` exits 1 naming every setup whose estimate changed (or appeared / disappeared).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _estimate_json(argv: list[str]) -> str:
    from memprof.cli.estimate import main
    from memprof.errors import MemprofError

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([*argv, "--json"])
        except SystemExit as e:  # argparse's exit 2 on a bad flag
            rc = e.code
        except MemprofError as e:  # the CLI's entry point turns this into one line and exit 2
            return f"refused: {e}"
    if rc != 0:
        return f"exit {rc}: {err.getvalue().strip()}"
    doc = json.loads(out.getvalue())
    doc.pop("inputs", None)
    return json.dumps(doc, sort_keys=True)


def _grid() -> list[list[str]]:
    setups: list[list[str]] = []
    models = ["gpt2-tiny", "gpt2", "gpt2-xl", "llama-tiny", "qwen2-tiny", "tinyllama-1.1b", "llama-2-7b"]
    optimizers = ["sgd", "momentum", "nesterov", "rmsprop", "adagrad", "adam", "adamw", "amsgrad"]
    for model, stage, precision, opt in itertools.product(models, "0123", ("fp32", "bf16", "fp16"), optimizers):
        for gpus, micro, ckpt in ((1, 1, False), (2, 4, True), (3, 2, False), (8, 1, True)):
            argv = ["--model", model, "--zero-stage", stage, "--precision", precision, "--optimizer", opt,
                    "--gpus-per-node", str(gpus), "--micro-batch", str(micro), "--seq-len", "128"]
            if ckpt:
                argv.append("--activation-checkpointing")
            setups.append(argv)
    for model, stage, opt, gas, offo, offp, dev in itertools.product(
            ("gpt2-tiny", "llama-tiny", "gpt2-xl"), "0123", ("adamw", "adagrad", "amsgrad"), ("1", "3"),
            ("none", "cpu"), ("none", "cpu"), ("cuda", "cpu")):
        if offp == "cpu" and stage != "3":
            continue
        setups.append(["--model", model, "--zero-stage", stage, "--optimizer", opt, "--gradient-accumulation-steps", gas,
                       "--offload-optimizer", offo, "--offload-params", offp, "--device-type", dev, "--precision", "bf16",
                       "--gpus-per-node", "2", "--seq-len", "256", "--micro-batch", "2", "--gpu-memory", "24GiB",
                       "--host-memory", "64GiB"])
    for stage, torch_adam, attn in itertools.product("0123", (False, True), ("sdpa", "eager")):
        argv = ["--model", "gpt2", "--zero-stage", stage, "--attn-implementation", attn, "--seq-len", "512",
                "--cuda-capability", "8.0", "--nodes", "2", "--gpus-per-node", "4"]
        setups.append([*argv, "--torch-adam"] if torch_adam else argv)
    for stage, prec in itertools.product("0123", ("fp16", "bf16")):
        setups.append(["--params", "7.5e9", "--zero-stage", stage, "--precision", prec, "--optimizer", "adam",
                       "--gpus-per-node", "64", "--layout", "zero-paper"])
        setups.append(["--params", "7.5e9", "--zero-stage", stage, "--precision", prec, "--gpus-per-node", "64"])
    configs = sorted((ROOT / "configs").glob("*.json"))
    for cfg, model, gpus in itertools.product(configs, ("gpt2-tiny", "llama-tiny", "gpt2-medium"), ("1", "2", "3")):
        setups.append(["--model", model, "--deepspeed-config", str(cfg.relative_to(ROOT)), "--gpus-per-node", gpus,
                       "--seq-len", "64"])
    for cfg in sorted((ROOT / "tests" / "user_configs").iterdir()):
        flag = "--accelerate-config" if cfg.suffix in (".yaml", ".yml") else "--deepspeed-config"
        for model in ("gpt2", "llama-tiny"):
            base = ["--model", model, flag, str(cfg.relative_to(ROOT)), "--seq-len", "128"]
            setups.append(base)
            setups.append([*base, "--micro-batch", "2", "--gradient-accumulation-steps", "2", "--precision", "bf16",
                           "--gpus-per-node", "2"])
    return setups


def _run_docs() -> dict[str, str]:
    """Estimates rebuilt from recorded runs (the launcher's and the integrations' ``inputs_from_run``)."""
    from memprof.estimate import estimate, inputs_from_run

    out: dict[str, str] = {}
    for path in sorted((ROOT / "tests" / "fixtures").rglob("*.json")):
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("run"), dict):
            continue
        try:
            est = estimate(inputs_from_run(doc["run"]))
            data = est.to_json()
            data.pop("inputs", None)
            text = json.dumps(data, sort_keys=True)
        except Exception as e:  # noqa: BLE001 - a changed refusal is a changed output too
            text = f"{type(e).__name__}: {e}"
        out["run:" + str(path.relative_to(ROOT))] = text
    from memprof.models import preset_config

    for model, ddp, ds_stage, data_bytes in itertools.product(
            ("gpt2-tiny", "llama-tiny"), (None, False, True), (None, 0, 2, 3), (None, 4096)):
        run = {"model": model, "model_config": preset_config(model), "world_size": 2, "nodes": 1, "micro_batch": 2,
               "seq_len": 64, "optimizer": "adamw", "precision": "fp32", "device_type": "cpu", "torch_adam": True,
               "gradient_accumulation_steps": 2, "activation_checkpointing": ds_stage == 3}
        if ddp is not None:
            run["ddp"] = {"gradient_as_bucket_view": ddp}
        if ds_stage is not None:
            run["deepspeed_config"] = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                                       "zero_optimization": {"stage": ds_stage}, "bf16": {"enabled": ds_stage == 2},
                                       "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
        if data_bytes is not None:
            run["data_tensor_bytes"] = data_bytes
        est = estimate(inputs_from_run(run))
        data = est.to_json()
        data.pop("inputs", None)
        out[f"synthetic-run:{model} ddp={ddp} stage={ds_stage} data={data_bytes}"] = json.dumps(data, sort_keys=True)
    return out


def fingerprint() -> dict[str, str]:
    prints: dict[str, str] = {}
    setups = _grid()
    for i, argv in enumerate(setups):
        prints[" ".join(argv)] = hashlib.sha256(_estimate_json(argv).encode()).hexdigest()
        if i % 500 == 0:
            print(f"  {i}/{len(setups)} setups", file=sys.stderr)
    for key, text in _run_docs().items():
        prints[key] = hashlib.sha256(text.encode()).hexdigest()
    return prints


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="write the fingerprint here")
    g.add_argument("--check", help="compare against this fingerprint; exit 1 on any difference")
    args = p.parse_args()
    prints = fingerprint()
    if args.out:
        Path(args.out).write_text(json.dumps(prints, indent=0, sort_keys=True))
        print(f"{len(prints)} setups fingerprinted into {args.out}")
        return 0
    before = json.loads(Path(args.check).read_text())
    changed = sorted(k for k in before.keys() | prints.keys() if before.get(k) != prints.get(k))
    for k in changed[:50]:
        print(f"changed: {k}")
    print(f"{len(prints)} setups, {len(changed)} changed")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
