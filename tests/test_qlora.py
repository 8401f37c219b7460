"""QLoRA (issue 16): a bitsandbytes 4-bit base under LoRA adapters.

Expected bytes are derived here from llama-tiny's layer shapes and bitsandbytes 0.50.2's storage
rules written out by hand (two 4-bit codes per byte; an fp32 absmax per 64-element block; a
16-entry fp32 code table per weight; double quantization: one uint8 per block, an fp32 absmax
per 256 blocks, a 256-entry fp32 map and a 4-byte offset per weight), never from memprof's code.

Where bitsandbytes runs (it does on these CPUs: its CPU kernels), the same numbers are checked
against a llama-tiny really loaded in 4 bits by transformers (``from_pretrained`` with a
``BitsAndBytesConfig``) and wrapped by PEFT, and one training step is measured under
MemoryProfiler; without bitsandbytes those tests skip with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from memprof.estimate.core import estimate
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.model_shapes import model_shape
from memprof.models import PRESETS
from memprof.peft_config import LoraSetup

LLAMA = PRESETS["llama-tiny"]
ALL = LoraSetup(r=4, target_modules="all-linear")
MEMPROF = [sys.executable, "-m", "memprof"]
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed: the 4-bit bytes stay derived, not measured")


def qc(quant_type="nf4", double=False, storage="uint8", compute="float32", skip=None) -> dict:
    """A quantization_config as BitsAndBytesConfig(...).to_dict() writes it (transformers 5.25)."""
    return {"quant_method": "bitsandbytes", "_load_in_8bit": False, "_load_in_4bit": True, "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": skip, "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double, "bnb_4bit_compute_dtype": compute,
            "bnb_4bit_quant_storage": storage, "load_in_4bit": True, "load_in_8bit": False}


# --- llama-tiny by hand -------------------------------------------------------------------------
H, I, V, A, KV, L = (LLAMA[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads",
                                         "num_key_value_heads", "num_hidden_layers"))
D = H // A
# each Linear of a layer as (in_features, out_features): q, k, v, o, gate, up, down
LINEARS = [(H, A * D), (H, KV * D), (H, KV * D), (A * D, H), (H, I), (H, I), (I, H)] * L
WEIGHTS = [i * o for i, o in LINEARS]  # the 14 quantized weights' elements
assert LLAMA["tie_word_embeddings"] is False  # lm_head is its own Linear (left in the compute dtype)
UNQUANTIZED = V * H + (2 * L + 1) * H + V * H  # embed_tokens, the RMSNorms, lm_head
ADAPTERS = sum(4 * (i + o) for i, o in LINEARS)  # r=4 on every Linear but lm_head: A r*in, B out*r
BUFFERS = 2 * (D // 2) * 4  # rotary inv_freq and original_inv_freq, fp32


def packed_bytes() -> int:
    return sum(n // 2 for n in WEIGHTS)  # every weight here has an even element count


def state_bytes(double: bool) -> int:
    blocks = [-(-n // 64) for n in WEIGHTS]
    if not double:
        return sum(4 * b + 16 * 4 for b in blocks)
    return sum(b + 4 * -(-b // 256) + 256 * 4 + 4 + 16 * 4 for b in blocks)


def test_hand_numbers_are_the_expected_sizes():
    """The derivation above on llama-tiny (h 64, intermediate 176, 4 heads of 16, 2 kv heads)."""
    assert WEIGHTS[:7] == [4096, 2048, 2048, 4096, 11264, 11264, 11264] and len(WEIGHTS) == 14
    assert packed_bytes() == 46_080
    assert state_bytes(False) == 1440 * 4 + 14 * 64 == 6_656
    assert state_bytes(True) == 1440 + 14 * (4 + 1024 + 4 + 64) == 16_784


@pytest.mark.parametrize("storage, itemsize", [("uint8", 1), ("bfloat16", 2), ("float32", 4)])
@pytest.mark.parametrize("double", [False, True])
def test_shape_holds_the_packed_weights(storage, itemsize, double):
    cfg = {**LLAMA, "quantization_config": qc(double=double, storage=storage)}
    shape = model_shape(cfg, None, ALL)
    assert shape.quantized_numels == tuple(WEIGHTS)
    assert shape.quant_packed_numel == packed_bytes() // itemsize  # the element count changes, the bytes do not
    assert shape.quant_state_bytes == state_bytes(double)
    assert shape.trainable.n_params == ADAPTERS
    assert shape.n_params == UNQUANTIZED + ADAPTERS + packed_bytes() // itemsize
    assert shape.model_n_params == UNQUANTIZED + ADAPTERS + sum(WEIGHTS)


def _inputs(stage=0, precision="fp32", world=1, **quant) -> EstimateInputs:
    return EstimateInputs(model_config={**LLAMA, "quantization_config": qc(**quant)}, peft=ALL, zero_stage=stage,
                          precision=precision, world_size=world, seq_len=64, device_type="cpu")


def _params(inp: EstimateInputs, rank: int = 0) -> int:
    return estimate(inp).ranks[rank].rest["device"]["params"]


@pytest.mark.parametrize("stage, precision, world, quant, expected", [
    # ZeRO 0-2: every non-adapter parameter whole in the compute dtype, the 4-bit weights packed, the
    # adapters (9,344 elements, a multiple of DeepSpeed's 2*N alignment: no padding) in the flat group
    (0, "fp32", 1, {}, (UNQUANTIZED + ADAPTERS) * 4 + packed_bytes() + state_bytes(False) + BUFFERS),
    (0, "fp32", 1, {"double": True}, (UNQUANTIZED + ADAPTERS) * 4 + packed_bytes() + state_bytes(True) + BUFFERS),
    (1, "bf16", 2, {"double": True}, (UNQUANTIZED + ADAPTERS) * 2 + packed_bytes() + state_bytes(True) + BUFFERS),
    (2, "bf16", 2, {"storage": "bfloat16"}, (UNQUANTIZED + ADAPTERS) * 2 + packed_bytes() + state_bytes(False) + BUFFERS),
    (2, "fp32", 2, {"storage": "bfloat16"}, (UNQUANTIZED + ADAPTERS) * 4 + packed_bytes() + state_bytes(False) + BUFFERS),
    # ZeRO-3, storage = compute dtype: every tensor (packed ones as bf16 elements, all even, all under
    # the 1e5 persistence threshold) partitioned in halves and kept gathered: 1.5x the elements
    (3, "bf16", 2, {"storage": "bfloat16", "double": True},
     3 * (UNQUANTIZED + ADAPTERS + packed_bytes() // 2) + state_bytes(True) + BUFFERS),
    (3, "bf16", 1, {"storage": "bfloat16"},  # one rank: a gathered param is a view of its partition
     2 * (UNQUANTIZED + ADAPTERS + packed_bytes() // 2) + state_bytes(False) + BUFFERS),
])
def test_params_at_each_stage(stage, precision, world, quant, expected):
    inp = _inputs(stage, precision, world, **quant)
    assert _params(inp) == expected
    assert _params(inp, -1) == expected


@pytest.mark.parametrize("stage, precision, world", [(0, "fp32", 1), (2, "bf16", 2), (1, "bf16", 4)])
def test_only_params_differ_from_plain_lora(stage, precision, world):
    """The 4-bit base replaces e bytes per frozen weight element by half a byte plus its QuantState;
    the adapters' gradients, fp32 master and optimizer state are those of the same LoRA on a plain base."""
    q = estimate(_inputs(stage, precision, world, double=True))
    plain = estimate(EstimateInputs(model_config=LLAMA, peft=ALL, zero_stage=stage, precision=precision,
                                    world_size=world, seq_len=64, device_type="cpu"))
    e = {"fp32": 4, "bf16": 2}[precision]
    for rq, rp in zip(q.ranks, plain.ranks):
        delta = rp.rest["device"]["params"] - rq.rest["device"]["params"]
        assert delta == sum(WEIGHTS) * e - packed_bytes() - state_bytes(True)
        for cat in ("master_params", "grads", "optimizer_state", "comm_buffers"):
            assert rq.rest["device"][cat] == rp.rest["device"][cat]


