"""Benchmark: the estimator is pure arithmetic.

* one estimate of a 175B-parameter model (bare count, ZeRO-3, 1024 ranks): must take well under 1 s
  and import no torch;
* a 10,000-configuration sweep (the planner's inner loop: stage x world size x micro-batch x
  precision x optimizer on GPT-2 XL, and the same on Llama-2-7B at seq 4096): must take under 1 s;
* LoRA: one estimate of Llama-2-70B r=16 all-linear under 20 ms; a 10,000-setup sweep with a
  PEFT adapter config (Llama-2-7B) under 1 s;
* one estimate of each real Llama-family shape (TinyLlama-1.1B, Llama-2-7B, Qwen2-0.5B,
  Llama-2-70B; ZeRO-3, 8 ranks, bf16, micro-batch 4 x seq 2048) with activations modelled: well
  under a second, no torch import.

Run: ``.venv/bin/python benchmarks/bench_estimate.py`` (prints one JSON line per measurement).
"""

from __future__ import annotations

import itertools
import json
import sys
import time

from memprof.estimate import EstimateInputs, estimate
from memprof.estimate.core import peak_device_bytes
from memprof.models import preset_config


def bench_175b() -> dict:
    t0 = time.perf_counter()
    est = estimate(EstimateInputs(n_params=175 * 10**9, world_size=1024, zero_stage=3, precision="bf16",
                                  gpu_memory_bytes=80 * 2**30))
    dt = time.perf_counter() - t0
    return {"bench": "estimate_175b", "seconds": dt, "peak_device_bytes": est.peak_device_bytes,
            "torch_imported": "torch" in sys.modules, "ok": dt < 0.1 and "torch" not in sys.modules}


def bench_llama_shapes() -> list[dict]:
    out = []
    for preset in ("tinyllama-1.1b", "llama-2-7b", "qwen2-0.5b", "llama-2-70b"):
        t0 = time.perf_counter()
        est = estimate(EstimateInputs(model_config=preset_config(preset), model_name=preset, optimizer="adamw",
                                      precision="bf16", zero_stage=3, world_size=8, micro_batch=4, seq_len=2048,
                                      gpu_memory_bytes=80 * 2**30))
        dt = time.perf_counter() - t0
        out.append({"bench": f"estimate_{preset}", "seconds": dt, "peak_device_bytes": est.peak_device_bytes,
                    "activations_modelled": est.activations is not None, "torch_imported": "torch" in sys.modules,
                    "ok": dt < 0.5 and est.activations is not None and "torch" not in sys.modules})
    return out


def bench_sweep(n: int = 10_000, preset: str = "gpt2-xl", seq_len: int = 1024) -> dict:
    base = EstimateInputs(model_config=preset_config(preset), seq_len=seq_len, gpu_memory_bytes=80 * 2**30)
    grid = itertools.product(range(4), (1, 2, 4, 8, 16, 32, 64, 128, 256, 512), range(1, 64),
                             ("fp32", "bf16"), ("adamw", "sgd"))
    configs = [base.with_(zero_stage=s, world_size=w, micro_batch=mb, precision=p, optimizer=o)
               for s, w, mb, p, o in itertools.islice(grid, n)]
    t0 = time.perf_counter()
    fits = sum(peak_device_bytes(c) <= base.gpu_memory_bytes for c in configs)
    dt = time.perf_counter() - t0
    return {"bench": f"sweep_10k_configs_{preset}", "configs": len(configs), "seconds": dt, "fitting": fits, "ok": dt < 1.0}


def bench_lora_70b() -> dict:
    """One estimate of Llama-2-70B with LoRA r=16 on all-linear (560 adapters: the wrapped
    parameter list, the frozen mask and the per-layer LoRA activation terms): under 20 ms, from a
    cold shape cache (the first call builds the PEFT-wrapped shape)."""
    from memprof.peft_config import ALL_LINEAR, LoraSetup

    lora = LoraSetup(r=16, target_modules=ALL_LINEAR, lora_dropout=0.05)
    t0 = time.perf_counter()
    est = estimate(EstimateInputs(model_config=preset_config("llama-2-70b"), model_name="llama-2-70b", peft=lora,
                                  precision="bf16", zero_stage=3, world_size=8, micro_batch=4, seq_len=2048,
                                  activation_checkpointing=True, gpu_memory_bytes=80 * 2**30))
    dt = time.perf_counter() - t0
    return {"bench": "estimate_llama-2-70b_lora_r16_all_linear", "seconds": dt, "peak_device_bytes": est.peak_device_bytes,
            "torch_imported": "torch" in sys.modules, "ok": dt < 0.02 and "torch" not in sys.modules}


def bench_lora_sweep(n: int = 10_000) -> dict:
    """The planner's inner loop with LoRA (``memprof plan --peft-config``): 10,000 setups of
    Llama-2-7B r=16 q,k,v,o (stage x world size x micro-batch x precision x checkpointing)."""
    from memprof.peft_config import LoraSetup

    lora = LoraSetup(r=16, target_modules=("k_proj", "o_proj", "q_proj", "v_proj"), lora_dropout=0.05,
                     source="adapter_config.json")
    base = EstimateInputs(model_config=preset_config("llama-2-7b"), seq_len=4096, gpu_memory_bytes=24 * 2**30, peft=lora)
    grid = itertools.product(range(4), (1, 2, 4, 8, 16, 32, 64, 128, 256, 512), range(1, 64), ("fp32", "bf16"),
                             (False, True))
    configs = [base.with_(zero_stage=s, world_size=w, micro_batch=mb, precision=p, activation_checkpointing=c)
               for s, w, mb, p, c in itertools.islice(grid, n)]
    t0 = time.perf_counter()
    fits = sum(peak_device_bytes(c) <= base.gpu_memory_bytes for c in configs)
    dt = time.perf_counter() - t0
    return {"bench": "sweep_10k_configs_llama-2-7b_lora", "configs": len(configs), "seconds": dt, "fitting": fits,
            "ok": dt < 1.0}


def bench_advise_70b() -> dict:
    """``memprof advise`` for Llama-2-70B on 64 GPUs (8 nodes x 8): every single change plus the
    combination search; the goal is an interactive answer, under 1 s."""
    from memprof.estimate.advise import advise

    inp = EstimateInputs(model_config=preset_config("llama-2-70b"), model_name="llama-2-70b", world_size=64, nodes=8,
                         zero_stage=2, precision="bf16", micro_batch=4, seq_len=4096, gpu_memory_bytes=80 * 2**30)
    t0 = time.perf_counter()
    result = advise(inp, max_gpus=128)
    dt = time.perf_counter() - t0
    return {"bench": "advise_llama-2-70b_64gpus", "seconds": dt, "evaluations": result.evaluations,
            "best": result.best.change if result.best else None, "ok": dt < 1.0}


if __name__ == "__main__":
    results = [bench_lora_70b(), bench_175b(), *bench_llama_shapes(), bench_sweep(),
               bench_sweep(preset="llama-2-7b", seq_len=4096), bench_lora_sweep(), bench_advise_70b()]
    for result in results:
        print(json.dumps(result))
    sys.exit(0 if all(r["ok"] for r in results) else 1)  # a missed target fails `make bench`
