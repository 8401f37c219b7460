"""TRL's fused LM head, derived (memprof/estimate/trainer_terms.py) and measured: the head alone
(trl/kernels/chunked_logprob.py ChunkedLogProbFunction, called as trl/trainer/utils.py
add_fused_lm_head calls it off Triton) under memprof's allocation hook, fp32 and bf16, a
vocabulary below, at and above one 32768-column chunk. In-process, no launch. Also the log keys
MemprofCallback adds (memprof/integrations/log_values.py)."""

from __future__ import annotations

import pytest
import torch

from memprof.estimate.trainer_terms import (
    VOCAB_CHUNK_SIZE,
    scored_positions,
    trl_fused_head_bytes,
    trl_loss_extra_bytes,
)
from memprof.integrations.log_values import peak_log_values

TOLERANCE = 0.005  # the derivation leaves out a few [N]-sized scalars' worth of bytes


def _measure(fn):
    from memprof.measure.allocation_hook_tracker import NativeAllocationTracker

    tracker = NativeAllocationTracker()
    with tracker:
        base = tracker.device_total
        tracker.reset_peak()
        out = fn()
        return tracker.peak_total - base, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq,vocab,hidden", [(2, 32, 512, 64), (2, 64, 1000, 32), (1, 16, 40000, 16)])
def test_fused_head_forward_and_backward_peaks_match_the_derivation(dtype, batch, seq, vocab, hidden) -> None:
    from trl.kernels import ChunkedLogProbFunction

    try:
        from memprof.measure.native import load

        load()
    except Exception as e:  # pragma: no cover - the hook is built by make install
        pytest.skip(f"allocation hook unavailable: {e}")
    g = torch.Generator().manual_seed(0)
    states = torch.randn(batch, seq, hidden, generator=g).to(dtype).requires_grad_(True)
    weight = torch.randn(vocab, hidden, generator=g).to(dtype)  # frozen, as a LoRA backbone's lm_head
    labels = torch.randint(0, vocab, (batch, seq), generator=g)[:, 1:]

    def forward():
        # add_fused_lm_head's non-Triton path: every shifted position, the reshape copies
        rows = states[:, :-1].reshape(-1, hidden)
        return ChunkedLogProbFunction.apply(rows, weight, None, labels.clamp(min=0).reshape(-1), 1.0,
                                            VOCAB_CHUNK_SIZE, None, 1.0, ("entropy", "is_top1"))

    forward_peak, outputs = _measure(forward)
    log_probs = outputs[0]
    backward_peak, _ = _measure(lambda: log_probs.sum().backward())

    size = torch.finfo(dtype).bits // 8
    n = scored_positions(batch, seq)
    derived = trl_fused_head_bytes(n, hidden, vocab, compute_bytes=size, hidden_bytes=size)
    assert derived == trl_loss_extra_bytes(batch, seq, vocab, hidden, dtype_bytes=size)
    assert forward_peak == pytest.approx(derived.saved + derived.forward_transient, rel=TOLERANCE)
    assert backward_peak == pytest.approx(derived.backward_transient, rel=TOLERANCE)


def test_the_buffer_is_a_whole_chunk_wide_whatever_the_vocabulary() -> None:
    small = trl_fused_head_bytes(62, 64, 512, compute_bytes=2, hidden_bytes=2, triton=True)
    assert small.forward_transient == 62 * VOCAB_CHUNK_SIZE * 2 + 7 * 4 * 62
    # 4096 tokens cap the rows: a 128k-vocabulary Llama at 8192 tokens holds 256 MiB in bf16, not the
    # 4 GiB of fp32 logits an HF ForCausalLM loss would
    big = trl_fused_head_bytes(8192, 4096, 128256, compute_bytes=2, hidden_bytes=2, triton=True)
    assert big.forward_transient - 7 * 4 * 8192 == 4096 * VOCAB_CHUNK_SIZE * 2 == 256 * 2**20
    assert scored_positions(2, 32, trainer="dpo") == 4 * 31
    assert scored_positions(2, 32, triton=True, label_tokens=40) == 40
    assert trl_fused_head_bytes(0, 64, 512, compute_bytes=4, hidden_bytes=4).forward_transient == 0


