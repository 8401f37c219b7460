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
