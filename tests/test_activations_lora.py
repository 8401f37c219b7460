"""LoRA activation bytes traced on PEFT-wrapped tiny models (``get_peft_model`` over the launcher's
model, in-process, no launch) and compared with the family formulas' LoRA terms
(memprof/families/{llama,gpt2}.py ``_lora_activations``), not fitted: the tracer of
tests/test_activations_llama.py (a TorchDispatchMode seeing each new storage die, saved-tensor
hooks, a post-accumulate-grad hook on every trainable parameter).

Checked: what the loop's loss keeps alive after backward (with checkpointing, every layer's
input: torch's checkpoint frames), without checkpointing the bytes autograd saves exactly and the forward and backward peaks
within 8 bytes (the loss and its seed); with checkpointing the forward and backward peaks within
1%. The largest moment from the first adapter gradient on is an approximation (an upper bound
where it stays under backward's start), checked within 10% where it decides the backward peak.
"""

from __future__ import annotations

import pytest
import torch
from test_activations_llama import _LiveBytes

from memprof.estimate.model_shapes import model_shape
from memprof.families.common import ActivationQuery
from memprof.models import preset_config
from memprof.peft_config import LoraSetup
from memprof.train.model import build_model, wrap_with_peft


def _trace(config: dict, batch: int, seq: int, dtype: torch.dtype, attn: str, checkpointing: bool,
           lora: LoraSetup) -> dict[str, int]:
    model = build_model(config, seed=0, activation_checkpointing=checkpointing)
    model = wrap_with_peft(model, lora.to_json()).to(dtype)  # DeepSpeed's engine casts the adapters too
    model.base_model.model.config._attn_implementation = attn
    params = list(model.parameters())
    tracker = _LiveBytes(params)
    for p in params:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(tracker.start)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in tracker.param_ptrs:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with tracker:
        ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=ids)
        forward_peak = tracker.peak
        loss = out.loss
        del out
        tracker.peak = 0
        loss.backward()
        held = tracker.current - tracker.grad_bytes()  # what the loop's loss (and batch) keep until the next step
    return {"saved": sum(saved.values()), "forward_peak": forward_peak, "first_hook": tracker.first_hook_peak,
            "backward_peak": tracker.peak, "held": held}


QV = LoraSetup(r=4, target_modules=("q_proj", "v_proj"))
ALL = LoraSetup(r=4, target_modules="all-linear")
ALL_DROPOUT = LoraSetup(r=4, target_modules="all-linear", lora_dropout=0.1)
MLP = LoraSetup(r=8, target_modules=("gate_proj", "down_proj"))
C_ATTN = LoraSetup(r=4, target_modules=("c_attn",))
GPT2_MLP = LoraSetup(r=4, target_modules=("c_fc", "mlp.c_proj"))

CASES = [
    # (preset, batch, seq, dtype, attention, checkpointing, adapters)
    ("llama-tiny", 2, 32, torch.float32, "sdpa", False, QV),
    ("llama-tiny", 2, 32, torch.bfloat16, "sdpa", False, QV),
    ("llama-tiny", 2, 32, torch.float32, "sdpa", True, QV),
    ("llama-tiny", 2, 32, torch.bfloat16, "sdpa", True, QV),
    ("llama-tiny", 2, 32, torch.float32, "sdpa", False, ALL),
    ("llama-tiny", 2, 32, torch.bfloat16, "sdpa", False, ALL_DROPOUT),
    ("llama-tiny", 2, 32, torch.float32, "sdpa", True, ALL_DROPOUT),
    ("llama-tiny", 2, 32, torch.float32, "sdpa", False, MLP),  # layer 0's attention needs no grad
    ("llama-tiny", 2, 64, torch.float32, "eager", False, QV),  # eager with k frozen in layer 0
    ("llama-tiny", 2, 64, torch.bfloat16, "eager", True, ALL),
    ("gpt2-tiny", 2, 32, torch.float32, "sdpa", False, C_ATTN),
    ("gpt2-tiny", 2, 32, torch.bfloat16, "sdpa", False, C_ATTN),
    ("gpt2-tiny", 2, 32, torch.float32, "eager", False, C_ATTN),
    ("gpt2-tiny", 2, 32, torch.float32, "sdpa", True, C_ATTN),
    ("gpt2-tiny", 2, 32, torch.float32, "sdpa", False, ALL_DROPOUT),
    ("gpt2-tiny", 2, 32, torch.float32, "sdpa", False, GPT2_MLP),
]


@pytest.mark.parametrize("preset,batch,seq,dtype,attn,ckpt,lora", CASES)
def test_lora_activations_match_the_trace(preset, batch, seq, dtype, attn, ckpt, lora) -> None:
    config = preset_config(preset)
    traced = _trace(config, batch, seq, dtype, attn, ckpt, lora)
    shape = model_shape(config, lora=lora)
    assert shape.lora_query is not None
    est = shape.family.activations(shape, ActivationQuery(batch, seq, dtype.itemsize, attn, ckpt, "cpu",
                                                          shape.lora_query))
    if not ckpt:
        assert traced["saved"] == est.saved
        assert abs(traced["forward_peak"] - est.forward_peak) <= 8, (traced, est)
        assert abs(traced["backward_peak"] - est.backward_peak) <= 8, (traced, est)
    else:
        # a step's forward also holds what the previous step's loss keeps (the checkpointed inputs);
        # the trace is one step
        kept = est.loop_held - batch * seq * 8 - 4
        assert est.forward_peak - kept == pytest.approx(traced["forward_peak"], rel=0.01), (traced, est)
        assert est.backward_peak == pytest.approx(traced["backward_peak"], rel=0.01), (traced, est)
    assert traced["held"] == est.loop_held  # with checkpointing the checkpoints' inputs too
    if traced["first_hook"] > 0.9 * traced["backward_peak"]:  # where it decides the backward peak
        assert est.backward_first_hook == pytest.approx(traced["first_hook"], rel=0.10), (traced, est)


def test_setups_the_lora_terms_do_not_cover_fall_back_to_full_fine_tuning() -> None:
    config = preset_config("llama-tiny")
    assert model_shape(config, lora=LoraSetup(r=4, target_modules=("q_proj",), bias="all")).lora_query is None
    assert model_shape(config, lora=LoraSetup(r=4, target_modules=("q_proj",), modules_to_save=("lm_head",))
                       ).lora_query is None
    assert model_shape(config, lora=LoraSetup(r=4, target_modules=("lm_head", "q_proj"))).lora_query is None
    q = model_shape(config, lora=QV).lora_query
    assert q.layers == (("self_attn.q_proj", "self_attn.v_proj"),) * 2 and q.r == 4