def test_log_values_take_each_phase_from_its_highest_micro_step() -> None:
    def rec(step: int, boundary: bool, fwd: int, host: int = 0) -> dict:
        phase = {"peak": {"device": {"params": 10, "activations": fwd}, "host": {"optimizer_state": host}},
                 "peak_total": 10 + fwd}
        phases = {"forward": phase, "backward": phase}
        if boundary:
            phases["step"] = phase
        return {"type": "step", "step": step, "optimizer_step": 3, "boundary": boundary, "phases": phases}

    values = peak_log_values([rec(6, False, 100), rec(7, True, 50, host=8)])
    assert values["memprof/peak_forward_activations_bytes"] == 100
    assert values["memprof/peak_forward_total_bytes"] == 110
    assert values["memprof/peak_step_activations_bytes"] == 50 and values["memprof/peak_step_host_bytes"] == 8
    assert "memprof/peak_forward_host_bytes" not in values
    assert values["memprof/peak_backward_grads_bytes"] == 0 and values["memprof/optimizer_step"] == 3
    assert peak_log_values([]) == {}


# ---- DPO (TRL 1.16 DPOTrainer._compute_loss, traced in-process, no DeepSpeed) ------------------------
#
# The harness's model (tests/hf_harness/trl_run.py: llama-tiny with its 512-token vocabulary, LoRA r=4 on
# q_proj / v_proj), cast to bf16 as DeepSpeed's engine casts it, gradient checkpointing as TRL sets it
# up (enable_input_require_grads; reentrant, as DPOTrainer forces with PEFT + ZeRO-3), the fused head
# added as DPOTrainer.__init__ adds it, and one micro-step run the way _compute_loss runs it: the policy
# forward over [chosen; rejected], the reference forward under no_grad (an explicit reference model, or
# the policy with its adapters disabled), DPO's sigmoid loss, backward. Measured with memprof's
# allocation hook; the expected bytes are derived here from the shapes, not read from the estimator.

H, I_, V_, L_, D = 64, 176, 512, 2, 16  # llama-tiny: hidden, intermediate, vocabulary, layers, head_dim
RNG_STATE = 5056  # torch.get_rng_state().numel(): the CPU generator state torch.utils.checkpoint stashes


