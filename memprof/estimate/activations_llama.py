"""Activation memory of Llama-family training (``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``), derived from the model code of transformers 5.24 and the autograd formulas
of the ops it calls, and checked with an allocation tracer (tests/test_activations_llama.py).

Symbols: B micro-batch, S sequence, H hidden, I intermediate, a query heads, kv key/value heads,
d head_dim, Q = a*d, K = kv*d, V vocab, L layers, e bytes of the compute dtype, n_rep = a / kv.

What one decoder layer saves for backward (``LlamaDecoderLayer.forward``; Mistral's and Qwen2's
layers are the same code, Qwen2 adds q/k/v biases, which save nothing):

* 2 x ``LlamaRMSNorm`` (``hidden_states.to(float32)``; ``pow(2).mean``; ``* rsqrt(var + eps)``;
  ``weight * hidden_states.to(input_dtype)``): ``pow`` and the first ``mul`` save the fp32 input
  (a BSH*4 copy when e < 4, the input itself in fp32), ``rsqrt``'s output (B*S*4), the weight
  ``mul`` the normalised states in the compute dtype (BSH*e; the fp32 product itself is freed in
  bf16, ``ToCopyBackward`` saves nothing): 4BSH + 4BS + BSH*e per norm;
* the norms' outputs, the inputs of q/k/v_proj (one tensor) and gate/up_proj (one): 2 BSH*e;
* rotary embeddings (``apply_rotary_pos_emb``): ``q * cos`` and ``rotate_half(q) * sin`` save
  only cos and sin (q needs no gradient of them): two (S, d) tensors for the whole model;
* the attention core, by implementation (``sdpa_attention_forward`` in
  ``integrations/sdpa_attention.py``, ``eager_attention_forward`` in modeling_llama.py):
  - sdpa: ``create_causal_mask`` returns None for an unpadded causal batch, so sdpa runs with
    ``is_causal=True`` and (``use_gqa_in_sdpa``: no mask, head_dim <= 256) ``enable_gqa=True``:
    GQA's key/value heads are NOT expanded (``repeat_kv`` is skipped). On CPU (fp32 and bf16,
    no dropout: ``attention_dropout`` is 0) torch picks ``_scaled_dot_product_flash_attention_cpu``,
    which saves q, k, v, its output (which IS o_proj's input: ``transpose(1, 2).contiguous()``
    of it is a view) and a fp32 logsumexp (B*a*S): BSQ*e + 2 BSK*e + BSQ*e + 4BaS.
    On CUDA in bf16/fp16 the flash kernel saves the same (traced on CPU only; CUDA not measured);
    fp32 on CUDA with n_rep > 1 has no fused kernel taking ``enable_gqa`` but the math one, which
    expands k and v (``repeat_interleave``) and keeps B*a*S*S probabilities: counted as eager's
    terms at 4 bytes (not measured);
  - eager: ``repeat_kv`` materialises k and v as (B, a, S, d) copies when n_rep > 1 (a view when
    n_rep == 1); ``matmul(q, k^T)`` saves q and the expanded k, ``softmax(dtype=float32)`` its
    fp32 output (B*a*S*S*4), ``.to(query.dtype)`` a copy in bf16 (saved by ``matmul(probs, v)``
    with v); dropout at p = 0 returns its input; o_proj saves the contiguous output (BSQ*e);
* SwiGLU ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: silu saves its input (gate output),
  the product saves silu's output and up's output, down_proj saves the product: 4 BSI*e;
* KV cache (``use_cache``, default True in all three configs): ``DynamicLayer.update`` copies k
  and v (torch.cat) and the attention receives the copies; where the attention saves them (sdpa)
  they cost nothing more, where it saves expanded copies (eager, n_rep > 1) the cache's 2 BSK*e
  per layer stay alive until the loss returns (the output holds the cache).

Outside the layers: the ids (embedding indices, int64), cos and sin (2 S*d*e), the final norm
(4BSH + 4BS + BSH*e) and its output (lm_head's input, BSH*e), and in ``ForCausalLMLoss``
(loss/loss_utils.py) ``logits.float()`` (a B*S*V*4 copy when e < 4), ``pad`` + ``contiguous``
of the labels (B*(S+1)*8 alive until the loss returns, B*S*8 saved by nll_loss) and
``cross_entropy`` = log_softmax (saves its fp32 output, B*S*V*4) + nll_loss.

The moments after the first parameter gradient (traced with a dispatch-mode tracker and
post-accumulate-grad hooks; see ``llama_activations``): the final RMSNorm's backward, which works
in fp32 (``ToCopyBackward`` of a bf16 gradient, then four BSH*4 temporaries of the pow/mean/rsqrt
chain), the last layer's down_proj backward (grad_x BSI*e and grad_W H*I*e beside the residual
stream's gradient) and its SwiGLU product's backward (two BSI*e gradients) are the largest. The
flash attention backward keeps O(S) memory and stays below them at the traced shapes (S <= 128).
"""