def test_skip_modules_as_transformers_reads_them():
    """A stated llm_int8_skip_modules replaces transformers' default skips: down_proj stays in the
    compute dtype and the (untied) lm_head is quantized."""
    shape = model_shape({**LLAMA, "quantization_config": qc(skip=["down_proj"])}, None, ALL)
    expected = [n for k, n in enumerate(WEIGHTS) if k % 7 != 6] + [V * H]
    assert sorted(shape.quantized_numels) == sorted(expected)


def test_assumptions_say_what_is_derived():
    text = " ".join(estimate(_inputs(2, "bf16", 2, double=True)).assumptions)
    assert "derived from bitsandbytes 0.50.2's quantize_4bit" in text and "not measured on a GPU" in text
    assert f"{sum(WEIGHTS):,} elements" in text and f"{state_bytes(True):,} bytes of QuantState" in text
    assert "prepare_model_for_kbit_training" in text
    assert "bnb_4bit_compute_dtype float32 differs" in text  # fp32 compute under bf16


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MEMPROF, *args], capture_output=True, text=True, timeout=120)


def test_flags_equal_a_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, "quantization_config": qc("nf4", True, "bfloat16", "bfloat16")}))
    common = ["--lora-r", "4", "--lora-target-modules", "all-linear", "--precision", "bf16", "--zero-stage", "3",
              "--world-size", "2", "--seq-len", "64", "--json"]
    by_file = run("estimate", "--model-config", str(path), *common)
    by_flags = run("estimate", "--model", "llama-tiny", "--load-in-4bit", "--bnb-4bit-quant-type", "nf4",
                   "--bnb-4bit-double-quant", "--bnb-4bit-quant-storage", "bfloat16", "--bnb-4bit-compute-dtype",
                   "bfloat16", *common)
    assert by_file.returncode == 0 and by_flags.returncode == 0, by_file.stderr + by_flags.stderr
    ranks_file, ranks_flags = (json.loads(p.stdout)["ranks"] for p in (by_file, by_flags))
    assert ranks_file == ranks_flags
    assert ranks_file[0]["device"]["params"] == \
        3 * (UNQUANTIZED + ADAPTERS + packed_bytes() // 2) + state_bytes(True) + BUFFERS


REFUSED = [
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, [], "load_in_8bit"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, [], "quant_method 'gptq'"),
    ({"quantization_config": qc()}, ["--zero-stage", "3", "--precision", "bf16"], "ZeRO-3 with bnb_4bit_quant_storage uint8"),
    ({"quantization_config": qc(storage="float32")}, ["--precision", "bf16"], "corrupting the packed"),
    ({"quantization_config": qc()}, ["--engine", "fsdp2"], "fsdp2"),
    ({"quantization_config": qc(quant_type="int4")}, [], "bnb_4bit_quant_type"),
]


