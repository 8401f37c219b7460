"""LoRA launched (issue 16): launch/train.py --peft-config on 2 CPU ranks, tiny models, 2 steps;
resident params / master_params / optimizer_state against bytes derived here from the layer shapes,
the adapter shapes (r*in + out*r per target) and the partition rules, and the estimator's
prediction for the run's own setup (``memprof compare --fresh-estimate``).

Every phase peak within 3% (the activation terms LoRA changes are derived in the family files from
PEFT's lora.Linear.forward and traced in tests/test_activations_lora.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import REPO, launch_deepspeed

from memprof.models import PRESETS
from memprof.peft_config import LoraSetup

LLAMA_QV = LoraSetup(r=4, target_modules=("q_proj", "v_proj"))
GPT2_ATTN = LoraSetup(r=4, target_modules=("c_attn",))


def base_numels(preset: str) -> list[int]:
    cfg = PRESETS[preset]
    if cfg["model_type"] == "gpt2":
        h, v, L, n_pos = cfg["n_embd"], cfg["vocab_size"], cfg["n_layer"], cfg["n_positions"]
        block = [h, h, 3 * h * h, 3 * h, h * h, h, h, h, 4 * h * h, 4 * h, 4 * h * h, h]
        return [v * h, n_pos * h] + block * L + [h, h]
    v, h, i, a, kv, L = (cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                           "num_key_value_heads", "num_hidden_layers"))
    d = h // a
    return [v * h] + [a * d * h, kv * d * h, kv * d * h, h * a * d, i * h, i * h, h * i, h, h] * L + [h] + [v * h]


def adapter_numels(preset: str, r: int) -> list[int]:
    cfg = PRESETS[preset]
    if cfg["model_type"] == "gpt2":
        h = cfg["n_embd"]
        return [r * h, 3 * h * r] * cfg["n_layer"]  # c_attn: in h, out 3h
    h, a, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = h // a
    return [r * h, a * d * r, r * h, kv * d * r] * cfg["num_hidden_layers"]


BUFFERS = {"gpt2-tiny": 0, "llama-tiny": 2 * 8 * 4}
Z3 = {"stage3_param_persistence_threshold": 256, "stage3_prefetch_bucket_size": 50_000}


def expected(preset: str, lora: LoraSetup, stage: int, bf16: bool, n: int) -> dict[str, int]:
    base, adapters = base_numels(preset), adapter_numels(preset, lora.r)
    e, T, P = 2 if bf16 else 4, sum(adapters), sum(base)
    if stage == 0:
        return {"params": e * (P + T) + BUFFERS[preset], "master_params": 4 * T if bf16 else 0, "optimizer_state": 8 * T}
    if stage in (1, 2):
        part = math.ceil(T / (2 * n)) * 2 * n // n
        return {"params": e * (P + part * n) + BUFFERS[preset], "master_params": 4 * part, "optimizer_state": 8 * part}
    every = base + adapters
    s_all, s_t = sum(math.ceil(m / n) for m in every), sum(math.ceil(m / n) for m in adapters)
    gathered = sum(n * math.ceil(m / n) for m in every if m <= 256)
    return {"params": e * (s_all + gathered) + BUFFERS[preset], "master_params": 4 * s_t, "optimizer_state": 8 * s_t}


CASES = {
    # name: (preset, adapters, stage, bf16, top-level config)
    "llama-z2-bf16": ("llama-tiny", LLAMA_QV, 2, True, {}),
    "gpt2-z0-fp32": ("gpt2-tiny", GPT2_ATTN, 0, False, {}),
    "llama-z3-fp32-gas2-ckpt": ("llama-tiny", LLAMA_QV, 3, False,
                                {"gradient_accumulation_steps": 2, "activation_checkpointing": {}}),
}
RESIDENT_TOLERANCE, PEAK_TOLERANCE = 0.005, 0.03


class _Runs(dict):
    """Each case launched once, on first use (so ``-k`` launches only what it selects)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> Path:
        self[name] = _launch(self.root, name)
        return self[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    return _Runs(tmp_path_factory.mktemp("lora"))


def _launch(root: Path, name: str) -> Path:
    preset, lora, stage, bf16, top = CASES[name]
    adapter = root / f"{name}.adapter_config.json"
    adapter.write_text(json.dumps(lora.to_json()))
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 50_000, "allgather_bucket_size": 50_000,
                                 **(Z3 if stage == 3 else {})}, **top}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    steps = 2 * cfg["gradient_accumulation_steps"]
    res = launch_deepspeed(2, cfg, root / name, steps=steps, model=preset, extra=["--peft-config", str(adapter)])
    assert res.returncode == 0, f"{name}:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return root / name


