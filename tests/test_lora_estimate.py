"""LoRA (issue 16): the adapter config read and refused, the PEFT-wrapped model's parameters, and
the model states of frozen parameters at ZeRO 0-3 against bytes derived here from the layer
shapes, the adapter shapes (r*in + out*r per target) and the partition rules."""

from __future__ import annotations

import json
import math

import pytest

from memprof.errors import MemprofError
from memprof.estimate.core import estimate
from memprof.estimate.from_run import inputs_from_run
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.model_shapes import model_shape
from memprof.models import PRESETS
from memprof.peft_config import LoraSetup, lora_setup_from_dict, lora_setup_from_flags, read_peft_config

LLAMA = PRESETS["llama-tiny"]
GPT2 = PRESETS["gpt2-tiny"]
QV = LoraSetup(r=4, target_modules=("q_proj", "v_proj"))


def llama_base_numels() -> list[int]:
    v, h, i, a, kv, L = (LLAMA[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads", "num_hidden_layers"))
    d = h // a
    layer = [a * d * h, kv * d * h, kv * d * h, h * a * d, i * h, i * h, h * i, h, h]
    return [v * h] + layer * L + [h] + ([] if LLAMA["tie_word_embeddings"] else [v * h])


def llama_qv_adapter_numels(r: int) -> list[int]:
    h, a, kv, L = (LLAMA[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"))
    d = h // a
    return [r * h, a * d * r, r * h, kv * d * r] * L  # q_proj A, B; v_proj A, B


def test_adapter_shapes_and_trainable_mask():
    shape = model_shape(LLAMA, None, QV)
    assert sorted(shape.param_numels) == sorted(llama_base_numels() + llama_qv_adapter_numels(4))
    assert shape.trainable.param_numels == tuple(llama_qv_adapter_numels(4))
    assert shape.frozen_numel == sum(llama_base_numels())


@pytest.mark.parametrize("preset, lora", [
    ("llama-tiny", QV),
    ("llama-tiny", LoraSetup(r=8, target_modules="all-linear", bias="none")),
    ("gpt2-tiny", LoraSetup(r=4, target_modules=("c_attn", "c_fc"), bias="all", lora_dropout=0.1)),
    ("gpt2-tiny", LoraSetup(r=2, target_modules=r".*\.attn\.c_proj", bias="lora_only")),
])
def test_parameters_match_peft_get_peft_model(preset, lora):
    """The estimator's wrapped parameter list (order, sizes, requires_grad) is peft's own."""
    pytest.importorskip("peft")
    from memprof.train.model import build_model, wrap_with_peft

    model = wrap_with_peft(build_model(PRESETS[preset], seed=0), lora.to_json())
    params = list(model.parameters())
    shape = model_shape(PRESETS[preset], None, lora)
    assert shape.param_numels == tuple(p.numel() for p in params)
    assert shape.trainable_mask == tuple(p.requires_grad for p in params)


def test_stage3_fetch_order_follows_adapters():
    shape = model_shape(LLAMA, None, QV)
    seen = [i for module in shape.module_order() for i in module]
    assert set(seen) == set(range(shape.n_tensors))  # every tensor fetched, adapters included


def _expected(stage: int, bf16: bool, n: int, thr: int = 100_000) -> dict[str, int]:
    base, adapters = llama_base_numels(), llama_qv_adapter_numels(4)
    e, T, P = 2 if bf16 else 4, sum(adapters), sum(base)
    buffers = 2 * 8 * 4  # rotary inv_freq + original_inv_freq, fp32
    if stage == 0:
        return {"params": e * (P + T) + buffers, "master_params": 4 * T if bf16 else 0, "optimizer_state": 8 * T}
    if stage in (1, 2):
        part = math.ceil(T / (2 * n)) * 2 * n // n
        return {"params": e * (P + part * n) + buffers, "master_params": 4 * part, "optimizer_state": 8 * part}
    every = base + adapters
    s_all = sum(math.ceil(m / n) for m in every)
    s_trainable = sum(math.ceil(m / n) for m in adapters)
    gathered = sum(n * math.ceil(m / n) for m in every if m <= thr)
    return {"params": e * (s_all + gathered) + buffers, "master_params": 4 * s_trainable, "optimizer_state": 8 * s_trainable}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("bf16", [False, True])
def test_frozen_model_states_at_every_stage(stage, bf16):
    inp = EstimateInputs(model_config=LLAMA, world_size=2, zero_stage=stage, precision="bf16" if bf16 else "fp32",
                         device_type="cpu", peft=QV)
    est = estimate(inp)
    for rank in est.ranks:
        got = {c: rank.rest["device"][c] + rank.rest["host"][c] for c in ("params", "master_params", "optimizer_state")}
        assert got == _expected(stage, bf16, 2), f"stage {stage} rank {rank.rank}"
    assert est.to_json()["n_trainable_params"] == sum(llama_qv_adapter_numels(4))
    assert any("frozen parameters" in a for a in est.assumptions)


def test_full_fine_tuning_unchanged_by_the_trainable_shape():
    shape = model_shape(LLAMA)
    assert shape.trainable is shape and shape.frozen_numel == 0


def test_adapter_config_file_and_flags(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": 16, "target_modules": ["v_proj", "q_proj"], "lora_dropout": 0.05,
                                "bias": "none", "use_rslora": True, "lora_alpha": 32, "modules_to_save": None}))
    lora = read_peft_config(tmp_path)
    assert (lora.r, lora.target_modules, lora.lora_dropout) == (16, ("q_proj", "v_proj"), 0.05)
    assert lora_setup_from_flags(4, "all-linear", lora).target_modules == "all-linear"
    assert lora_setup_from_flags(4, None, lora).r == 4
    assert lora_setup_from_flags(None, None, None) is None


@pytest.mark.parametrize("data, fragment", [
    ({"peft_type": "IA3", "target_modules": ["q_proj"]}, "peft_type 'IA3' is not modelled"),
    ({"peft_type": "PREFIX_TUNING"}, "peft_type 'PREFIX_TUNING' is not modelled"),
    ({"r": 8, "target_modules": ["q_proj"], "use_dora": True}, "DoRA"),
    ({"r": 8, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"r": 0, "target_modules": ["q_proj"]}, "r = 0"),
    ({"r": 8, "target_modules": []}, "target_modules is empty"),
    ({"r": 8, "target_modules": ["q_proj"], "bias": "some"}, "bias = 'some'"),
])
def test_unmodelled_options_are_refused_in_one_line(data, fragment):
    with pytest.raises(MemprofError, match=fragment):
        lora_setup_from_dict(data)


@pytest.mark.parametrize("lora, fragment", [
    (LoraSetup(r=4, target_modules=("q_proj", "c_attn")), "target module 'c_attn' does not exist"),
    (LoraSetup(r=4, target_modules=r".*\.nothing"), "matches no module"),
    (LoraSetup(r=4, target_modules=("input_layernorm",)), "is not a Linear layer"),
])
def test_targets_the_model_lacks_are_refused(lora, fragment):
    with pytest.raises(MemprofError, match=fragment):
        model_shape(LLAMA, None, lora)


def test_all_linear_leaves_the_lm_head_out():
    shape = model_shape(GPT2, None, LoraSetup(r=2, target_modules="all-linear"))
    h, L = GPT2["n_embd"], GPT2["n_layer"]
    per_layer = [(h, 3 * h), (h, h), (h, 4 * h), (4 * h, h)]
    assert shape.lora_adapters == tuple(per_layer * L)


def test_bare_parameter_count_with_lora_is_refused():
    with pytest.raises(MemprofError, match="LoRA needs the model's shape"):
        estimate(EstimateInputs(n_params=10**9, peft=QV))


def test_run_record_round_trip():
    run = {"model_config": LLAMA, "world_size": 2, "zero_stage": 2, "precision": "bf16", "device_type": "cpu",
           "peft_config": QV.to_json()}
    assert inputs_from_run(run).peft == lora_setup_from_dict(QV.to_json(), "the run's peft_config")


def test_seventy_b_lora_is_quick():
    """A 70B-shaped Llama with LoRA r=16 on every linear: frozen backbone, tiny trainable set."""
    cfg = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
           "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 4096}
    inp = EstimateInputs(model_config=cfg, world_size=8, zero_stage=3, precision="bf16", micro_batch=1, seq_len=4096,
                         peft=LoraSetup(r=16, target_modules="all-linear"))
    shape = model_shape(cfg, None, inp.peft)
    assert 0 < shape.trainable.n_params < shape.n_params // 100
    assert estimate(inp).peak_device_bytes > 0


def test_reference_model_adds_frozen_params_only() -> None:
    from memprof.estimate import estimate
    from memprof.estimate.core import reference_model_bytes
    from memprof.estimate.from_run import inputs_from_run
    from memprof.estimate.inputs import EstimateInputs
    from memprof.models import preset_config

    cfg = preset_config("llama-tiny")
    base = EstimateInputs(model_config=cfg, world_size=2, zero_stage=2, precision="bf16", micro_batch=2, seq_len=32,
                          peft=LoraSetup(r=4, target_modules=("q_proj", "v_proj")))
    with_ref = base.with_(reference_model=cfg)
    shape = model_shape(cfg)
    # ZeRO 0-2: whole in bf16 (TRL's prepare_deepspeed: a stage-0 engine) + the fp32 rotary buffers
    assert reference_model_bytes(with_ref) == 2 * shape.n_params + 4 * shape.buffer_numel
    a, b = estimate(base).ranks[0], estimate(with_ref).ranks[0]
    for cat in ("master_params", "grads", "optimizer_state"):
        assert a.rest["device"][cat] == b.rest["device"][cat]
    assert b.rest["device"]["params"] - a.rest["device"]["params"] == reference_model_bytes(with_ref)
    z3 = with_ref.with_(zero_stage=3)
    assert reference_model_bytes(z3) == 2 * (shape.stage3_partition_numel(2)
                                             + shape.persistent_gathered_numel(z3.zero.param_persistence_threshold, 2)
                                             ) + 4 * shape.buffer_numel
    run = {"model_config": cfg, "world_size": 2, "zero_stage": 2, "precision": "bf16", "micro_batch": 2, "seq_len": 32,
           "reference_model": {"same_config_as_policy": True, "model_config": None, "n_params": shape.n_params},
           "trainer": {"trainer_class": "DPOTrainer"}}
    inputs = inputs_from_run(run)
    assert inputs.reference_model == cfg and inputs.loss_implementation == "trl_dpo"  # DPO: 2B rows, reference forward


def test_trl_fused_head_replaces_the_logits_terms() -> None:
    from memprof.estimate import estimate
    from memprof.estimate.inputs import EstimateInputs
    from memprof.models import preset_config

    base = EstimateInputs(model_config=preset_config("llama-tiny"), precision="bf16", micro_batch=2, seq_len=32,
                          device_type="cpu")
    hf, trl = estimate(base), estimate(base.with_(loss_implementation="trl_fused_head"))
    # llama-tiny's 512-token vocabulary: the fused head's 32768-column chunk buffer outweighs the logits
    assert trl.ranks[0].phases["forward"] != hf.ranks[0].phases["forward"]
    assert any("add_fused_lm_head" in a for a in trl.assumptions)
