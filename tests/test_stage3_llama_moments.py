"""ZeRO-3 + activation checkpointing on a Llama: forward's and backward's peak moments from DeepSpeed
0.19.8's code path (memprof.families.llama _forward_in_blocks / _head_split,
memprof.estimate.layout.deepspeed_zero._head_released).

The expected bytes are derived here by hand from the parameter numels and what the code path keeps
alive, not from the estimator; they match the 2-rank run of this shape
(/work/survey24l/new-llamaw96-z3-adamw-fp32-ckpt-seq64, rank 0, step 1): forward peak params
2,363,392, comm_buffers 200,000, activations 846,680 bytes; backward peak params 2,166,784, grads
787,776, activations 1,422,044 of a 6,939,945-byte peak."""

from __future__ import annotations

from memprof.estimate import estimate, inputs_from_run

H, I, V, L, A, KV, B, S, N = 96, 256, 512, 3, 6, 2, 2, 64, 2
D = H // A  # head_dim 16
FP32, INT64, RNG = 4, 8, 5056  # torch.get_rng_state(): a uint8 tensor of 5,056 elements
MODEL = {"model_type": "llama", "vocab_size": V, "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
         "num_attention_heads": A, "num_key_value_heads": KV, "max_position_embeddings": 256, "hidden_act": "silu",
         "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
         "attention_dropout": 0.0, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}


def _run() -> dict:
    ds = {"train_micro_batch_size_per_gpu": B, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
          "zero_allow_untested_optimizer": True, "activation_checkpointing": {"partition_activations": False},
          "zero_optimization": {"stage": 3, "reduce_bucket_size": 50_000, "allgather_bucket_size": 50_000,
                                "stage3_param_persistence_threshold": 256, "stage3_prefetch_bucket_size": 50_000}}
    return {"model_config": MODEL, "world_size": N, "nodes": 1, "zero_stage": 3, "optimizer": "adamw",
            "precision": "fp32", "micro_batch": B, "seq_len": S, "activation_checkpointing": True,
            "device_type": "cpu", "deepspeed_config": ds}


# per layer: q (H x A*D), k and v (H x KV*D), o, gate, up, down; the two RMSNorms (H each) persist
# (<= 256 elements), as does the final norm; embed_tokens and the untied lm_head (V x H) do not
LAYER = H * A * D + 2 * H * KV * D + A * D * H + 3 * H * I  # 98,304
EMBED = HEAD = V * H
PERSISTENT = 2 * L * H + H
GATHERED = EMBED + HEAD + L * LAYER  # every non-persistent param: nothing is released in forward
PARTITION = (GATHERED + PERSISTENT) // N  # all numels even: no padding
ROTARY = 2 * (D // 2) * FP32  # LlamaRotaryEmbedding's inv_freq and original_inv_freq buffers
BSH, BS = B * S * H * FP32, B * S * FP32


def test_forward_peak_is_the_loss_with_everything_gathered_and_no_buffer_in_flight():
    """The run's forward peak owners: every param gathered, only the reduce bucket in comm_buffers.
    At the loss (checkpointing: each layer keeps its input only; torch/utils/checkpoint.py
    non-reentrant): the batch (B*S int64), the position ids (S int64), cos and sin ((1, S, D) fp32:
    LlamaRotaryEmbedding expands inv_freq over position_ids' batch of 1), the 3 layer inputs, the
    final RMSNorm's fp32 input (the last layer's output), rsqrt (B*S) and normalised states, its
    output (lm_head's input), the logits and log_softmax's output (B*S*V fp32 each), the padded
    labels (B*(S+1) int64) and shifted ones (B*S int64), the loss, the loop's previous loss, and
    the 3 checkpoints' CPU RNG stashes. An earlier layer's MLP moment (layer 1's, prefetched
    layer-2 params in flat all-gather buffers) is lower here by a few KB, as in the run."""
    fwd = estimate(inputs_from_run(_run())).ranks[0].phases["forward"]["device"]
    assert fwd["params"] == (PARTITION + PERSISTENT + GATHERED) * FP32 + ROTARY == 2_363_392
    assert fwd["comm_buffers"] == 50_000 * FP32
    acts = (B * S * INT64 + S * INT64 + 2 * S * D * FP32 + L * BSH + BSH + BS + BSH + BSH
            + 2 * B * S * V * FP32 + B * (S + 1) * INT64 + B * S * INT64 + FP32 + FP32 + L * RNG)
    assert fwd["activations"] == acts == 846_680


def test_backward_peak_is_in_the_last_layer_with_the_head_released():
    """lm_head.weight has no use after its backward in the coordinator's trace, so
    release_sub_module frees it (partitioned_param_coordinator.py:655-663), and its gradient went to
    the reduce bucket at its hook (none kept beyond the partitions): the last layer's backward holds
    every other param gathered, no .grad, and the most activations of backward (within 3% of the
    run's peak: its attention backward, not traced, holds 33 KB more than the MLP moment)."""
    bwd = estimate(inputs_from_run(_run())).ranks[0].phases["backward"]["device"]
    assert bwd["params"] == (PARTITION + PERSISTENT + GATHERED - HEAD) * FP32 + ROTARY == 2_166_784
    assert bwd["grads"] == PARTITION * FP32 == 787_776
    assert bwd["comm_buffers"] == 50_000 * FP32
    assert abs(bwd["activations"] - 1_422_044) <= 0.03 * 6_939_945