@pytest.mark.parametrize("name", list(CASES))
def test_resident_model_states_match_derived_bytes(runs, name):
    preset, lora, stage, bf16, _ = CASES[name]
    doc = json.loads((runs[name] / "memprof.json").read_text())
    # the launch estimated its own LoRA setup (the recorded peft_config read back: it once held peft's
    # PeftType enum, which the reader refused, and the run stored no estimate)
    assert doc["estimate"] is not None and doc["estimate"]["inputs"]["peft"] is not None, name
    assert doc["run"]["peft_config"]["r"] == lora.r
    assert doc["run"]["n_trainable_params"] == sum(adapter_numels(preset, lora.r))
    assert doc["run"]["n_frozen_params"] == sum(base_numels(preset))
    want = expected(preset, lora, stage, bf16, 2)
    for entry in doc["ranks"]:
        rest = entry["steps"][-1]["phases"]["step"]["end"]
        got = {cat: rest["device"][cat] + rest["host"][cat] for cat in want}
        assert got == want, f"{name} rank {entry['rank']}"


# ZeRO-3 + accumulation + checkpointing: the forward peak is inside the last layer's MLP, not at the
# loss: DeepSpeed's prefetch holds each coalesced all-gather's flat buffer beside the parameters'
# own copies until the group's last parameter is consumed (memprof.estimate.stage3_replay; checked
# against the coordinator's groups below). Fixed; no case is a known gap.
KNOWN_GAPS: set[str] = set()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason="LoRA ZeRO-3 + GAS + checkpointing "
                                  "forward peak 4.5% under the measurement (issue 16, open)", strict=True)) if n in KNOWN_GAPS else n
                                  for n in CASES])
