"""GPT-2 (``model_type`` gpt2, HF ``GPT2LMHeadModel``): its parameter shapes, ZeRO-3 fetch order,
launcher checks and activation memory, derived from the model's code (not fitted).

Parameters, in closed form from ``transformers/models/gpt2/modeling_gpt2.py`` (GPT2LMHeadModel:
wte, wpe, per block ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj; ln_f; lm_head
tied to wte unless ``tie_word_embeddings`` is false), in ``model.parameters()`` order, which is
the order DeepSpeed flattens them in, so the ZeRO partition boundaries fall where DeepSpeed's do.

Activations: from ``modeling_gpt2.py`` (transformers 5.24) and the autograd formulas of the ops it
calls (``torch/csrc/autograd/FunctionsManual.cpp``, ``tools/autograd/derivatives.yaml``). Symbols:
B micro-batch, S sequence, H hidden, I inner (4H), a heads, V vocab, L layers, e bytes per element
of the compute dtype.

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

from dataclasses import dataclass, replace
from typing import Any

from memprof.errors import MemprofError
from memprof.families.common import (
    FP32,
    INT64,
    ActivationQuery,
    Activations,
    LoraQuery,
    ModelFamily,
    ParamModule,
    attention_keeps_probabilities,
    later_grad_elements,
    lora_checkpoint_held,
    rng_stash,
    with_rng_stash,
)
from memprof.units import is_positive_int

# GPT-2 (tied): parameter gradient hooks fired by Activations.after_mlp_out_hooks, in backward
# (reverse parameter) order: ln_f bias and weight, then the last block's mlp.c_proj bias and weight
GPT2_MLP_OUT_HOOKS = 4

# GPT2Config's defaults for the fields the launcher and the estimator read when a config omits them
_DEFAULT_VOCAB = 50257
_DEFAULT_POSITIONS = 1024
_DEFAULT_PDROP = 0.1  # embd_pdrop, attn_pdrop, resid_pdrop


# ---- parameters -------------------------------------------------------------------------------


def gpt2_param_numels(cfg: dict[str, Any]) -> tuple[int, ...]:
    """GPT2LMHeadModel's parameter numels in ``parameters()`` order (tied lm_head counted once)."""
    n_layer, h, vocab, n_pos = _req(cfg, "n_layer"), _req(cfg, "n_embd"), _req(cfg, "vocab_size"), _req(cfg, "n_positions")
    inner = int(cfg.get("n_inner") or 4 * h)
    numels = [vocab * h, n_pos * h]  # transformer.wte, transformer.wpe
    block = [
        h, h,  # ln_1 weight, bias
        h * 3 * h, 3 * h,  # attn.c_attn (Conv1D weight is (in, out)), bias
        h * h, h,  # attn.c_proj
        h, h,  # ln_2
        h * inner, inner,  # mlp.c_fc
        inner * h, h,  # mlp.c_proj
    ]
    if cfg.get("add_cross_attention"):
        block += [h * 2 * h, 2 * h, h * h, h, h * h, h, h, h]  # crossattention c_attn/q_attn/c_proj, ln_cross_attn
    numels += block * n_layer
    numels += [h, h]  # ln_f
    if cfg.get("tie_word_embeddings", True) is False:
        numels.append(vocab * h)  # lm_head.weight, its own tensor when untied (no bias)
    return tuple(numels)


