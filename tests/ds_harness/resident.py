"""Run several DeepSpeed configurations one after another in ONE launch and record who owns what.

Launched by tests/test_ownership_deepspeed.py as
``deepspeed --num_gpus 2 tests/ds_harness/resident.py --spec SPEC.json --out DIR``.
For each case of the spec (a name, model config overrides on top of a memprof preset, a DeepSpeed
config) it builds a fresh seeded model of the preset's family (``memprof.train.model.build_model``:
GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM) and engine, runs two
training steps and records:

* ``resident``: ``owned_breakdown(owned_storages(engine))`` after the second ``engine.step()``;
* ``mid_backward``: the same, taken inside the second backward (a hook on the token-embedding
  output, i.e. after every transformer block's gradients were produced), when asked;
* ``unowned_reachable``: storages reachable from the engine's attributes that the walk did not
  claim (an independent completeness audit, debug-only: it walks the object graph);
* ``zero3_params``: for ZeRO-3, which parameters are persistent and how much of each is gathered.

Each rank writes ``DIR/rank<R>.json``. Measuring owned bytes (not process totals) is deliberate:
ZeRO-3 leaves ~1.9 MB alive after its engine is dropped (field notes), which would bleed into the
next case's totals.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch

from memprof.measure.ownership import owned_breakdown, owned_storages, storage_key
from memprof.models import preset_config
from memprof.run.deepspeed_shm import release_after_peers_mapped
from memprof.train.model import build_model, model_classes

SEQ_LEN = 32
STEPS = 2


def _reachable_storages(root: Any, max_depth: int = 8) -> dict[tuple[str, int], tuple[str, int]]:
    """storage key -> (shortest attribute path, nbytes) for tensors reachable from ``root``."""
    out: dict[tuple[str, int], tuple[str, int]] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(root, "engine", 0)]
    while stack:
        obj, path, depth = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta" and obj.untyped_storage().nbytes() > 0:
                key = storage_key(obj)
                if key not in out or len(path) < len(out[key][0]):
                    out[key] = (path, int(obj.untyped_storage().nbytes()))
            for attr in ("grad", "ds_tensor", "grad_accum"):
                value = getattr(obj, attr, None)
                if value is not None:
                    stack.append((value, f"{path}.{attr}", depth + 1))
            continue
        if depth >= max_depth or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            continue
        if isinstance(obj, dict):
            for k, v in list(obj.items()):
                if isinstance(k, torch.Tensor):
                    stack.append((k, f"{path}{{key}}", depth + 1))
                stack.append((v, f"{path}[{k!r}]"[:160], depth + 1))
        elif isinstance(obj, (list, tuple, set)):
            for i, v in enumerate(obj):
                stack.append((v, f"{path}[{i}]", depth + 1))
        elif isinstance(obj, torch.nn.Module):
            for n, p in obj.named_parameters():
                stack.append((p, f"{path}.{n}", depth + 1))
            for n, b in obj.named_buffers():
                stack.append((b, f"{path}.{n}", depth + 1))
            # the engine is itself a Module: its optimizer & co live in plain attributes
            for k, v in list(vars(obj).items()):
                if k not in ("_parameters", "_buffers", "_modules"):
                    stack.append((v, f"{path}.{k}", depth + 1))
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
            for k, v in list(vars(obj).items()):
                stack.append((v, f"{path}.{k}", depth + 1))
    return out


def _zero3_param_report(module: torch.nn.Module) -> dict[str, Any] | None:
    params = list(module.parameters())
    if not params or not hasattr(params[0], "ds_tensor"):
        return None
    return {
        "persistent_numels": sorted(int(p.ds_numel) for p in params if getattr(p, "ds_persist", False)),
        "gathered_numel_persistent": sum(p.data.numel() for p in params if getattr(p, "ds_persist", False)),
        "gathered_numel_other": sum(p.data.numel() for p in params if not getattr(p, "ds_persist", False)),
        "partition_numels": [int(p.ds_tensor.ds_numel) for p in params],
    }


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    model_cfg = {**preset_config(case.get("preset", "gpt2-tiny")), **case.get("model", {})}
    if model_cfg.get("model_type", "gpt2") == "gpt2":
        # gpt2 presets inherit eos/bos 50256 from HF defaults; keep ids inside the tiny vocabulary.
        model_cfg.setdefault("bos_token_id", 0)
        model_cfg.setdefault("eos_token_id", 0)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        **case["ds_config"],
    }
    model = build_model(model_cfg, seed=0)  # torch.manual_seed(0), then the family's causal-LM class
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    snapshots: dict[str, Any] = {}
    step_index = {"i": 0}

    def snapshot_in_backward(grad: torch.Tensor) -> None:
        if step_index["i"] == STEPS - 1 and "mid_backward" not in snapshots:
            snapshots["mid_backward"] = owned_breakdown(owned_storages(engine))  # noqa: F821 - bound before any backward

    handle = None
    if case.get("mid_backward"):
        wte = engine.module.get_input_embeddings()  # GPT-2's wte, the Llama family's embed_tokens

        def hook_embedding_output(mod: torch.nn.Module, inp: Any, out: torch.Tensor) -> None:
            out.register_hook(snapshot_in_backward)  # a forward hook must return None

        handle = wte.register_forward_hook(hook_embedding_output)

    generator = torch.Generator().manual_seed(1234 + torch.distributed.get_rank())
    for i in range(STEPS):
        step_index["i"] = i
        ids = torch.randint(0, model_cfg["vocab_size"], (1, SEQ_LEN), generator=generator)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    if handle is not None:
        handle.remove()

    started = time.perf_counter()
    owned = owned_storages(engine)
    walk_ms = (time.perf_counter() - started) * 1000
    reachable = _reachable_storages(engine)
    unowned = sorted(((path, nbytes) for key, (path, nbytes) in reachable.items() if key not in owned),
                     key=lambda item: -item[1])
    inner = getattr(engine.optimizer, "optimizer", None)
    result = {
        "engine_optimizer": type(engine.optimizer).__name__,
        "inner_optimizer": type(inner).__name__ if inner is not None else None,
        "basic_optimizer": type(engine.basic_optimizer).__name__,
        "resident": owned_breakdown(owned),
        "mid_backward": snapshots.get("mid_backward"),
        "owned": sorted([o.category, o.location, o.nbytes] for o in owned.values()),
        "unowned_reachable": unowned,
        "zero3_params": _zero3_param_report(engine.module),
        "walk_ms": walk_ms,
        "num_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()),
    }
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, model, owned, reachable
    gc.collect()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args, _ = parser.parse_known_args()  # the launcher adds --local_rank
    spec = json.loads(Path(args.spec).read_text())
    for case in spec["cases"]:  # import every model class before any engine exists (see model_classes)
        model_classes(preset_config(case.get("preset", "gpt2-tiny")).get("model_type", "gpt2"))
    deepspeed.init_distributed()
    rank = torch.distributed.get_rank()
    release_after_peers_mapped(rank, torch.distributed.get_world_size())  # DeepSpeed's CPU shm segment
    results: dict[str, Any] = {"world_size": torch.distributed.get_world_size(), "rank": rank, "cases": {}}
    started = time.monotonic()
    for case in spec["cases"]:
        if rank == 0:  # progress, so that a launch killed on timeout shows which case it was in
            print(f"[{time.monotonic() - started:6.1f} s] case {case['name']}", flush=True)
        try:
            results["cases"][case["name"]] = run_case(case)
        except Exception as exc:  # record and go on: one broken case must not hide the others
            results["cases"][case["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"[rank {rank}] case {case['name']} failed: {exc!r}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, out / f"rank{rank}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