def test_estimate_of_the_run_against_measurement(runs, name):
    res = subprocess.run([sys.executable, "-m", "memprof", "compare", str(runs[name]), "--fresh-estimate", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    bad = []
    for r in json.loads(res.stdout)["rows"]:
        if r["ok"] is None:
            continue
        tolerance = RESIDENT_TOLERANCE if r["what"] != "peak" else PEAK_TOLERANCE
        err = abs(r["estimated"] - r["measured"]) / r["measured"] if r["measured"] else abs(r["estimated"])
        if err > tolerance:
            bad.append(f"rank {r['rank']} {r['what']} {r['location']} {r['name']}: measured {r['measured']} "
                       f"estimated {r['estimated']} ({err:.3%})")
    assert not bad, "\n".join(bad)


def _llama_tiny_lora() -> tuple[dict, LoraSetup]:
    return dict(PRESETS["llama-tiny"]), LLAMA_QV


@pytest.mark.parametrize("preset,lora", [("llama-tiny", LLAMA_QV), ("gpt2-tiny", GPT2_ATTN), ("gpt2-tiny", None)])
def test_model_call_order_is_the_replayed_fetch_order(preset: str, lora: LoraSetup | None) -> None:
    """ZeRO-3 hooks every module (runtime/zero/parameter_offload.py ``_register_deepspeed_module``),
    and each fetch, parameters or not, prefetches: the replay's module order (the family's, remapped
    for PEFT by memprof.estimate.lora_shape) is the order a real model calls its modules in, each
    with its own parameters (PeftModel root, lora.Linear, base_layer, lora_dropout.default, lora_A,
    lora_B; GPT-2's dropouts and activation; Llama's rotary_emb and act_fn)."""
    import torch

    from memprof.estimate.model_shapes import model_shape
    from memprof.train.model import build_model, wrap_with_peft

    cfg = dict(PRESETS[preset])
    model = build_model(cfg, seed=0)
    if lora is not None:
        model = wrap_with_peft(model, lora.to_json())
    index = {id(p): k for k, p in enumerate(model.parameters())}
    order: list[tuple[int, ...]] = []
    for module in model.modules():
        own = tuple(index[id(p)] for p in module.parameters(recurse=False))
        module.register_forward_pre_hook(lambda m, a, own=own: order.append(own))
    ids = torch.randint(0, 256, (1, 8))
    model(input_ids=ids, labels=ids)
    assert tuple(order) == model_shape(cfg, lora=lora).module_order()


def test_stage3_prefetch_groups_hold_their_flat_buffers_until_consumed() -> None:
    """The llama-z3-fp32-gas2-ckpt case's forward (persistence threshold 256, prefetch bucket 50,000,
    max live / reuse 1e9), derived by hand from partitioned_param_coordinator.py's prefetch rule:
    each fetch, with parameters or not, gathers queue entries (forward order; persistent ones and
    those already gathered cost nothing) until >= 50,000 new elements are in one call. The root,
    LlamaForCausalLM and LlamaModel fetches (before embed_tokens) issue three calls:
    embed 32,768 + L0 q 4,096 + k 2,048 + v 2,048 + o 4,096 + gate 11,264 = 56,320;
    L0 up + down 22,528 + L1 q, k, v, o 12,288 + gate, up 22,528 = 57,344;
    L1 down 11,264 + lm_head 32,768 = 44,032 (the adapters, r*64 and 64*r / 32*r, and the norms
    are persistent). A call's flat buffer lives until its last parameter's module is fetched:
    in layer 1, before up_proj, calls 1 and 2 are gathered (113,664) beside call 2's buffer
    (its L1 up_proj is not consumed yet) and call 3 in flight: 101,376 elements of buffers. In
    the measured run (2 CPU ranks) the coordinator had 56,320, 113,664 and 157,696 elements in
    flight after those three fetches, 113,664 gathered in layer 1's MLP and the peak there."""
    from memprof.estimate.model_shapes import model_shape

    cfg, lora = _llama_tiny_lora()
    r = model_shape(cfg, lora=lora).stage3_forward(256, 10**9, 50_000, 10**9, 2)
    assert (r.peak_gathered, r.peak_buffers) == (56_320 + 57_344, 57_344 + 44_032)
    everything = sum(base_numels("llama-tiny")) - sum(n for n in base_numels("llama-tiny") if n <= 256)
    assert everything == 56_320 + 57_344 + 44_032
    assert (r.end_gathered, r.end_buffers) == (everything, 0)  # lm_head consumed call 3: nothing left in flight


def test_stage3_forward_peak_names_the_in_flight_gathers(runs) -> None:
    """Issue 17: at the llama-z3-fp32-gas2-ckpt forward peak (layer 1's MLP, in steps after the
    coordinator's trace is complete) the flat outputs of prefetch calls 2 and 3 (the test above) are
    held only by DeepSpeed's AllGatherCoalescedHandle in the inflight registry
    (partition_parameters.py 1343-1370; partitioned_param_coordinator.py 613, popped at 406): the
    ownership walk names them comm_buffers, one owner per call, beside the reduce bucket
    (reduce_bucket_size 50,000 fp32 elements, stage3.py's IPGBucketZ3, kept for the run). Each call's
    output is sum(ceil(n / 2)) * 2 elements, fp32; every gathered numel here is even."""
    v, h, i, a, kv = (PRESETS["llama-tiny"][k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                         "num_attention_heads", "num_key_value_heads"))
    d = h // a
    q, k, o, mlp = a * d * h, kv * d * h, h * a * d, i * h
    call_2 = 2 * mlp + (q + 2 * k + o) + 2 * mlp  # L0 up, down; L1 q, k, v, o; L1 gate, up
    call_3 = mlp + v * h  # L1 down, lm_head
    assert (call_2, call_3) == (57_344, 44_032)  # the prefetch test's hand count
    from memprof.measure.ownership.deepspeed import INFLIGHT_GATHER

    doc = json.loads((runs["llama-z3-fp32-gas2-ckpt"] / "memprof.json").read_text())
    for entry in doc["ranks"]:
        owners = entry["steps"][-1]["phases"]["forward"]["peak_owners"]["device"]["comm_buffers"]
        gathers = sorted(n for name, n in owners.items() if name.startswith(INFLIGHT_GATHER))
        assert gathers == sorted([4 * call_2, 4 * call_3]), (entry["rank"], owners)
        assert owners["ipg reduce bucket float32"] == 4 * 50_000
        assert sum(owners.values()) == entry["steps"][-1]["phases"]["forward"]["peak"]["device"]["comm_buffers"]