def gpt2_fetch_modules(cfg: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """GPT2LMHeadModel's modules in forward call order, as the ZeRO-3 coordinator's forward hooks
    see them (modeling_gpt2.py: the model, transformer, wte, wpe, drop (GPT2Model.forward), per
    block the block, ln_1, attn (c_attn, c_proj, resid_dropout), [ln_cross_attn, crossattention
    q_attn, c_attn, c_proj], ln_2, mlp (c_fc, act, c_proj, dropout), then ln_f and lm_head), each
    as the indices into :func:`gpt2_param_numels` of its own parameters, empty for modules with
    none. A tied lm_head uses wte's weight (index 0)."""
    n_layer = _req(cfg, "n_layer")
    cross = bool(cfg.get("add_cross_attention"))
    per_block = 20 if cross else 12
    # GPT2LMHeadModel, transformer, wte, wpe, drop; modules without parameters are empty (their
    # fetch still prefetches: model_shapes.ModelShape.module_order)
    modules: list[tuple[int, ...]] = [(), (), (0,), (1,), ()]
    for layer in range(n_layer):
        b = 2 + layer * per_block
        # the block, ln_1, attn, attn.c_attn, attn.c_proj, attn.resid_dropout
        modules += [(), (b, b + 1), (), (b + 2, b + 3), (b + 4, b + 5), ()]
        if cross:  # appended after the MLP in gpt2_param_numels' block layout
            modules += [(b + 18, b + 19), (), (b + 14, b + 15), (b + 12, b + 13), (b + 16, b + 17), ()]
        # ln_2, mlp, mlp.c_fc, mlp.act, mlp.c_proj, mlp.dropout
        modules += [(b + 6, b + 7), (), (b + 8, b + 9), (), (b + 10, b + 11), ()]
    ln_f = 2 + n_layer * per_block
    modules.append((ln_f, ln_f + 1))
    modules.append((0,) if cfg.get("tie_word_embeddings", True) is not False else (ln_f + 2,))
    return tuple(modules)


def gpt2_param_modules(cfg: dict[str, Any]) -> tuple[ParamModule, ...]:
    """GPT2LMHeadModel's parameter-holding modules in ``parameters()`` order, named as
    ``named_modules()`` names them, with the Conv1D layers' (in, out) features (Conv1D's weight is
    (in, out): ``nf`` out); indices as in :func:`gpt2_param_numels`. ``lm_head`` (nn.Linear, the
    output embedding) is listed last, holding wte's weight when tied. Cross-attention blocks are
    not listed (LoRA on them is refused)."""
    if cfg.get("add_cross_attention"):
        raise MemprofError("LoRA on GPT-2 with add_cross_attention is not modelled")
    n_layer, h, vocab = _req(cfg, "n_layer"), _req(cfg, "n_embd"), _req(cfg, "vocab_size")
    inner = int(cfg.get("n_inner") or 4 * h)
    wb = (("weight", 0), ("bias", 1))

    def at(base: int, pairs: tuple[tuple[str, int], ...] = wb) -> tuple[tuple[str, int], ...]:
        return tuple((name, base + i) for name, i in pairs)

    out = [ParamModule("transformer.wte", (("weight", 0),)), ParamModule("transformer.wpe", (("weight", 1),))]
    for layer in range(n_layer):
        b, name = 2 + 12 * layer, f"transformer.h.{layer}"
        out += [
            ParamModule(f"{name}.ln_1", at(b)),
            ParamModule(f"{name}.attn.c_attn", at(b + 2), (h, 3 * h), weight_in_first=True),
            ParamModule(f"{name}.attn.c_proj", at(b + 4), (h, h), weight_in_first=True),
            ParamModule(f"{name}.ln_2", at(b + 6)),
            ParamModule(f"{name}.mlp.c_fc", at(b + 8), (h, inner), weight_in_first=True),
            ParamModule(f"{name}.mlp.c_proj", at(b + 10), (inner, h), weight_in_first=True),
        ]
    ln_f = 2 + 12 * n_layer
    out.append(ParamModule("transformer.ln_f", at(ln_f)))
    tied = cfg.get("tie_word_embeddings", True) is not False
    out.append(ParamModule("lm_head", (("weight", 0 if tied else ln_f + 2),), (h, vocab), output_embedding=True))
    return tuple(out)


def gpt2_shape_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelShape's fields for a GPT-2 config; MemprofError on a bad shape."""
    h = _req(cfg, "n_embd")
    n_head = _req(cfg, "n_head")
    if h % n_head:
        raise MemprofError(f"model config: n_embd {h} is not divisible by n_head {n_head}")
    return {
        "param_numels": gpt2_param_numels(cfg),
        "model_type": "gpt2",
        "n_layer": _req(cfg, "n_layer"),
        "hidden": h,
        "n_head": n_head,
        "inner": int(cfg.get("n_inner") or 4 * h),
        "vocab": _req(cfg, "vocab_size"),
        "n_positions": _req(cfg, "n_positions"),
        "tied_embeddings": cfg.get("tie_word_embeddings", True) is not False,
        "dropout": {k: float(cfg.get(k, _DEFAULT_PDROP)) for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop")},
        "use_cache": cfg.get("use_cache", True) is not False,  # GPT2Config's default is True
        "fetch_modules": gpt2_fetch_modules(cfg),
    }


def _req(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if not is_positive_int(value):
        raise MemprofError(f"model config: {key} = {value!r} must be a positive whole number")
    return value


def check_launchable(config: dict[str, Any], where: str) -> None:
    """The launcher's check of a GPT-2 config: positive layers, width, heads and positions (the
    last defaults to GPT2Config's 1024), heads dividing the width."""
    for key in ("n_layer", "n_embd", "n_head", "n_positions"):
        value = config.get(key, _DEFAULT_POSITIONS) if key == "n_positions" else config.get(key)
        if not is_positive_int(value):
            raise MemprofError(f"{where} needs a positive integer {key!r} (got {value!r})")
    if config["n_embd"] % config["n_head"]:
        raise MemprofError(f"{where}: n_embd {config['n_embd']} is not divisible by n_head {config['n_head']}")


# ---- activations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sizes:
    """The module docstring's symbols for one query, and the per-tensor sizes the formulas share."""

    B: int
    S: int
    e: int
    H: int
    I: int  # the MLP width
    a: int
    V: int
    L: int
    mask_e: int  # CPU dropout keeps a noise tensor of the input dtype; CUDA a bool mask
    stat_e: int  # LayerNorm mean/rstd: compute dtype on CPU, fp32 on CUDA
    attn_dropout: bool
    resid_mask: int  # one residual dropout's mask (0 without residual dropout)
    embd_mask: int  # the embedding dropout's mask
    # GPT2Model skips the cache under gradient checkpointing in training (cache=None per block)
    cache: bool
    fused: Any = None  # TRL's fused LM head's bytes (ActivationQuery.fused_head), else the HF loss

    @property
    def BSH(self) -> int:
        return self.B * self.S * self.H

    @property
    def BSI(self) -> int:
        return self.B * self.S * self.I

    @property
    def bass(self) -> int:
        return self.B * self.a * self.S * self.S


def _sizes(shape: Any, q: ActivationQuery) -> _Sizes:
    H, I, a, V, L = shape.hidden, shape.inner, shape.n_head, shape.vocab, shape.n_layer
    assert H and I and a and V and L
    e = q.element_size
    mask_e = e if q.cpu else 1
    drop = shape.dropout or {}
    BSH = q.micro_batch * q.seq_len * H
    return _Sizes(
        q.micro_batch, q.seq_len, e, H, I, a, V, L, mask_e, stat_e=e if q.cpu else FP32,
        attn_dropout=drop.get("attn_pdrop", _DEFAULT_PDROP) > 0,
        resid_mask=BSH * mask_e if drop.get("resid_pdrop", _DEFAULT_PDROP) > 0 else 0,
        embd_mask=BSH * mask_e if drop.get("embd_pdrop", _DEFAULT_PDROP) > 0 else 0,
        cache=shape.use_cache and not q.checkpointing,
        fused=q.fused_head,
    )


@dataclass(frozen=True)
class _Attention:
    saved: int  # what the attention core saves for backward, per block
    element_size: int  # bytes per element inside the attention core (ae)
    cache_not_saved: int  # KV-cache copies no kernel saved, alive until the loss returns, per block
    words: str


def _attention(s: _Sizes, q: ActivationQuery) -> _Attention:
    """The attention core's saved tensors, by implementation (module docstring)."""
    B, e, a, BSH, bass = s.B, s.e, s.a, s.BSH, s.bass
    if q.attn_implementation == "eager":
        # eager_attention_forward: matmul(q, k^T) copies q, views the contiguous cache k; matmul
        # with v views the cache v (without a cache, k and v are copied): 3 BSH*e saved either way
        probs = 2 * bass * e + bass * (e if q.cpu else 1) if s.attn_dropout else bass * e
        words = f"3BSH*e (q copy, k, v) + {'3' if s.attn_dropout else '1'} B*a*S*S tensors"
        return _Attention(3 * BSH * e + probs, e, 0, words)
    if q.cpu and s.attn_dropout:
        # CPU sdpa with dropout falls back to _scaled_dot_product_attention_math, which upcasts
        # half types to fp32: q, k, v copies at 4 bytes; in fp32 the cache v is saved as it is
        saved = 3 * BSH * FP32 + 3 * bass * FP32
        words = "3BSH*4 (q,k,v fp32 copies) + 3 B*a*S*S*4 (softmax, dropout noise, dropout output)"
        # Without a cache (checkpointing, use_cache off) q, k, v are views of the c_attn output in
        # its (B, S, a, d) layout. The math kernel's two matmuls fold (B, a) into one batch dim
        # (at::matmul's reshape to B*a): a view when B == 1 or a == 1, else a clone. In half
        # types the operands are the dense fp32 copies (one BSH*4 each either way); in fp32 the
        # scaled q and k^T are kept as they are (BSH*4 each) and v's view keeps the whole c_attn
        # output (3BSH*4): two BSH*4 more than the clones (traced: a=1 B=3, a=8 B=1).
        if not s.cache and e == FP32 and (B == 1 or a == 1):
            saved += 2 * BSH * FP32
            words = ("5BSH*4 (scaled q, k^T + the c_attn output through v's view) "
                     "+ 3 B*a*S*S*4 (softmax, dropout noise, dropout output)")
        cache_not_saved = (BSH * e if e == FP32 else 2 * BSH * e) if s.cache else 0
        return _Attention(saved, FP32, cache_not_saved, words)
    # fused kernels (CUDA flash / memory-efficient; CPU flash without dropout): they save q (a view
    # that keeps the whole c_attn output, 3 BSH*e), k and v (the cache copies when there is a
    # cache, else views of the same c_attn output), the output and a fp32 logsumexp.
    # On CUDA the output is no extra storage: _scaled_dot_product_{flash,efficient}_attention_cuda
    # (aten/src/ATen/native/transformers/cuda/attention.cu) allocate it as (B, S, a, d) and return
    # its transpose, so sdpa_attention_forward's transpose(1, 2).contiguous() and the reshape
    # are views: the saved output IS attn.c_proj's input, already in the block's linear inputs.
    # (The CPU flash path without dropout is left as it was: not measured here.)
    # DynamicLayer.update: lazy_initialization makes an empty tensor, then torch.cat copies k and v
    # into it, so each block's cache holds 2 BSH*e
    kv_cache_copies = 2 * BSH * e if s.cache else 0
    output = 0 if not q.cpu else BSH * e
    words = ("3BSH*e (c_attn output via q) + 2BSH*e (cached k, v) + 4*B*a*S (logsumexp); the output is "
             "attn.c_proj's input" if not q.cpu else
             "3BSH*e (c_attn output via q) + 2BSH*e (cached k, v) + BSH*e (output) + 4*B*a*S (logsumexp)")
    return _Attention(3 * BSH * e + kv_cache_copies + output + B * a * s.S * FP32, e, 0, words)


def _per_layer(s: _Sizes, attn: _Attention) -> int:
    """One block's saved tensors without checkpointing (module docstring)."""
    ln = 2 * (s.BSH * s.e + 2 * s.B * s.S * s.stat_e)  # ln_1, ln_2: input + mean + rstd
    linear_inputs = 3 * s.BSH * s.e  # c_attn, attn.c_proj, mlp.c_fc inputs
    mlp = 5 * s.BSI * s.e
    return ln + linear_inputs + 2 * s.resid_mask + mlp + attn.saved


@dataclass(frozen=True)
class _Outside:
    """What lives outside the blocks: the loop's batch, the embeddings, ln_f and the loss."""

    input_ids: int  # the batch the loop made; input_ids and labels are the same tensor
    shift_labels: int  # labels[..., 1:].contiguous(), saved by nll_loss
    positions: int  # position ids, saved by the wpe embedding
    ln_f: int  # ln_f input + stats, output (lm_head input)
    log_softmax: int
    saved: int  # every saved tensor outside the blocks
    loss_end: int  # what the loss's end adds to the saved tensors (cache copies included)


def _outside(s: _Sizes, attn: _Attention) -> _Outside:
    B, S, e, BSH, V = s.B, s.S, s.e, s.BSH, s.V
    input_ids = B * S * INT64
    shift_labels = B * S * INT64
    padded_labels = B * (S + 1) * INT64  # nn.functional.pad(labels, (0, 1)), alive until the loss returns
    positions = S * INT64
    ids = input_ids + shift_labels + positions + FP32  # + nll's total_weight (saved)
    ln_f = BSH * e + 2 * B * S * s.stat_e + BSH * e
    log_softmax = B * S * V * FP32
    logits = B * S * V * e
    upcast = B * S * V * FP32 if e < FP32 else 0  # logits.float() in ForCausalLMLoss, freed on return
    if s.fused is not None:  # TRL's add_fused_lm_head: the shifted hidden copy, its chunk buffer and tiles
        log_softmax, logits, upcast = s.fused.saved, s.fused.forward_transient, 0
    # the loss's end: every saved tensor, the logits (and their fp32 copy), the cache copies no
    # kernel saved, the padded labels and the loss itself
    loss_end = logits + upcast + s.L * attn.cache_not_saved + padded_labels + FP32
    return _Outside(input_ids, shift_labels, positions, ln_f, log_softmax,
                    ids + s.embd_mask + ln_f + log_softmax, loss_end)


def _loss_backward(s: _Sizes) -> int:
    """The loss backward's start: nll's and log_softmax's gradients (B*S*V*4 each), or TRL's fused
    head's backward (trainer_terms.trl_fused_head_bytes)."""
    return s.fused.backward_transient if s.fused is not None else 2 * s.B * s.S * s.V * FP32


def _forward(s: _Sizes, q: ActivationQuery, per_layer: int, attn: _Attention, out: _Outside) -> tuple[int, int, int]:
    """(saved once forward returns, forward's peak, what backward recomputes of the last block)."""
    e, BSH, L = s.e, s.BSH, s.L
    if not q.checkpointing:
        saved = L * per_layer + out.saved
        return saved, saved + out.loss_end, 0
    # GradientCheckpointingLayer (non-reentrant torch.utils.checkpoint): each block keeps only
    # its input. Forward peaks at the loss, inside the last block at its attention
    # (embeddings: wte, wpe outputs, the dropout noise, the L block inputs;
    # ln_1 output, c_attn output (3BSH), the scaled q, the causal mask (S*S in the attention
    # dtype) and the attention probabilities: softmax, dropout noise, dropout output), or inside
    # the last block's MLP (no_grad there, so only live locals count: ids and positions, the
    # wte and wpe outputs, the embedding dropout noise, every block's input, the block's
    # attn_output, post-attention sum and ln_2 output, and GELU's chain at its widest: c_fc
    # output, 0.5*x, x**3 and 0.044715*x**3, 4 BSI*e; traced with a dispatch-mode tracker).
    saved = L * BSH * e + out.saved
    # GPT2Model.forward keeps its locals inputs_embeds (wte output, BSH*e) and position_embeds
    # (wpe output, S*H*e) for the whole loop; the sum is rebound by self.drop (freed), whose
    # noise (CPU) stays with the autograd graph; the loop's checkpoints hold every block input
    # (the first is the dropout output). Both in-block moments are the LAST block's, where all
    # L block inputs are alive (traced: L = 1, 2, 3, 4).
    embed, last_attn, last_mlp = _in_block(s, attn, out)
    forward_peak = max(saved + out.loss_end, embed + last_attn, embed + last_mlp)
    # backward recomputes the last block: its saved tensors come back, except ln_1's input,
    # which is the checkpointed block input itself (already in L*BSH*e)
    return saved, forward_peak, per_layer - BSH * e


def _in_block(s: _Sizes, attn: _Attention, out: _Outside) -> tuple[int, int, int]:
    """Checkpointing: (what lives outside the last block during its forward, the block's own
    bytes at its attention's widest, at its MLP's widest) (_forward)."""
    e, BSH, BSI, ae = s.e, s.BSH, s.BSI, attn.element_size
    embed = out.input_ids + out.positions + BSH * e + s.S * s.H * e + s.embd_mask + s.L * BSH * e
    upcast_qkv = 3 * BSH * FP32 if ae > e else 0  # the math kernel's fp32 copies of half q, k, v
    # at the attention's dropout output: ln_1 output, c_attn output (3BSH*e), the fp32 copies
    # (half types), the scaled q, the causal mask (S*S) and the probabilities tensors
    last_attn = (BSH * e + 3 * BSH * e + upcast_qkv + BSH * ae + s.S * s.S * ae
                 + (3 if s.attn_dropout else 1) * s.bass * ae)
    last_mlp = 3 * BSH * e + 4 * BSI * e
    return embed, last_attn, last_mlp


def _block_fetch_positions(shape: Any) -> tuple[tuple[int, int], ...]:
    """Per block, the positions in gpt2_fetch_modules' order of its attn.c_attn (the attention core
    runs after c_attn's fetch and release, before attn.c_proj's fetch) and of its mlp.act (GELU is
    that module's own forward: NewGELUActivation, ACT2FN, modeling_gpt2.py GPT2MLP.forward); () where
    the shape's fetch order is not that layout (LoRA adapters, quantization, a bare count)."""
    fetch, L = shape.fetch_modules, shape.n_layer or 0
    if fetch is None:
        return ()
    cross = len(fetch) == 7 + 18 * L
    per_params, per_modules = (20, 18) if cross else (12, 12)
    if len(fetch) != 7 + per_modules * L:
        return ()
    out = []
    for layer in range(L):
        b, m = 2 + layer * per_params, 5 + layer * per_modules
        c_attn, act = m + 3, m + per_modules - 3
        if fetch[c_attn] != (b + 2, b + 3) or fetch[act - 1] != (b + 8, b + 9) or fetch[act] != ():
            return ()
        out.append((c_attn, act))
    return tuple(out)


def _forward_in_blocks(shape: Any, s: _Sizes, q: ActivationQuery, attn: _Attention, out: _Outside) -> tuple[tuple[int, int], ...]:
    """Activations.forward_in_blocks under checkpointing: block i's attention and GELU moments are the
    last block's (_in_block) less the L-1-i block inputs not made yet (each checkpointed block keeps
    its input: torch/utils/checkpoint.py non-reentrant; traced on block 1 of 3 of a 3-rank ZeRO-3
    GPT-2 w96 run: 1,012,032 bytes, exact, with a dispatch-mode tracker), plus the CPU RNG state
    each checkpointed block so far stashed (common.rng_stash: i+1 of them; the allocation-hook
    tracker sees them, the dispatch mode does not)."""
    if not q.checkpointing:
        return ()
    positions = _block_fetch_positions(shape)
    if not positions:
        return ()
    embed, last_attn, last_mlp = _in_block(s, attn, out)
    moments = []
    for i, (c_attn, act) in enumerate(positions):
        base = embed - (s.L - 1 - i) * s.BSH * s.e + (i + 1) * rng_stash(q)
        moments += [(c_attn, base + last_attn), (act, base + last_mlp)]
    return tuple(moments)


def _untied_first_hook(s: _Sizes, q: ActivationQuery, per_layer: int, saved: int, out: _Outside) -> tuple[int, int]:
    """(first gradient hook, the recomputed block's MLP backward under checkpointing) of an untied
    lm_head (not traced): the first hook is lm_head.weight's, counted as every saved tensor less
    the loss's labels; under checkpointing the recomputed block's MLP backward as the tied model
    had it before tracing (incoming gradient + 3 BSI*e of GELU-chain gradients: approximate)."""
    first_hook = saved - out.shift_labels + 2 * FP32
    recompute = s.L * s.BSH * s.e + per_layer + 3 * s.BSI * s.e + s.BSH * s.e if q.checkpointing else 0
    return first_hook, recompute


def _tied_first_hook(s: _Sizes, q: ActivationQuery, attn: _Attention, saved: int, recomputed: int,
                     out: _Outside) -> tuple[int, int, int, int, tuple[tuple[int, int], ...]]:
    """(the largest moment from the first gradient hook through the last block's backward,
    ``Activations.after_mlp_out_hooks``, ``mlp_out_weight_hook``, ``mlp_in_bias_hook``) of the
    tied model (traced)."""
    e, H, I, BSH, BSI, ae, resid_mask = s.e, s.H, s.I, s.BSH, s.BSI, attn.element_size, s.resid_mask
    # The first gradient hook is ln_f.weight's (traced with post-accumulate-grad hooks): by then
    # nll/log_softmax (B*S*V*4 saved), the lm_head input (ln_f output) and ln_f's saved input
    # and stats are released, while the tied wte's lm_head gradient (V*H*e) waits in its
    # AccumulateGrad buffer for the embedding's share and ln_f's input gradient (BSH*e) is
    # alive; the loss and its gradient seed are 4 bytes each.
    at_first_hook = saved - out.shift_labels - out.log_softmax - out.ln_f + BSH * e + s.V * H * e + 2 * FP32
    # After it, the last block's backward (its saved tensors recomputed first under
    # checkpointing) can hold more: the residual dropout's backward output (BSH*e) replaces
    # its mask; mlp.c_proj's backward makes grad_x (BSI*e), grad_W (I*H*e) and grad_b (H*e)
    # beside its incoming gradient; once it returns, that gradient and its saved GELU output
    # (BSI*e) are freed (weight and bias gradients go on to the reduce bucket or .grad), and
    # GELU's last mul (out = 0.5x * (1 + tanh)) makes two BSI*e gradients. The peak counts.
    c_proj = at_first_hook + recomputed + BSI * e + I * H * e + H * e + (BSH * e - resid_mask if resid_mask else 0)
    gelu_mul = at_first_hook + recomputed + 2 * BSI * e - resid_mask
    # Two later hooks of the same block (traced with ZeRO-2 + offload's clone and norm copy on top,
    # gpt2-tiny, 1 CPU rank, seq 16 and 64: within 0.1% once torch.utils.checkpoint's CPU RNG state
    # per checkpointed block, not modelled, is set aside). mlp.c_proj.weight's hook (its bias's
    # fired first): c_proj's backward has returned, releasing its incoming gradient (the residual
    # dropout's backward output, which had replaced the mask) and its saved GELU output (BSI*e);
    # grad_x (BSI*e) waits for GELU, grad_W (I*H*e) is the weight's .grad, grad_b went to the bucket.
    c_proj_weight_hook = at_first_hook + recomputed + I * H * e - resid_mask
    # mlp.c_fc.bias's hook: GELU's backward and c_fc's have returned, releasing the block's five
    # saved BSI*e MLP tensors (c_fc output, 0.5x, tanh output, 1 + tanh, GELU output), GELU's
    # gradients and the residual dropout's mask; c_fc's grad_x (BSH*e) replaces its saved input
    # (ln_2's output); its grad_W (H*I*e) waits for the weight's hook, grad_b (I*e) is the bias's .grad.
    c_fc_bias_hook = at_first_hook + recomputed - 5 * BSI * e - resid_mask + H * I * e + I * e
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
    if attention_keeps_probabilities(q.attn_implementation, q.device_type, s.attn_dropout):
        mlp_half = 5 * BSI * e + 2 * BSH * e + 2 * s.B * s.S * s.stat_e + 2 * resid_mask + BSH * e
        attn_grads = BSH * e + 2 * BSH * ae + s.bass * ae
        attn_bwd = at_first_hook - BSH * e + recomputed - mlp_half + attn_grads
    # Activations.block_moments: own .grads by then (GPT2Block runs the MLP half's backward first):
    # none at c_proj (its grad_W is being formed), mlp.c_proj's at GELU's mul, and at the attention
    # backward mlp.c_proj's, mlp.c_fc's, ln_2's and attn.c_proj's
    block = [(c_proj, 0), (gelu_mul, I * H + H)]
    if attn_bwd:
        block.append((attn_bwd, 2 * I * H + I + 3 * H + H * H + H))
    return max(at_first_hook, c_proj, gelu_mul, attn_bwd), gelu_mul, c_proj_weight_hook, c_fc_bias_hook, tuple(block)


_ATTENTION_BACKWARD_NOTE = (
    "backward peak: the last block's attention backward (B*a*S*S tensors) is modelled at its "
    "grad-of-probabilities moment only; later moments of it are not (traced on a 64-wide GPT-2: "
    "within 0.4% at seq 1024, -0.7% at 512, -2.2% at 256 with checkpointing; docs/estimator.md)"
)


# ---- LoRA on a frozen model ------------------------------------------------------------------
#
# PEFT 0.21.2 wraps a Conv1D as it wraps an nn.Linear (``lora.Linear`` with fan_in_fan_out):
# ``result = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``. With frozen weights
# (``derivatives.yaml``): a frozen Conv1D (``addmm(bias, x, W)``) whose input requires grad saves
# W only, not x; LayerNorm with frozen weight and bias still saves its input, mean and rstd for the
# input's gradient; GELU's chain and the dropouts save as in full fine-tuning wherever their input
# requires grad, nothing where it does not. ``lora_A`` saves its input (or its dropout copy and,
# where x requires grad, the mask), ``lora_B`` the B*S*r intermediate. The frozen wte and wpe save
# no indices; their output needs no grad unless checkpointing's ``enable_input_require_grads``
# (PEFT's ``_prepare_model_for_gradient_checkpointing``) hooks wte.


def _lora_adapter(s: _Sizes, lora: LoraQuery, targets: tuple[str, ...], module: str, fan_in: int, x_grad: bool,
                  x_saved_anyway: bool) -> int:
    """What the adapter on ``module`` saves (nothing when it is not a target)."""
    if module not in targets:
        return 0
    x = s.B * s.S * fan_in
    if lora.dropout > 0:
        inputs = x * s.e + (x * s.mask_e if x_grad else 0)
    else:
        inputs = 0 if x_saved_anyway else x * s.e
    return inputs + s.B * s.S * lora.r * s.e


def _lora_block(s: _Sizes, q: ActivationQuery, attn: _Attention, lora: LoraQuery, targets: tuple[str, ...],
                grad_in: bool) -> tuple[int, bool, int]:
    """(bytes one GPT2Block saves with adapters on ``targets``, whether its output requires grad,
    KV-cache copies alive until the loss that no kernel saved), given whether its input does."""
    e, BSH, BSI = s.e, s.BSH, s.BSI
    ln = s.BSH * e + 2 * s.B * s.S * s.stat_e  # input + mean + rstd
    saved = (ln if grad_in else 0) + _lora_adapter(s, lora, targets, "attn.c_attn", s.H, grad_in, False)
    att_grad = grad_in or "attn.c_attn" in targets
    # CUDA's fused kernels save their output, which is attn.c_proj's input (in full fine-tuning
    # counted with the linear inputs); elsewhere c_proj's input is saved only by its adapter
    fused_cuda = not q.cpu and q.attn_implementation != "eager"
    saved += (attn.saved + (BSH * e if fused_cuda else 0)) if att_grad else 0
    cache = attn.cache_not_saved if att_grad else (2 * BSH * e if s.cache else 0)
    saved += _lora_adapter(s, lora, targets, "attn.c_proj", s.H, att_grad, att_grad and fused_cuda)
    attn_out_grad = att_grad or "attn.c_proj" in targets
    saved += s.resid_mask if attn_out_grad else 0
    grad_mid = grad_in or attn_out_grad
    saved += (ln if grad_mid else 0) + _lora_adapter(s, lora, targets, "mlp.c_fc", s.H, grad_mid, False)
    fc_grad = grad_mid or "mlp.c_fc" in targets
    saved += 4 * BSI * e if fc_grad else 0  # GELU's chain: x, tanh's output, 0.5*x, 1 + tanh
    saved += _lora_adapter(s, lora, targets, "mlp.c_proj", s.I, fc_grad, False)
    mlp_grad = fc_grad or "mlp.c_proj" in targets
    saved += s.resid_mask if mlp_grad else 0
    return saved, grad_mid or mlp_grad, cache


def _lora_blocks(s: _Sizes, q: ActivationQuery, attn: _Attention, lora: LoraQuery, grad_in: bool
                 ) -> tuple[int, int, int]:
    """(every block's saved bytes, the last block's, cache copies no kernel saved)."""
    total = last = cache = 0
    grad = grad_in
    for layer in range(s.L):
        last, grad, kv = _lora_block(s, q, attn, lora, lora.targets(layer), grad)
        total += last
        cache += kv
    return total, last, cache


def _lora_activations(s: _Sizes, q: ActivationQuery, attn: _Attention, lora: LoraQuery) -> Activations:
    """Activation memory of a PEFT-wrapped GPT-2 (the comment block above). Outside the blocks:
    ln_f saves its input and stats; its output (the frozen lm_head's input, not saved) stays alive
    until the loss returns (GPT2LMHeadModel.forward's ``transformer_outputs``); the loss terms
    are full fine-tuning's; the ids are the loop's; the position ids are not saved."""
    e, BSH, BSI = s.e, s.BSH, s.BSI
    out = _outside(s, attn)
    ln_f = BSH * e + 2 * s.B * s.S * s.stat_e
    outside = out.shift_labels + FP32 + ln_f + out.log_softmax
    alive_at_loss = out.input_ids + BSH * e + out.loss_end - s.L * attn.cache_not_saved
    if q.checkpointing:
        # as full fine-tuning's (_forward): each block keeps its input; wte's output requires
        # grad (enable_input_require_grads), so the embedding dropout saves its noise
        saved = s.L * BSH * e + outside + s.embd_mask
        _, last, _ = _lora_blocks(s, q, attn, lora, True)
        recomputed = last - BSH * e  # ln_1's input is the checkpointed block input
        # the forward moments of full fine-tuning's _forward, with what is alive at the loss
        at_loss = replace(out, saved=outside + s.embd_mask + BSH * e + out.input_ids)
        _, forward_peak, _ = _forward(s, q, 0, attn, at_loss)
    else:
        blocks, _, cache = _lora_blocks(s, q, attn, lora, False)
        saved, recomputed = blocks + outside, 0
        forward_peak = saved + alive_at_loss + cache
    # With checkpointing the loop's last loss keeps wte's output and its .grad alive after backward
    # (common.lora_checkpoint_held; reentrant: also the blocks' kwargs, cache_position, and the
    # stashed CPU RNG states) until the next forward returns a new loss: held between steps and
    # through the next forward, gone in backward (the new step's are counted there)
    kept_inputs = lora_checkpoint_held(BSH * e, s.S, s.L, reentrant=q.checkpoint_reentrant, cpu=q.cpu,
                                       kwargs_bytes=s.S * INT64) if q.checkpointing else 0
    held = saved + out.input_ids
    bwd_start = held + _loss_backward(s) - out.shift_labels + 2 * FP32
    # after the loss's and ln_f's backward: the residual stream's gradient beside the rest; then
    # a block's GELU backward: the frozen mlp.c_proj saved no GELU output, so its grad_x (BSI*e)
    # is alive beside the two gradients of GELU's last mul (traced: 3 BSI*e). The largest moment
    # from the first adapter gradient on is taken as this one (an approximation, as Llama's)
    after_ln_f = held + recomputed - out.shift_labels - out.log_softmax - ln_f + BSH * e + 2 * FP32
    first_hook = after_ln_f + 3 * BSI * e
    formula = (f"LoRA r={lora.r} on a frozen model: per block the frozen LayerNorms' 2(BSH*e+2BS*{s.stat_e}), "
               f"GELU 4BSI*e, dropout masks, attention [{attn.words}], the adapters' inputs and B*S*r intermediates")
    return Activations(saved, forward_peak + kept_inputs, max(bwd_start, first_hook), saved // max(s.L, 1), formula,
                       loop_held=out.input_ids + FP32 + kept_inputs, backward_first_hook=first_hook)


def gpt2_activations(shape: Any, q: ActivationQuery) -> Activations:
    """Activation memory of GPT2LMHeadModel training for one micro-batch (module docstring);
    ``shape`` is a GPT-2 :class:`memprof.estimate.model_shapes.ModelShape`."""
    s = _sizes(shape, q)
    attn = _attention(s, q)
    if q.lora is not None:
        return _lora_activations(s, q, attn, q.lora)
    per_layer = _per_layer(s, attn)
    out = _outside(s, attn)
    saved, forward_peak, recomputed = _forward(s, q, per_layer, attn, out)
    # backward starts with nll_loss_backward and _log_softmax_backward_data outputs (B*S*V*4 each);
    # the loop dropped the output, so the logits are gone; nll_loss_backward has released
    # shift_labels; the loss and its gradient seed (4 bytes each) are alive
    bwd_start = saved + _loss_backward(s) - out.shift_labels + 2 * FP32
    if shape.tied_embeddings:
        first_hook, gelu_mul, c_proj_weight_hook, c_fc_bias_hook, block = _tied_first_hook(s, q, attn, saved, recomputed, out)
        untied_recompute = 0
        # GPT2LMHeadModel.parameters(): wte, wpe, 12 per block (ln_1, attn.c_attn, attn.c_proj,
        # ln_2, mlp.c_fc, mlp.c_proj: weight and bias each), ln_f's two; the tied lm_head is wte
        later = later_grad_elements(shape.param_numels, s.L, 2, 2) if shape.trainable_mask is None else ()
    else:
        first_hook, untied_recompute = _untied_first_hook(s, q, per_layer, saved, out)
        gelu_mul = c_proj_weight_hook = c_fc_bias_hook = 0
        block, later = (), ()  # untied: the in-block moments are not traced (not modelled block by block)
    formula = (
        f"per layer {'(recomputed once in backward) ' if q.checkpointing else ''}"
        f"= LayerNorms 2BSH*e+4BS*{s.stat_e} + linear inputs 3BSH*e + dropout masks 2BSH*{s.mask_e} "
        f"+ GELU/MLP 5BSI*e + attention [{attn.words}]"
        + ("; KV cache (use_cache) copies k, v per block" if s.cache else "")
    )
    keeps_probs = attention_keeps_probabilities(q.attn_implementation, q.device_type, s.attn_dropout)
    return Activations(
        saved, forward_peak, max(bwd_start, first_hook, untied_recompute), per_layer, formula,
        loop_held=out.input_ids + FP32,  # the batch and the loss
        backward_first_hook=first_hook, after_mlp_out_hooks=gelu_mul,
        mlp_out_weight_hook=c_proj_weight_hook, mlp_in_bias_hook=c_fc_bias_hook,
        # each block keeps its saved tensors (checkpointing: its input, BSH*e) until its backward
        block_moments=with_rng_stash(block, s.L, q),
        block_kept=(s.BSH * s.e + rng_stash(q)) if q.checkpointing else per_layer, later_grad_elements=later,
        notes=(_ATTENTION_BACKWARD_NOTE,) if keeps_probs else (),
        forward_in_blocks=_forward_in_blocks(shape, s, q, attn, out),
        # the last block's non-reentrant checkpoint stashed the RNG state before the block's own
        # forward (and FSDP2's pre-forward hook inside it) ran: L stashes
        forward_before_last_block=(_in_block(s, attn, out)[0] + s.L * rng_stash(q)) if q.checkpointing else 0,
    )


FAMILY = ModelFamily(
    name="GPT-2",
    hf_classes={"gpt2": ("GPT2Config", "GPT2LMHeadModel")},
    positions_field="n_positions",
    train_mode="dropout on",
    check_launchable=check_launchable,
    vocab_size=lambda config: config.get("vocab_size", _DEFAULT_VOCAB),
    max_positions=lambda config: int(config.get("n_positions", _DEFAULT_POSITIONS)),
    default_special_token_id=50256,  # GPT2Config's bos/eos_token_id
    shape_fields=gpt2_shape_fields,
    activations=gpt2_activations,
    param_modules=gpt2_param_modules,
    lora_default_targets=("c_attn",),
)