@pytest.mark.parametrize("extra_config, flags, words", REFUSED)
def test_refusals_are_one_line(tmp_path, extra_config, flags, words):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, **extra_config}))
    p = run("estimate", "--model-config", str(path), "--lora-r", "4", "--lora-target-modules", "all-linear", *flags)
    assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("args, words", [
    (["--model", "llama-tiny", "--load-in-4bit"], "purely quantized"),
    (["--params", "1e9", "--load-in-4bit", "--lora-r", "4"], "--load-in-4bit needs the model's shape"),
    (["--model", "llama-tiny", "--bnb-4bit-quant-type", "nf4"], "need --load-in-4bit"),
    (["--model", "llama-tiny", "--load-in-4bit", "--bnb-4bit-quant-storage", "int4", "--lora-r", "4"], "quant-storage"),
])
def test_flag_refusals(args, words):
    p = run("estimate", *args)
    assert p.returncode == 2 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_tied_skip_refused(tmp_path):
    """A stated skip list that leaves a tied LM head to be quantized is refused (qwen2-tiny ties it)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**PRESETS["qwen2-tiny"], "quantization_config": qc(skip=["down_proj"])}))
    p = run("estimate", "--model-config", str(path), "--lora-r", "4", "--lora-target-modules", "all-linear")
    assert p.returncode == 2 and "tied embeddings" in p.stderr, p.stderr


def test_plan_names_what_it_left_out():
    common = ["--model", "llama-tiny", "--lora-r", "4", "--lora-target-modules", "all-linear", "--load-in-4bit",
              "--precision", "bf16", "--gpus", "2", "--gpu-memory", "1GiB", "--seq-len", "64", "--json"]
    uint8 = json.loads(run("plan", *common).stdout)
    assert {r["zero_stage"] for r in uint8["rows"]} == {0, 1, 2}
    assert [r["label"] for r in uint8["refused"]] == ["ZeRO-3", "ZeRO-3 + offload optimizer->cpu",
                                                      "ZeRO-3 + offload optimizer->cpu, params->cpu"]
    bf16 = json.loads(run("plan", *common, "--bnb-4bit-quant-storage", "bfloat16").stdout)
    assert 3 in {r["zero_stage"] for r in bf16["rows"]} and bf16["refused"] == []


# --- measured where bitsandbytes runs -----------------------------------------------------------
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    pytest.importorskip("peft")
    from memprof.train.model import build_model

    path = tmp_path_factory.mktemp("llama-tiny")
    build_model(LLAMA, seed=0).save_pretrained(path)
    return path


def _load_4bit(path, quant: dict, lora: LoraSetup = ALL):
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from memprof.train.model import wrap_with_peft

    bnb = BitsAndBytesConfig(**{k: v for k, v in quant.items() if not k.startswith("_") and k != "quant_method"})
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map="cpu", dtype=torch.float32)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return wrap_with_peft(model, lora.to_json())


@needs_bnb
@pytest.mark.parametrize("quant", [qc("nf4", False, "uint8"), qc("nf4", True, "uint8"), qc("fp4", True, "bfloat16"),
                                   qc("nf4", True, "float32")], ids=["nf4", "nf4-dq", "fp4-dq-bf16", "nf4-dq-fp32"])
def test_real_4bit_model_holds_the_derived_bytes(saved_llama, quant):
    """transformers + bitsandbytes on this CPU: the Params4bit storages and their QuantState tensors
    (distinct storages, counted by their nbytes) equal the hand derivation and the estimate's shape."""
    from memprof.measure.ownership.plain_torch import quant_state_tensors

    model = _load_4bit(saved_llama, quant)
    packed, state, storages, numels = 0, 0, set(), []
    for p in model.parameters():
        if type(p).__name__ == "Params4bit":
            packed += p.untyped_storage().nbytes()
            numels.append(p.numel())
            for t in quant_state_tensors(p.quant_state):
                if t.untyped_storage().data_ptr() not in storages:
                    storages.add(t.untyped_storage().data_ptr())
                    state += t.untyped_storage().nbytes()
    shape = model_shape({**LLAMA, "quantization_config": quant}, None, ALL)
    assert packed == packed_bytes() and state == state_bytes(quant["bnb_4bit_use_double_quant"])
    assert len(numels) == len(WEIGHTS) and type(model.base_model.model.lm_head).__name__ == "Linear"
    assert shape.param_numels == tuple(p.numel() for p in model.parameters())  # packed counts in parameters() order
    assert shape.quant_state_bytes == state
    # the model's own config (what a run records) carries the same quantization_config
    recorded = model.config.to_dict()["quantization_config"]
    assert model_shape({**LLAMA, "quantization_config": recorded}, None, ALL) == shape