from __future__ import annotations

from memprof.estimate.activations import FP32, INT64, Activations
from memprof.estimate.model_shapes import ModelShape


def attention_kernel(attn_implementation: str, device_type: str, element_size: int, n_rep: int) -> str:
    """Which attention code path runs in training: ``flash`` (CPU sdpa, CUDA sdpa in half
    precision, and CUDA fp32 without GQA through the memory-efficient kernel: the same saved
    tensors), ``math`` (CUDA fp32 sdpa with n_rep > 1: the only kernel taking ``enable_gqa``
    there) or ``eager``."""
    if attn_implementation == "eager":
        return "eager"
    if device_type == "cuda" and element_size == FP32 and n_rep > 1:
        return "math"
    return "flash"


def llama_activations(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    element_size: int,
    attn_implementation: str = "sdpa",
    checkpointing: bool = False,
    device_type: str = "cuda",
) -> Activations | None:
    """Activation memory of a Llama-family causal LM for one micro-batch (module docstring), or
    None where it is not modelled: an MLP activation other than SiLU, or a sequence longer than a
    sliding attention window (the mask then materialises and sdpa changes kernel; not traced)."""
    if (shape.hidden_act or "silu") != "silu":
        return None
    if shape.sliding_window is not None and seq_len > shape.sliding_window:
        return None
    B, S, e = micro_batch, seq_len, element_size
    H, I, a, V, L = shape.hidden, shape.inner, shape.n_head, shape.vocab, shape.n_layer
    kv, d = shape.n_kv_head, shape.head_dim
    assert H and I and a and V and L and kv and d
    n_rep = a // kv
    BS = B * S
    BSH, BSI, BSQ, BSK = BS * H, BS * I, BS * a * d, BS * kv * d
    bass = B * a * S * S
    kernel = attention_kernel(attn_implementation, device_type, e, n_rep)

    norm_saved = 4 * BSH + 4 * BS + BSH * e  # fp32 input (copy or itself), rsqrt, normalised in e
    norms = 2 * norm_saved + 2 * BSH * e  # input_layernorm, post_attention_layernorm + outputs
    mlp = 4 * BSI * e  # SwiGLU: gate output, silu output, up output, their product
    # GradientCheckpointingLayer (modeling_layers.py) sets use_cache=False and cache=None in training
    cache = shape.use_cache and not checkpointing
    cache_not_saved = 0
    if kernel == "flash":
        attn = BSQ * e + 2 * BSK * e + BSQ * e + B * a * S * FP32  # q, k, v, output = o_proj input, lse
        attn_words = "BSQ*e (q) + 2BSK*e (k, v unexpanded: enable_gqa) + BSQ*e (output = o_proj input) + 4BaS (logsumexp)"
    else:
        ae = FP32 if kernel == "math" else e
        kv_saved = 2 * (B * a * S * d * ae if n_rep > 1 else BSK * ae)  # repeat_kv copies, or the cache tensors
        probs = bass * FP32 + (bass * e if e < FP32 and kernel == "eager" else 0)  # softmax fp32 out (+ bf16 copy)
        attn = BSQ * ae + kv_saved + probs + BSQ * e  # q, k, v, probabilities, o_proj input
        if cache and n_rep > 1:
            cache_not_saved = 2 * BSK * e
        attn_words = (f"BSQ*{ae} (q) + 2 B*a*S*d*{ae} (repeat_kv copies of k, v) " if n_rep > 1 else
                      f"BSQ*{ae} (q) + 2BSK*{ae} (k, v) ") + (
                          f"+ B*a*S*S*4 (softmax){' + B*a*S*S*e (its copy)' if probs > bass * FP32 else ''} + BSQ*e (o_proj input)")
    per_layer = norms + mlp + attn

    input_ids = BS * INT64
    padded_labels = B * (S + 1) * INT64  # pad(labels, (0, 1)), alive until the loss returns
    shift_labels = BS * INT64  # labels[..., 1:].contiguous(), saved by nll_loss
    if B == 1:
        # a (1, S+1) row sliced [..., 1:] is already contiguous: contiguous() returns the view,
        # so nll_loss saves the padded labels' storage itself and there is no second copy
        shift_labels, padded_labels = padded_labels, 0
    loss = FP32
    ids = input_ids + shift_labels + FP32  # + nll's total_weight
    rotary = 2 * S * d * e  # cos, sin (saved by the rotary muls, shared by all layers)
    final_norm = norm_saved + BSH * e  # model.norm's saved tensors + its output (lm_head's input)
    log_softmax = BS * V * FP32
    logits = BS * V * e
    upcast = BS * V * FP32 if e < FP32 else 0

    outside = ids + rotary + final_norm + log_softmax
    # eager_attention_forward at its widest: repeat_kv's copies of k and v (n_rep > 1), then the
    # scores and their scaled copy (``matmul(...) * scaling``), or in bf16 the masked scores beside
    # softmax(dtype=float32)'s fp32 input copy and output (traced)
    eager_core = ((2 * B * a * S * d * e if n_rep > 1 else 0)
                  + max(2 * bass * e, bass * e + (2 * bass * FP32 if e < FP32 else bass * FP32)))
    loss_end = logits + upcast + L * cache_not_saved + padded_labels + loss
    if checkpointing:
        # non-reentrant torch.utils.checkpoint: each layer keeps only its input (BSH*e); backward
        # recomputes the last layer first, so its saved tensors come back (less the fp32 norm
        # input, which is the layer input itself in fp32)
        # the checkpoints also hold their other inputs: cos, sin (already in ``outside``) and the
        # position ids (S*8; freed after the rotary embedding without checkpointing)
        # position ids (S*8; freed after the rotary embedding without checkpointing), and for eager
        # attention the causal mask create_causal_mask built (B, 1, S, S) in the compute dtype
        mask = B * S * S * e if kernel == "eager" else 0
        saved = L * BSH * e + outside + S * INT64 + mask
        recomputed = per_layer - (BSH * FP32 if e == FP32 else 0)
        # inside the last layer's forward (only live locals count: the checkpoint drops what
        # autograd would save): ids, position ids, cos, sin, the mask, every layer's input,
        # then either the MLP at its widest (the post-attention sum and post_attention_layernorm's
        # output beside silu's output, up's output and their product, 3 BSI*e), or eager
        # attention at its widest (input_layernorm's output, v_proj's output, the rotated q and k,
        # repeat_kv's copies, then the scores and their scaled copy, or in bf16 the masked scores
        # beside softmax's fp32 input copy and output)
        layer_base = input_ids + S * INT64 + rotary + mask + L * BSH * e
        moments = [saved + loss_end, layer_base + 2 * BSH * e + 3 * BSI * e]
        if kernel == "eager":
            moments.append(layer_base + BSH * e + BSQ * e + 2 * BSK * e + eager_core)
        forward_peak = max(moments)
    else:
        saved = L * per_layer + outside
        recomputed = 0
        forward_peak = saved + loss_end
        if kernel == "eager":
            # inside the last layer's attention, at its widest: the earlier layers' saved tensors
            # (and cache copies), ids, position ids (a local of LlamaModel.forward), cos, sin, the
            # causal mask (B, 1, S, S), input_layernorm's saved tensors and output, the rotated q,
            # k and v (the cache copies), repeat_kv's copies and the scores (see eager_core)
            # In bf16 two more bf16 copies of the residual stream are alive than autograd saves (it
            # saves the norms' fp32 copies): the layer's input (``residual``) and the embedding
            # output (LlamaModel.forward's ``inputs_embeds`` local); in fp32 both are saved tensors.
            mask = B * S * S * e
            stream = 0 if e == FP32 else (2 if L > 1 else 1) * BSH * e
            inside = ((L - 1) * (per_layer + cache_not_saved) + input_ids + S * INT64 + rotary + mask + stream
                      + norm_saved + BSH * e + BSQ * e + 2 * BSK * e + eager_core)
            forward_peak = max(forward_peak, inside)
    # backward's start: nll_loss_backward and _log_softmax_backward_data outputs (B*S*V*4 each),
    # shift_labels released, the loss and its gradient seed alive
    bwd_start = saved + 2 * BS * V * FP32 - shift_labels + 2 * FP32
    # After the final norm's backward (its saved tensors and output freed, the residual stream's
    # gradient BSH*e alive; the loss gradients and log_softmax's output freed; a tied embedding's
    # lm_head gradient V*H*e waiting in its AccumulateGrad buffer for the embedding's share):
    after_norm = saved + recomputed - shift_labels - log_softmax - norm_saved + (0 if not shape.tied_embeddings else V * H * e) + 2 * FP32
    # the final RMSNorm's backward at its widest (pow's backward): its saved tensors, the fp32
    # gradient of the normalised states (a ToCopyBackward copy when e < 4) and the pow/mean/rsqrt
    # chain's BSH*4 temporaries, less the B*S*4 of rsqrt's gradient already freed
    norm_bwd = after_norm - recomputed + norm_saved + 3 * BSH * FP32 + (BSH * FP32 if e < FP32 else 0) - 4 * BS
    # the last layer's down_proj backward: grad_x (BSI*e) and grad_W (H*I*e) (+ its bias)
    down_proj = after_norm + BSI * e + H * I * e + (H * e if shape.mlp_bias else 0)
    # the first hook itself: lm_head.weight's (untied: only the loss gradients are gone) or
    # model.norm.weight's (tied: the normalised states and lm_head's input freed)
    first = ((saved - shift_labels - log_softmax + 2 * FP32) if not shape.tied_embeddings
             else (after_norm - recomputed + norm_saved - BSH * e))
    # the SwiGLU product's backward (grad of silu's output and of up's output, BSI*e each, beside
    # down_proj's grad_x; down_proj's saved input, the product, already freed)
    swiglu_mul = after_norm + 2 * BSI * e
    moments = [first, norm_bwd, down_proj, swiglu_mul]
    if kernel != "flash":
        # The last layer's eager attention backward, at _softmax_backward_data (traced): by then its
        # MLP half is released (SwiGLU's 4 BSI*e, post_attention_layernorm's saved tensors and
        # output, o_proj's input, replaced by o_proj's grad_x, BSQ*e), and matmul(probs, v)'s
        # backward has freed v's saved copy, the output gradient and (bf16) the probabilities'
        # copy; alive: the gradient of the probabilities in fp32 (a ToCopyBackward copy when
        # e < 4) and softmax's backward output (B*a*S*S*4 each).
        after_o_proj = after_norm - mlp - norm_saved - BSH * e
        moments.append(after_o_proj - kv_saved // 2 + 2 * bass * FP32 - (bass * e if e < FP32 and kernel == "eager" else 0))
    first_hook = max(moments)
    backward_peak = max(bwd_start, first_hook)
    formula = (
        f"per layer = RMSNorms 2x(4BSH+4BS+BSH*e) + norm outputs 2BSH*e + SwiGLU 4BSI*e + attention "
        f"[{kernel}: {attn_words}]" + ("; KV cache copies of k, v per layer" if cache else "")
    )
    return Activations(saved, forward_peak, backward_peak, per_layer, formula, input_ids + loss, first_hook)