def _dpo_micro_step(pairs: int, seq: int, reference: str) -> dict[str, int]:
    import peft
    from hf_harness.trl_run import build_llama
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import add_fused_lm_head, use_adapter

    from memprof.measure.allocation_hook_tracker import NativeAllocationTracker

    model = peft.get_peft_model(build_llama(V_), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    kwargs = {"use_reentrant": True}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    model = model.to(torch.bfloat16).train()
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    ref = None
    if reference == "model":
        ref = build_llama(V_).eval().requires_grad_(False).to(torch.bfloat16)
        add_fused_lm_head(ref)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, V_, (2 * pairs, seq), generator=g)
    completion = torch.cat([torch.zeros(2 * pairs, seq // 2, dtype=torch.long),
                            torch.ones(2 * pairs, seq - seq // 2, dtype=torch.long)], 1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out: dict[str, int] = {}
    tracker = NativeAllocationTracker()
    with tracker:
        base = tracker.device_total

        def mark(name: str) -> None:
            out[name], out[name + "_peak"] = tracker.device_total - base, tracker.peak_total - base
            tracker.reset_peak()

        tracker.reset_peak()
        labels = ids.masked_fill(completion == 0, -100)
        policy = model(**batch, use_cache=False, labels=labels, fused_lm_head=True)
        mark("policy")
        logps = policy.log_probs.sum(1)
        with torch.no_grad(), disable_gradient_checkpointing(model, kwargs):
            if ref is None:
                with use_adapter(model, adapter_name=None):
                    ref_logps = model(**batch, use_cache=False, labels=labels, fused_lm_head=True).log_probs.sum(1)
            else:
                ref_logps = ref(**batch, use_cache=False, labels=labels, fused_lm_head=True).log_probs.sum(1)
        mark("reference")
        chosen, rejected = (logps - ref_logps).chunk(2)
        loss = -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected)).mean()
        del policy, logps, ref_logps, chosen, rejected, labels
        tracker.reset_peak()
        loss.backward()
        mark("backward")
        del loss  # the adapters' grads stay: what goes is what the loss's graph held
        mark("released")
    out["held_after_backward"] = out["backward"] - out["released"]
    return out


@pytest.fixture(scope="module", params=["model", "peft"])
def dpo_trace(request):
    try:
        from memprof.measure.native import load

        load()
    except Exception as e:  # pragma: no cover - the hook is built by make install
        pytest.skip(f"allocation hook unavailable: {e}")
    return request.param, _dpo_micro_step(2, 32, request.param)


def _dpo_estimate(reference: str):
    from memprof.estimate.core import _activations, dpo_reference_forward
    from memprof.estimate.inputs import EstimateInputs
    from memprof.estimate.model_shapes import shape_of
    from memprof.models import preset_config
    from memprof.peft_config import LoraSetup

    cfg = preset_config("llama-tiny")
    inp = EstimateInputs(model_config=cfg, micro_batch=2, seq_len=32, precision="bf16", activation_checkpointing=True,
                         device_type="cpu", loss_implementation="trl_dpo", zero_stage=3, world_size=2,
                         peft=LoraSetup(r=4, target_modules=("q_proj", "v_proj")),
                         reference_model=cfg if reference == "model" else None)
    shape = shape_of(inp)
    return _activations(inp, shape), dpo_reference_forward(inp, shape)


def test_dpo_reference_forward_head_moment_matches_the_trace(dpo_trace) -> None:
    """The reference forward's peak beyond what the policy holds after its forward: the head's
    moment (last_hidden_state, the reshape copy, targets and mask, ChunkedLogProbFunction's buffer,
    statistics and tiles: 12 bytes a tile element for the reference model's ("log_probs",), 13 for
    the policy's patched forward with is_top1)."""
    reference, traced = dpo_trace
    rows, seq, e = 4, 32, 2
    n = rows * (seq - 1)
    tile = 12 + (reference == "peft")
    derived = rows * seq * H * e + n * H * e + n * (8 + 1) + n * 32768 * e + 7 * 4 * n + n * V_ * tile
    assert traced["reference_peak"] - traced["policy"] == pytest.approx(derived, rel=0.001)
    _, ref = _dpo_estimate(reference)
    assert ref.moment == "head" and ref.head == derived


def test_dpo_policy_forward_and_backward_peaks_are_a_2b_row_batch(dpo_trace) -> None:
    """The policy's forward and backward peaks are those of a 2B-row micro-batch (the family formula
    at 4 rows, the fused head over 4*31 positions), within 0.5%; the estimate's forward moment is the
    larger of the policy's and the reference forward's."""
    reference, traced = dpo_trace
    acts, ref = _dpo_estimate(reference)
    # the formula's forward peak counts the previous micro-step's loss graph (memprof's loop keeps it
    # through the next forward: 2 B*S*H*e + the reentrant extras) and the loop's batch; the trace has
    # neither (its batch was allocated before tracking)
    kept = acts.loop_held - 4 * 32 * 8 - 4
    at_reference = traced["reference_peak"]
    assert acts.forward_peak - kept - 4 * 32 * 8 == pytest.approx(max(traced["policy_peak"], at_reference), rel=0.005)
    assert acts.backward_peak == pytest.approx(traced["backward_peak"], rel=0.005)


def test_dpo_loss_keeps_the_embedding_output_its_grad_and_the_reentrant_stash(dpo_trace) -> None:
    """After backward the loss still holds: the frozen embedding's output, made a leaf by PEFT's
    enable_input_require_grads, and its .grad (2 x rows*S*H*e); reentrant checkpointing's per-layer
    ctx.run_function kwargs (position ids S*8, cos and sin 2*S*d*e, shared) and stashed CPU RNG state
    (5056 bytes a layer); the loss scalar."""
    _, traced = dpo_trace
    rows, seq, e = 4, 32, 2
    derived = 2 * rows * seq * H * e + seq * 8 + 2 * seq * D * e + L_ * RNG_STATE + 4
    assert traced["held_after_backward"] == derived
    acts, _ = _dpo_estimate("model")
    assert acts.loop_held == derived + rows * seq * 8  # + the loop's input_ids


@pytest.mark.parametrize("layers,inner,dtype", [(2, 176, torch.bfloat16), (1, 176, torch.bfloat16), (3, 512, torch.float32)])
def test_reference_forward_mlp_moment_matches_a_no_grad_backbone(layers, inner, dtype) -> None:
    """Under no_grad the backbone's widest moment is the last layer's SwiGLU: the embedding output,
    the layer input, the post-attention sum and its norm (3 of them in one layer), silu, up and their
    product, cos, sin and the position ids (sdpa, traced exactly)."""
    import transformers

    from memprof.estimate.trainer_terms import reference_forward_bytes
    from memprof.measure.allocation_hook_tracker import NativeAllocationTracker
    from memprof.models import preset_config

    try:
        from memprof.measure.native import load

        load()
    except Exception as e:  # pragma: no cover
        pytest.skip(f"allocation hook unavailable: {e}")
    cfg = {k: v for k, v in preset_config("llama-tiny").items() if k != "model_type"}
    cfg.update(num_hidden_layers=layers, intermediate_size=inner)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dtype).eval()
    rows, seq = 4, 64
    ids = torch.randint(2, 500, (rows, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    tracker = NativeAllocationTracker()
    with tracker, torch.no_grad():
        base = tracker.device_total
        tracker.reset_peak()
        model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        peak = tracker.peak_total - base
    e = torch.finfo(dtype).bits // 8
    streams = 4 if layers > 1 else 3
    derived = streams * rows * seq * H * e + 3 * rows * seq * inner * e + 2 * seq * D * e + seq * 8
    assert peak == derived
    assert reference_forward_bytes(rows, seq, H, V_, e=e, inner=inner, n_layer=layers, head_dim=D,
                                   policy_outputs=False).mlp == derived


def test_dpo_run_record_selects_its_terms() -> None:
    """A DPOTrainer run (memprof.integrations.transformers' record) is estimated with DPO's terms; the
    checkpoint kind and precompute_ref_log_probs come from the record, the reference engine's
    threshold from reference_model."""
    from memprof.estimate.core import checkpoint_reentrant, model_rows, reference_persistence_threshold
    from memprof.estimate.from_run import inputs_from_run
    from memprof.models import preset_config

    cfg = preset_config("llama-tiny")
    run = {"model_config": cfg, "world_size": 2, "zero_stage": 3, "precision": "bf16", "micro_batch": 2, "seq_len": 32,
           "activation_checkpointing": True,
           "reference_model": {"same_config_as_policy": True, "n_params": 1, "param_persistence_threshold": 100_000},
           "trainer": {"trainer_class": "DPOTrainer", "gradient_checkpointing": True,
                       "gradient_checkpointing_kwargs": {"use_reentrant": True}, "precompute_ref_log_probs": False}}
    inp = inputs_from_run(run)
    assert inp.loss_implementation == "trl_dpo" and model_rows(inp) == 4 and not inp.precompute_ref_log_probs
    assert checkpoint_reentrant(inp) and reference_persistence_threshold(inp) == 100_000
    run["trainer"] = {"trainer_class": "SFTTrainer", "gradient_checkpointing": True,
                      "gradient_checkpointing_kwargs": None}
    sft = inputs_from_run(run)
    assert sft.loss_implementation == "trl_fused_head" and model_rows(sft) == 2 and not checkpoint_reentrant(sft)


def test_reference_engine_threshold_from_the_config() -> None:
    """TRL prepares the reference engine before HF resolves the hidden-size "auto" values, and
    DeepSpeed drops "auto": an "auto" threshold is DeepSpeed's default 100,000 for the reference
    (runtime/zero/config.py), an explicit one is kept."""
    from memprof.estimate.core import reference_persistence_threshold
    from memprof.estimate.inputs import EstimateInputs, settings_from_deepspeed_config
    from memprof.models import preset_config

    cfg = preset_config("llama-tiny")

    def inputs(value):
        ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": value},
              "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}
        return EstimateInputs(model_config=cfg, reference_model=cfg, loss_implementation="trl_dpo", world_size=2,
                              **settings_from_deepspeed_config(ds, "x", world_size=2, hidden_size=cfg["hidden_size"]))

    assert inputs("auto").zero.param_persistence_threshold == 640  # the policy's: 10 x hidden
    assert reference_persistence_threshold(inputs("auto")) == 100_000
    assert reference_persistence_threshold(inputs(5000)) == 5000


def test_trainer_holds_its_accumulation_batches_and_one_ahead() -> None:
    """DPO under the HF Trainer, CPU: gradient_accumulation_steps collated batches (get_batch_samples)
    and accelerate's one-batch lookahead, each input_ids + attention_mask + completion_mask, 2B x S
    int64; one input_ids is the activation formula's already (measured at rest in the DPO launches:
    9,216 bytes, GAS 2, B 2, S 32). They are `activations`, as that input_ids is: the model's inputs
    (the profiler names every batch a data loader returns, memprof.measure.regions); `other` keeps
    none of them, and the total is the same."""
    from memprof.estimate import estimate
    from memprof.estimate.inputs import EstimateInputs
    from memprof.models import preset_config

    cfg = preset_config("llama-tiny")
    base = dict(model_config=cfg, micro_batch=2, seq_len=32, world_size=2, zero_stage=2, device_type="cpu",
                gradient_accumulation_steps=2)
    dpo = estimate(EstimateInputs(**base, loss_implementation="trl_dpo")).ranks[0].rest["device"]
    hf = estimate(EstimateInputs(**base)).ranks[0].rest["device"]
    # at rest: every held batch (2B = 4 rows) and the fp32 loss; the HF loss's loop holds one
    # input_ids of B = 2 rows and the loss
    assert dpo["activations"] == (2 + 1) * 3 * 4 * 32 * 8 + 4 == 9_220
    assert hf["activations"] == 2 * 32 * 8 + 4
    assert dpo["other"] == hf["other"] == 0


def test_precompute_needs_dpo_in_one_line() -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "memprof", "estimate", "--model", "llama-tiny",
                          "--precompute-ref-log-probs"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--loss trl-dpo" in res.stderr