@needs_bnb
def test_gpt2_conv1d_weights_measured(tmp_path):
    """GPT-2's Conv1D layers are quantized too (replace_with_bnb_linear; the weight transposed
    first): the loaded model's parameters and QuantState bytes are the estimate's."""
    pytest.importorskip("peft")
    from memprof.measure.ownership.plain_torch import quant_state_tensors
    from memprof.train.model import build_model

    gpt2 = PRESETS["gpt2-tiny"]
    build_model(gpt2, seed=0).save_pretrained(tmp_path)
    quant, lora = qc("nf4", True, "uint8"), LoraSetup(r=4, target_modules=("c_attn", "c_fc"))
    model = _load_4bit(tmp_path, quant, lora)
    params = list(model.parameters())
    state = sum(t.untyped_storage().nbytes() for p in params if type(p).__name__ == "Params4bit"
                for t in quant_state_tensors(p.quant_state))
    shape = model_shape({**gpt2, "quantization_config": quant}, None, lora)
    assert shape.param_numels == tuple(p.numel() for p in params)
    assert len(shape.quantized_numels) == 4 * gpt2["n_layer"] and shape.quant_state_bytes == state


@needs_bnb
def test_training_step_measured(saved_llama, tmp_path):
    """One plain-torch QLoRA step (fp32, torch AdamW on the adapters) under MemoryProfiler on this
    CPU: params and optimizer state at rest equal the estimate's (ZeRO-0 fp32 torch Adam, the same
    layout), the forward and backward peaks within 3%."""
    import gc

    import torch

    from memprof.measure import MemoryProfiler

    quant = qc("nf4", True, "uint8")
    model = _load_4bit(saved_llama, quant)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, V, (2, 64), generator=gen) for _ in range(3)]
    gc.collect()
    prof = MemoryProfiler(model=model, optimizer=opt, out_dir=tmp_path, run={"model": "llama-tiny 4-bit"})
    with prof:
        for i, ids in enumerate(batches):
            with prof.step(i) as s:
                with s.phase("forward"):
                    loss = model(input_ids=ids, labels=ids).loss
                with s.phase("backward"):
                    loss.backward()
                with s.phase("step"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                s.loss = loss.item()
    measured = prof.finish()["ranks"][0]["steps"][-1]["phases"]
    est = estimate(EstimateInputs(model_config={**LLAMA, "quantization_config": quant}, peft=ALL, precision="fp32",
                                  torch_adam=True, micro_batch=2, seq_len=64, device_type="cpu")).ranks[0]
    rest = measured["step"]["end"]["device"]
    assert rest["params"] == est.rest["device"]["params"] == \
        (UNQUANTIZED + ADAPTERS) * 4 + packed_bytes() + state_bytes(True) + BUFFERS
    assert rest["optimizer_state"] == est.rest["device"]["optimizer_state"] == ADAPTERS * 8 + 28 * 4  # + step tensors
    # the process's own leftovers (other tests' tensors in a full pytest run) are seeded as `other` and
    # sit in every measured total: compare what this loop adds above each side's `other` at rest
    base_m, base_e = rest["other"], est.rest["device"]["other"]
    for ph in ("forward", "backward"):
        m, e = measured[ph]["peak_total"] - base_m, sum(est.phases[ph]["device"].values()) - base_e
        assert abs(m - e) <= 0.03 * m, (ph, m, e, base_m, base_e)


def test_launcher_refuses_a_quantized_config(tmp_path):
    """launch/train.py builds the model from its config unquantized: a quantization_config is refused
    in one line (its run's estimate would otherwise model a 4-bit base that was never built)."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**LLAMA, "quantization_config": qc()}))
    p = subprocess.run([sys.executable, str(repo / "launch" / "train.py"), "--deepspeed_config",
                        str(repo / "configs" / "demo.json"), "--model-config", str(path), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, cwd=repo)
    assert p.returncode == 2 and "quantization_config" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "out").exists()
