"""ZeRO-3 + activation checkpointing: the forward peak can be inside an earlier block, where the
parameter coordinator's prefetches hold later blocks in flat all-gather buffers, rather than at the
loss, where every parameter is gathered but no buffer is left (memprof.estimate.core._block_fetch_moments).

The expected bytes are derived here by hand from DeepSpeed 0.19.8's code path and the GPT-2 layout,
not from the estimator: parameter numels x 4 bytes (fp32), the prefetch calls the coordinator issues,
and the activations alive at block 1's GELU (traced with a dispatch-mode tracker on the 3-rank run
of this shape, /tmp/lead-new/new-gpt2w96-z3-adagrad-fp32-ckpt-n3-seq56: measured params 1,738,624
bytes, the three flat buffers 779,520 bytes, activations 1,012,032 bytes at the forward peak
without the checkpoint RNG stashes, which that tracker does not see)."""

from __future__ import annotations

from memprof.estimate import estimate, inputs_from_run

H, I, V, POS, L, B, S, N = 96, 384, 512, 256, 3, 2, 56, 3
FP32, INT64 = 4, 8
MODEL = {"model_type": "gpt2", "vocab_size": V, "n_positions": POS, "n_embd": H, "n_layer": L, "n_head": 4,
         "n_inner": None, "activation_function": "gelu_new", "tie_word_embeddings": True}


def _run(optimizer: str = "adagrad", world: int = N, seq: int = S) -> dict:
    ds = {"train_micro_batch_size_per_gpu": B, "optimizer": {"type": optimizer, "params": {"lr": 1e-3}},
          "zero_allow_untested_optimizer": True,
          "zero_optimization": {"stage": 3, "reduce_bucket_size": 50_000, "allgather_bucket_size": 50_000,
                                "stage3_param_persistence_threshold": 256, "stage3_prefetch_bucket_size": 50_000}}
    return {"model_config": MODEL, "world_size": world, "nodes": 1, "zero_stage": 3, "optimizer": optimizer,
            "precision": "fp32", "micro_batch": B, "seq_len": seq, "activation_checkpointing": True,
            "device_type": "cpu", "deepspeed_config": ds}


# one block's params (modeling_gpt2.py: Conv1D weights are (in, out)); <= 256 elements persist
# (stage3_param_persistence_threshold): the LayerNorms and both c_proj biases, not c_attn's
# (288) or c_fc's (384) bias
C_ATTN_W, C_ATTN_B, A_PROJ_W, C_FC_W, C_FC_B, M_PROJ_W = H * 3 * H, 3 * H, H * H, H * I, I, I * H
BLOCK_GATHERED = C_ATTN_W + C_ATTN_B + A_PROJ_W + C_FC_W + C_FC_B + M_PROJ_W  # 111,264
PERSISTENT = L * (4 * H + 2 * H) + 2 * H  # ln_1, ln_2 (weight, bias), the two c_proj biases; ln_f
WTE, WPE = V * H, POS * H
TOTAL = WTE + WPE + L * (BLOCK_GATHERED + 6 * H) + 2 * H


def test_forward_peak_is_block_1_gelu_with_later_blocks_in_flight():
    """The coordinator's prefetch (partitioned_param_coordinator.py:451-481) pops the trace queue
    until 50,000 not-yet-available elements are picked, at every module's fetch, parameter-less
    modules included; each pick is one all_gather_coalesced call (partition_parameters.py:1343,
    a flat buffer of the params' elements, all divisible by 3 here). Walking the fetches:
    GPT2LMHeadModel -> {wte, wpe}; transformer -> {h0 c_attn.w, c_attn.b, attn.c_proj.w, c_fc.w};
    wte -> {h0 c_fc.b, mlp.c_proj.w, h1 c_attn.w}; wpe -> {h1 c_attn.b, attn.c_proj.w, c_fc.w,
    c_fc.b, mlp.c_proj.w}; drop -> {h2 c_attn.w, c_attn.b, attn.c_proj.w, c_fc.w}; h.0 (the block)
    -> {h2 c_fc.b, mlp.c_proj.w}, and the queue is empty. A fetch waits the calls holding its
    module's params (each waited param gets its own torch.cat copy, :795) and pops its registry
    entries (:406); a call's flat buffer dies with its last entry. Nothing is released in forward
    (every param is reused in backward within stage3_max_reuse_distance 1e9, :655-663).

    At block 1's GELU (mlp.act's forward, after its fetch) h.0, h.1, wte and wpe are gathered; the
    buffers alive are wpe's call (still registered under h1 mlp.c_proj.w), drop's and h.0's calls
    (h.2 in flight). Activations there (checkpointing: no_grad inside the block, every block input
    so far kept): ids and position ids, wte and wpe outputs, the embedding dropout's CPU noise, the
    inputs of blocks 0 and 1, the attention output, residual sum and ln_2 output, and c_fc's output
    with three GELU temporaries (gelu_new's 0.5*x, x**3, 0.044715*x**3); and the CPU RNG state
    torch.utils.checkpoint stashed for blocks 0 and 1 (preserve_rng_state: torch.get_rng_state(),
    a uint8 tensor of 5,056 elements; the dispatch-mode trace does not see them, the launch's
    allocation-hook tracker does)."""
    est = estimate(inputs_from_run(_run()))
    fwd = est.ranks[0].phases["forward"]["device"]
    partition = TOTAL // N  # every numel here divides by 3: no padding
    gathered = WTE + WPE + 2 * BLOCK_GATHERED
    buffers = ((A_PROJ_W + C_FC_W + C_FC_B + M_PROJ_W + C_ATTN_B)  # wpe's call (h.1)
               + (C_ATTN_W + C_ATTN_B + A_PROJ_W + C_FC_W)  # drop's call (h.2)
               + (C_FC_B + M_PROJ_W))  # h.0's call (h.2)
    assert fwd["params"] == (partition + PERSISTENT + gathered) * FP32 == 1_738_624
    assert fwd["comm_buffers"] == 50_000 * FP32 + buffers * FP32 == 979_520  # + the reduce bucket (contiguous_gradients)
    BSH, BSI = B * S * H * FP32, B * S * I * FP32
    acts = B * S * INT64 + S * INT64 + BSH + S * H * FP32 + BSH + 2 * BSH + 3 * BSH + 4 * BSI + 2 * 5056
    assert fwd["activations"] == acts == 1_012_032 + 10_112


def test_loss_moment_still_wins_when_nothing_is_in_flight():
    """With one rank nothing is gathered into a new buffer (NoGatherHandle, partition_parameters.py:61):
    no block moment is modelled and the forward peak is the loss's, as before."""
    est = estimate(inputs_from_run(_run(world=1)))
    fwd = est.ranks[0].phases["forward"]["device"]
    assert fwd["comm_buffers"] == 50_000 * FP32
    # at the loss the logits (B*S*V*4) and log_softmax's output are alive
    assert fwd["activations"] > 2 * B * S * V * FP32
