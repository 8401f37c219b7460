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
    eager but at 4 bytes. On CUDA the fused kernels (flash / memory-efficient) save q, k, v (views
    of the c_attn output: 3 B*S*H*e in one storage) and a fp32 logsumexp (B*a*S)
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
    """Activation bytes of one micro-batch on one rank."""

    saved: int  # everything saved for backward once forward returns (logits excluded)
    logits: int  # the model output, alive from forward until the caller drops it
    forward_peak: int  # largest activation footprint during forward
    backward_peak: int  # largest activation footprint during backward
    per_layer_saved: int  # one block's saved tensors (without checkpointing)
    formula: str  # the per-layer formula in words

    @property
    def after_forward(self) -> int:
        return self.saved + self.logits


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
    if attn_implementation == "eager" or cpu:
        # eager, or CPU sdpa falling back to the math kernel (fp32 inside for half types)
        ae = e if attn_implementation == "eager" else FP32
        if attn_implementation == "sdpa" and not attn_dropout:
            # CPU flash kernel (_scaled_dot_product_flash_attention_for_cpu): q,k,v views + out + lse
            attn = 3 * BSH * e + B * a * S * FP32
            attn_words = "3BSH*e (q,k,v views) + 4*B*a*S (logsumexp)"
        else:
            attn_mask_e = ae if cpu else 1  # CUDA eager dropout: bool mask
            probs = 2 * bass * ae + bass * attn_mask_e if attn_dropout else bass * ae
            attn = 3 * BSH * ae + probs
            attn_words = f"3BSH*{ae} (q,k,v copies) + {'3' if attn_dropout else '1'} B*a*S*S tensors"
    else:
        # CUDA fused sdpa: q, k, v are views of the c_attn output; logsumexp fp32
        attn = 3 * BSH * e + B * a * S * FP32
        attn_words = "3BSH*e (q,k,v views) + 4*B*a*S (logsumexp)"
    per_layer = ln + linear_inputs + resid_dropout + mlp + attn

    ids = 2 * B * S * INT64 + S * INT64 + FP32  # input ids, shifted labels, position ids, nll total_weight
    embd = BSH * mask_e if drop.get("embd_pdrop", 0.1) > 0 else 0
    ln_f = BSH * e + 2 * B * S * stat_e + BSH * e  # ln_f input + stats, output (lm_head input)
    log_softmax = B * S * V * FP32
    logits = B * S * V * e
    upcast = B * S * V * FP32 if e < FP32 else 0  # logits.float() in ForCausalLMLoss, freed on return

    outside = ids + embd + ln_f + log_softmax
    if checkpointing:
        # GradientCheckpointingLayer: each block keeps only its input; backward recomputes one
        # block at a time, so one block's saved tensors come back, plus its gradient temporaries.
        saved = L * BSH * e + outside
        recompute = per_layer + 3 * BSI * e
    else:
        saved = L * per_layer + outside
        recompute = 0
    forward_peak = saved + logits + upcast
    # start of backward: nll_loss and log_softmax gradients (B*S*V*4 each) beside everything saved
    backward_start = saved + logits + 2 * B * S * V * FP32
    backward_peak = max(backward_start, saved + logits + recompute)
    formula = (
        f"per layer {'(recomputed once in backward) ' if checkpointing else ''}"
        f"= LayerNorms 2BSH*e+4BS*{stat_e} + linear inputs 3BSH*e + dropout masks 2BSH*{mask_e} "
        f"+ GELU/MLP 5BSI*e + attention [{attn_words}]"
    )
    return Activations(saved, logits, forward_peak, backward_peak, per_layer, formula)
