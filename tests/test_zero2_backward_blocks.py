"""ZeRO-2's backward block by block, and ZeRO-1 + optimizer offload's reduction after backward
(issue 18): the gradient bytes each rank holds at its backward peak, derived by hand from the
partition and bucket rules of DeepSpeed 0.19.8's stage_1_and_2.py, not read from the estimator.

llama-tiny (hidden 64, intermediate 176, 4 heads of 16, 2 key/value heads, 2 layers, vocabulary
512, untied) in parameters() order: embed_tokens 512x64 = 32,768; per layer q_proj 4,096, k_proj
2,048, v_proj 2,048, o_proj 4,096, gate/up/down_proj 11,264 each, two RMSNorms 64 each (46,208 a
layer); norm 64; lm_head 32,768. 158,016 in all, a multiple of 2 ranks x 2 (alignment): no padding,
79,008 a partition. Rank 0 owns [0, 79,008): embed_tokens, layer 0 (to 78,976) and the start of
layer 1's q_proj (78,976 to 83,072), which straddles; rank 1 owns [79,008, 158,016), from that
q_proj on. grads_in_partition holds every param touching the partition, whole (:2184): 83,072
elements on rank 0, 158,016 - 78,976 = 79,040 on rank 1.

Hooks fire in backward order (traced with register_post_accumulate_grad_hook): lm_head, norm, then
per layer down_proj, up_proj, gate_proj, post_attention_layernorm, o_proj, v_proj, k_proj,
q_proj, input_layernorm, layer 1 before layer 0, embed_tokens last. With a 4,096-element bucket a
param larger than the bucket (lm_head, gate/up/down_proj, embed_tokens) keeps its own gradient
until the next hook reduces it (:1446, :1422); the first reduction of a param touching the
partition allocates grads_in_partition (:2184).
"""

from __future__ import annotations

from memprof.dsconfig.schema import ZeroKnobs
from memprof.estimate import EstimateInputs, estimate
from memprof.models import preset_config

FP32, FP64 = 4, 8
BUCKET = 4096
MLP = 11_264  # gate/up/down_proj
TOTAL = 158_016
HELD = {0: 83_072, 1: 79_040}  # grads_in_partition elements per rank


def _llama_tiny(stage: int, **zero) -> EstimateInputs:
    return EstimateInputs(model_config=preset_config("llama-tiny"), model_name="llama-tiny", world_size=2,
                          zero_stage=stage, micro_batch=1, seq_len=64, activation_checkpointing=True,
                          device_type="cpu", zero=ZeroKnobs(reduce_bucket_size=BUCKET, **zero))


def _backward_peak(est, rank: int) -> dict[str, int]:
    return next(r for r in est.ranks if r.rank == rank).phases["backward"]["device"]


def test_zero2_holds_grads_in_partition_beside_a_blocks_recompute():
    est = estimate(_llama_tiny(2))
    # rank 1: lm_head waits (32,768 > 4,096); norm's hook reduces it, and it lies in rank 1's
    # partition: grads_in_partition exists before layer 1's backward. At layer 1's SwiGLU product
    # (after down_proj's hook) down_proj's 11,264-element gradient waits outside the bucket.
    r1 = _backward_peak(est, 1)
    assert r1["grads"] == HELD[1] * FP32 + MLP * FP32 == 361_216
    # rank 0: nothing of its partition is reduced until layer 1's q_proj (4,096, alone in the
    # bucket after v_proj + k_proj filled one) is flushed at layer 1's input_layernorm hook: its
    # grads_in_partition appears before layer 0's backward, the same moment in layer 0
    r0 = _backward_peak(est, 0)
    assert r0["grads"] == HELD[0] * FP32 + MLP * FP32 == 377_344
    # the one reduce bucket (overlap_comm is off at stage 2: zero/config.py), fp32
    assert r0["comm_buffers"] == r1["comm_buffers"] == BUCKET * FP32
    # layer 0's moment has layer 1's checkpointed input (B*S*H*4 = 64 x 64 x 4) and its stashed
    # CPU RNG state (torch.get_rng_state(): 5,056 bytes) released
    assert r1["activations"] - r0["activations"] == 64 * 64 * FP32 + 5056


def test_zero1_offload_keeps_every_grad_through_the_norms_float64_copy():
    est = estimate(_llama_tiny(1, offload_optimizer="cpu", offload_optimizer_pin_memory=False))
    # after loss.backward() reduce_gradients walks params in forward order with every param.grad
    # alive: embed_tokens (32,768, larger than the bucket) waits, q_proj's call reduces it, and it is
    # rank 0's: set_norm_for_param_grad_in_gpu copies its piece to float64 (:1873) beside them all
    r0 = _backward_peak(est, 0)
    assert r0["grads"] == TOTAL * FP32 + 32_768 * FP64 == 894_208
    assert r0["activations"] == 64 * 8 + 4  # freed by then: only the loop's batch ids and loss remain


# GPT-2 124M (tied lm_head), 2 ranks, ZeRO-2 fp32, 500,000-element buckets (configs/demo.json), in
# parameters() order: wte 50,257 x 768 = 38,597,376; wpe 1,024 x 768 = 786,432; per block 7,087,872
# (ln_1 1,536, c_attn 1,769,472 + 2,304, attn.c_proj 589,824 + 768, ln_2 1,536, c_fc 2,359,296 +
# 3,072, c_proj 2,359,296 + 768); ln_f 1,536. 124,439,808 in all, a multiple of 4: 62,219,904 a
# partition. Rank 0 owns wte, wpe, blocks 0-2 and block 3's ln_1; block 3's c_attn.weight
# [60,648,960, 62,418,432) straddles: grads_in_partition holds 62,418,432 elements on rank 0.
GPT2_WTE, GPT2_WPE, GPT2_HELD0 = 50_257 * 768, 1_024 * 768, 62_418_432


def test_zero2_tied_embedding_sum_is_rank0s_backward_peak():
    inp = EstimateInputs(model_config=preset_config("gpt2"), model_name="gpt2", world_size=2, zero_stage=2,
                         micro_batch=2, seq_len=128, device_type="cpu", zero=ZeroKnobs(reduce_bucket_size=500_000))
    est = estimate(inp)
    r0 = next(r for r in est.ranks if r.rank == 0)
    peak = r0.phases["backward"]["device"]
    # wte's hook is backward's last (one AccumulateGrad node for both uses): when the embedding's
    # backward returns its share, lm_head's waits in the node's input buffer and torch adds them
    # out of place: both shares and the sum, 3 x V*H*4 (traced on 2-rank GPT-2 124M: the peak is
    # that aten.add). Every other hook has run: grads_in_partition exists on rank 0 (block 3's
    # c_attn.weight was reduced at its ln_1.weight hook), and wpe (786,432 > 500,000 elements)
    # waits outside the bucket for wte's hook to reduce it (:1446).
    assert peak["activations"] - r0.rest["device"]["activations"] == 3 * GPT2_WTE * FP32 == 463_168_512
    assert peak["grads"] == GPT2_HELD0 * FP32 + GPT2_WPE * FP32 == 252_819_456
    assert peak["comm_buffers"] == 500_000 * FP32
