"""Activation memory of HF GPT-2 training, derived from the model's code (not fitted).

Source: ``transformers/models/gpt2/modeling_gpt2.py`` (transformers 5.24) and the autograd
formulas of the ops it calls (``torch/csrc/autograd/FunctionsManual.cpp``,
``tools/autograd/derivatives.yaml``). Symbols: B micro-batch, S sequence, H hidden, I inner
(4H), a heads, V vocab, L layers, e bytes per element of the compute dtype.

What one ``GPT2Block`` saves for backward (unique storages):

* 2 x LayerNorm: its input (B*S*H*e each) and mean/rstd (B*S each; compute dtype on CPU, fp32 on CUDA)
* Conv1D ``c_attn``, ``c_fc`` (``torch.addmm``): their inputs, the LayerNorm outputs (2 B*S*H*e)
* Conv1D ``attn.c_proj``: the attention output (B*S*H*e)
* attention core, by implementation (``GPT2Attention.forward``):
  - ``eager`` (``eager_attention_forward``): matmul folds q and k^T and v into bmm copies
    (3 B*S*H*e), softmax saves its output, dropout saves its mask and the matmul with v saves the
    dropped probabilities (3 B*a*S*S tensors)
  - ``sdpa``: on CPU in training (dropout > 0) torch falls back to the math kernel
    (``_scaled_dot_product_attention_math``), which upcasts half types to fp32: the same tensors as
    eager but at 4 bytes (without a KV cache in fp32 at B = 1 or a = 1, at::matmul's (B, a) fold is
    a view: the scaled q, k^T and the whole c_attn output through v, 5 B*S*H*4). On CUDA the
    fused kernels (flash / memory-efficient) save q (a view of the c_attn output: 3 B*S*H*e in
    one storage), k and v (the KV-cache copies), their output (the same storage as
    ``attn.c_proj``'s input) and a fp32 logsumexp (B*a*S)
* 2 x residual dropout: the mask (on CPU ``at::dropout`` multiplies by a noise tensor of the input
  dtype; on CUDA ``native_dropout`` saves a bool mask, 1 byte)
* MLP: ``NewGELUActivation`` (``activations.py``) = 0.5*x*(1+tanh(c*(x+0.044715*x^3))) saves x
  (pow), tanh's output, 0.5*x and (1+tanh) (mul): 4 B*S*I*e; ``mlp.c_proj`` saves the GELU output:
  5 B*S*I*e in all

Outside the blocks: embedding dropout mask, the token and position ids (int64), ``ln_f``'s input,
stats and output, the logits (B*S*V*e, the model output), and in ``ForCausalLMLoss``
(``transformers/loss/loss_utils.py``) ``logits.float()`` (a B*S*V*4 copy when e < 4, freed when the
loss returns) and ``cross_entropy`` = log_softmax (saves its B*S*V*4 output) + nll_loss.

Checked on CPU (torch 2.13, gpt2-tiny, B=2, S=64): the bytes of all tensors the autograd graph
saves (``torch.autograd.graph.saved_tensors_hooks``) equal :func:`gpt2_activations`'s ``saved``
exactly for sdpa/eager x fp32/bf16 (3,120,644 / 2,184,196 / 1,692,676 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

from memprof.estimate.model_shapes import ModelShape

INT64 = 8
FP32 = 4


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch on one rank (the training loop of ``memprof.train``:
    it keeps the loss and its input batch, and drops the model output right after forward)."""

    saved: int  # everything saved for backward once forward returns (logits excluded)
    forward_peak: int  # largest activation footprint during forward
    backward_peak: int  # largest activation footprint during backward
    per_layer_saved: int  # one block's saved tensors (without checkpointing)
    formula: str  # the per-layer formula in words
    loop_held: int = 0  # what the loop holds between steps: its input batch (int64) and the loss
    backward_first_hook: int = 0  # activations alive when the first parameter gradients appear
    # activations alive once the gradient hooks of the final norm and of the last block's MLP
    # output projection have fired (GPT-2 tied: ln_f and mlp.c_proj, 4 hooks), at GELU's last mul
    # of that block; 0 where not modelled. ZeRO-2 with a small reduce bucket allocates
    # grads_in_partition by then on some ranks (zero_layout._stage2_after_mlp_out_hooks)
    after_mlp_out_hooks: int = 0


# GPT-2 (tied): parameter gradient hooks fired by Activations.after_mlp_out_hooks, in backward
# (reverse parameter) order: ln_f bias and weight, then the last block's mlp.c_proj bias and weight
GPT2_MLP_OUT_HOOKS = 4


def attention_keeps_probabilities(attn_implementation: str, device_type: str, attn_dropout: bool) -> bool:
    """Whether the attention saves B*a*S*S tensors: eager always; sdpa on CPU with dropout, which
    falls back to the math kernel. CUDA's fused sdpa kernels save none."""
    return attn_implementation == "eager" or (device_type == "cpu" and attn_dropout)


def gpt2_activations(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    element_size: int,
    attn_implementation: str = "sdpa",
    checkpointing: bool = False,
    device_type: str = "cuda",
) -> Activations:
    """Activation memory of GPT2LMHeadModel training for one micro-batch (see module docstring)."""
    B, S, e = micro_batch, seq_len, element_size
    H, I, a, V, L = shape.hidden, shape.inner, shape.n_head, shape.vocab, shape.n_layer
    assert H and I and a and V and L
    cpu = device_type == "cpu"
    drop = shape.dropout or {}
    mask_e = e if cpu else 1  # CPU dropout keeps a noise tensor of the input dtype; CUDA a bool mask
    stat_e = e if cpu else FP32
    BSH, BSI = B * S * H, B * S * I

    ln = 2 * (BSH * e + 2 * B * S * stat_e)  # ln_1, ln_2: input + mean + rstd
    linear_inputs = 3 * BSH * e  # c_attn, attn.c_proj, mlp.c_fc inputs
    resid_dropout = 2 * BSH * mask_e if drop.get("resid_pdrop", 0.1) > 0 else 0
    mlp = 5 * BSI * e
    bass = B * a * S * S
    attn_dropout = drop.get("attn_pdrop", 0.1) > 0
    # GPT2Model skips the cache under gradient checkpointing in training (cache=None per block)
    cache = shape.use_cache and not checkpointing
    # DynamicLayer.update: lazy_initialization makes an empty tensor, then torch.cat copies k and v
    # into it, so each block's cache holds 2 BSH*e; the attention saves some of them (below)
    kv_cache_copies = 2 * BSH * e if cache else 0
    ae = e  # element size inside the attention core
    if attn_implementation == "eager":
        # eager_attention_forward: matmul(q, k^T) copies q, views the contiguous cache k; matmul
        # with v views the cache v (without a cache, k and v are copied): 3 BSH*e saved either way
        probs = 2 * bass * e + bass * (e if cpu else 1) if attn_dropout else bass * e
        attn = 3 * BSH * e + probs
        cache_not_saved = 0
        attn_words = f"3BSH*e (q copy, k, v) + {'3' if attn_dropout else '1'} B*a*S*S tensors"
    elif cpu and attn_dropout:
        # CPU sdpa with dropout falls back to _scaled_dot_product_attention_math, which upcasts
        # half types to fp32: q, k, v copies at 4 bytes; in fp32 the cache v is saved as it is
        ae = FP32
        probs = 3 * bass * FP32
        attn = 3 * BSH * FP32 + probs
        # Without a cache (checkpointing, use_cache off) q, k, v are views of the c_attn output in
        # its (B, S, a, d) layout. The math kernel's two matmuls fold (B, a) into one batch dim
        # (at::matmul's reshape to B*a): a view when B == 1 or a == 1, else a clone. In half
        # types the operands are the dense fp32 copies (one BSH*4 each either way); in fp32 the
        # scaled q and k^T are kept as they are (BSH*4 each) and v's view keeps the whole c_attn
        # output (3BSH*4): two BSH*4 more than the clones (traced: a=1 B=3, a=8 B=1).
        if not cache and e == FP32 and (B == 1 or a == 1):
            attn += 2 * BSH * FP32
        cache_not_saved = (L and (BSH * e if e == FP32 else 2 * BSH * e)) if cache else 0
        attn_words = "3BSH*4 (q,k,v fp32 copies) + 3 B*a*S*S*4 (softmax, dropout noise, dropout output)"
        if not cache and e == FP32 and (B == 1 or a == 1):
            attn_words = ("5BSH*4 (scaled q, k^T + the c_attn output through v's view) "
                          "+ 3 B*a*S*S*4 (softmax, dropout noise, dropout output)")
    else:
        # fused kernels (CUDA flash / memory-efficient; CPU flash without dropout): they save q
        # (a view that keeps the whole c_attn output, 3 BSH*e), k and v (the cache copies when
        # there is a cache, else views of the same c_attn output), the output and a fp32 logsumexp
        # On CUDA the output is no extra storage: _scaled_dot_product_{flash,efficient}_attention_cuda
        # (aten/src/ATen/native/transformers/cuda/attention.cu) allocate it as (B, S, a, d) and return
        # its transpose, so sdpa_attention_forward's transpose(1, 2).contiguous() and the reshape
        # are views: the saved output IS attn.c_proj's input, already in linear_inputs. (The CPU
        # flash path without dropout is left as it was: not measured here.)
        output = 0 if not cpu else BSH * e
        attn = 3 * BSH * e + kv_cache_copies + output + B * a * S * FP32
        cache_not_saved = 0
        attn_words = ("3BSH*e (c_attn output via q) + 2BSH*e (cached k, v) + 4*B*a*S (logsumexp); the output is "
                      "attn.c_proj's input" if not cpu else
                      "3BSH*e (c_attn output via q) + 2BSH*e (cached k, v) + BSH*e (output) + 4*B*a*S (logsumexp)")
    per_layer = ln + linear_inputs + resid_dropout + mlp + attn

    input_ids = B * S * INT64  # the batch the loop made; input_ids and labels are the same tensor
    shift_labels = B * S * INT64  # labels[..., 1:].contiguous(), saved by nll_loss
    padded_labels = B * (S + 1) * INT64  # nn.functional.pad(labels, (0, 1)), alive until the loss returns
    positions = S * INT64  # position ids, saved by the wpe embedding
    loss = FP32
    ids = input_ids + shift_labels + positions + FP32  # + nll's total_weight (saved)
    embd = BSH * mask_e if drop.get("embd_pdrop", 0.1) > 0 else 0
    ln_f = BSH * e + 2 * B * S * stat_e + BSH * e  # ln_f input + stats, output (lm_head input)
    log_softmax = B * S * V * FP32
    logits = B * S * V * e
    upcast = B * S * V * FP32 if e < FP32 else 0  # logits.float() in ForCausalLMLoss, freed on return

    outside = ids + embd + ln_f + log_softmax
    # the loss's end: every saved tensor, the logits (and their fp32 copy), the cache copies no
    # kernel saved, the padded labels and the loss itself
    loss_end = logits + upcast + L * cache_not_saved + padded_labels + loss
    # backward starts with nll_loss_backward and _log_softmax_backward_data outputs (B*S*V*4 each);
    # the loop dropped the output, so the logits are gone; nll_loss_backward has released
    # shift_labels; the loss and its gradient seed (4 bytes each) are alive
    bwd_start_extra = 2 * B * S * V * FP32 - shift_labels + 2 * FP32
    resid_mask = BSH * mask_e if drop.get("resid_pdrop", 0.1) > 0 else 0
    if checkpointing:
        # GradientCheckpointingLayer (non-reentrant torch.utils.checkpoint): each block keeps only
        # its input. Forward peaks at the loss, inside the last block at its attention
        # (embeddings: wte, wpe outputs, the dropout noise, the L block inputs;
        # ln_1 output, c_attn output (3BSH), the scaled q, the causal mask (S*S in the attention
        # dtype) and the attention probabilities: softmax, dropout noise, dropout output), or inside
        # the last block's MLP (no_grad there, so only live locals count: ids and positions, the
        # wte and wpe outputs, the embedding dropout noise, every block's input, the block's
        # attn_output, post-attention sum and ln_2 output, and GELU's chain at its widest: c_fc
        # output, 0.5*x, x**3 and 0.044715*x**3, 4 BSI*e; traced with a dispatch-mode tracker).
        saved = L * BSH * e + outside
        # GPT2Model.forward keeps its locals inputs_embeds (wte output, BSH*e) and position_embeds
        # (wpe output, S*H*e) for the whole loop; the sum is rebound by self.drop (freed), whose
        # noise (CPU) stays with the autograd graph; the loop's checkpoints hold every block input
        # (the first is the dropout output). Both in-block moments are the LAST block's, where all
        # L block inputs are alive (traced: L = 1, 2, 3, 4).
        embed = input_ids + positions + BSH * e + S * H * e + embd + L * BSH * e
        upcast_qkv = 3 * BSH * FP32 if ae > e else 0  # the math kernel's fp32 copies of half q, k, v
        # at the attention's dropout output: ln_1 output, c_attn output (3BSH*e), the fp32 copies
        # (half types), the scaled q, the causal mask (S*S) and the probabilities tensors
        last_attn = BSH * e + 3 * BSH * e + upcast_qkv + BSH * ae + S * S * ae + (3 if attn_dropout else 1) * bass * ae
        last_mlp = 3 * BSH * e + 4 * BSI * e
        forward_peak = max(saved + loss_end, embed + last_attn, embed + last_mlp)
        # backward recomputes the last block: its saved tensors come back, except ln_1's input,
        # which is the checkpointed block input itself (already in L*BSH*e)
        recomputed = per_layer - BSH * e
    else:
        saved = L * per_layer + outside
        forward_peak = saved + loss_end
        recomputed = 0
    loop_held = input_ids + loss
    untied_recompute = 0
    gelu_mul = 0
    if not shape.tied_embeddings:
        # (not traced) the first hook is lm_head.weight's: counted as every saved tensor less the
        # loss's labels; under checkpointing the recomputed block's MLP backward as the tied model
        # had it before tracing (incoming gradient + 3 BSI*e of GELU-chain gradients: approximate)
        first_hook = saved - shift_labels + 2 * FP32
        if checkpointing:
            untied_recompute = L * BSH * e + per_layer + 3 * BSI * e + BSH * e
    else:
        # The first gradient hook is ln_f.weight's (traced with post-accumulate-grad hooks): by then
        # nll/log_softmax (B*S*V*4 saved), the lm_head input (ln_f output) and ln_f's saved input
        # and stats are released, while the tied wte's lm_head gradient (V*H*e) waits in its
        # AccumulateGrad buffer for the embedding's share and ln_f's input gradient (BSH*e) is
        # alive; the loss and its gradient seed are 4 bytes each.
        at_first_hook = saved - shift_labels - log_softmax - ln_f + BSH * e + V * H * e + 2 * FP32
        # After it, the last block's backward (its saved tensors recomputed first under
        # checkpointing) can hold more: the residual dropout's backward output (BSH*e) replaces
        # its mask; mlp.c_proj's backward makes grad_x (BSI*e), grad_W (I*H*e) and grad_b (H*e)
        # beside its incoming gradient; once it returns, that gradient and its saved GELU output
        # (BSI*e) are freed (weight and bias gradients go on to the reduce bucket or .grad), and
        # GELU's last mul (out = 0.5x * (1 + tanh)) makes two BSI*e gradients. The peak counts.
        c_proj = at_first_hook + recomputed + BSI * e + I * H * e + H * e + (BSH * e - resid_mask if resid_mask else 0)
        gelu_mul = at_first_hook + recomputed + 2 * BSI * e - resid_mask
        # Where attention keeps B*a*S*S tensors (eager; CPU sdpa's math fallback), the last block's
        # attention-core backward can hold more at long sequences (traced at the BmmBackward of
        # probs @ v): its MLP half is released by then (5 BSI*e of GELU/c_proj inputs, ln_2's input,
        # output and stats, both residual-dropout masks, attn.c_proj's input), and so is ln_f's
        # input gradient (BSH*e): the backward of the block's residual add (hidden_states =
        # residual + feed_forward_hidden_states, GPT2Block.forward) summed it with ln_2's input
        # gradient into the residual stream's gradient (BSH*e), the one alive now. Beside it: the
        # attention output's gradient in the attention dtype (attn.c_proj's grad_x; in half types
        # sdpa-math's output cast back to e makes its ToCopyBackward copy it to fp32 and release
        # the e one), grad_v (BSH) and grad_probs (B*a*S*S) in the attention dtype. CUDA's fused
        # kernels keep no S*S tensor: not applied there.
        attn_bwd = 0
        if attention_keeps_probabilities(attn_implementation, device_type, attn_dropout):
            mlp_half = 5 * BSI * e + 2 * BSH * e + 2 * B * S * stat_e + 2 * resid_mask + BSH * e
            attn_grads = BSH * e + 2 * BSH * ae + bass * ae
            attn_bwd = at_first_hook - BSH * e + recomputed - mlp_half + attn_grads
        first_hook = max(at_first_hook, c_proj, gelu_mul, attn_bwd)
    backward_peak = max(saved + bwd_start_extra, first_hook, untied_recompute)
    formula = (
        f"per layer {'(recomputed once in backward) ' if checkpointing else ''}"
        f"= LayerNorms 2BSH*e+4BS*{stat_e} + linear inputs 3BSH*e + dropout masks 2BSH*{mask_e} "
        f"+ GELU/MLP 5BSI*e + attention [{attn_words}]"
        + ("; KV cache (use_cache) copies k, v per block" if cache else "")
    )
    return Activations(saved, forward_peak, backward_peak, per_layer, formula, loop_held, first_hook,
                       after_mlp_out_hooks=gelu_mul)

