"""The Llama family (``model_type`` llama, mistral, qwen2: HF ``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``): its config defaults and checks, parameter shapes,
ZeRO-3 fetch order and activation memory, derived from the model code of transformers 5.24
(``modeling_llama.py`` / ``modeling_mistral.py`` / ``modeling_qwen2.py``) and the autograd formulas
of the ops it calls, and checked with an allocation tracer (tests/test_activations_llama.py).

Activation symbols: B micro-batch, S sequence, H hidden, I intermediate, a query heads, kv
key/value heads, d head_dim, Q = a*d, K = kv*d, V vocab, L layers, e bytes of the compute dtype,
n_rep = a / kv.

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
post-accumulate-grad hooks; see :func:`_backward_first_hook`): the final RMSNorm's backward, which
works in fp32 (``ToCopyBackward`` of a bf16 gradient, then four BSH*4 temporaries of the
pow/mean/rsqrt chain), the last layer's down_proj backward (grad_x BSI*e and grad_W H*I*e beside
the residual stream's gradient) and its SwiGLU product's backward (two BSI*e gradients) are the
largest. The flash attention backward keeps O(S) memory and stays below them at the traced shapes
(S <= 128).
"""

from __future__ import annotations

from dataclasses import dataclass
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
    later_grad_elements,
    lora_checkpoint_held,
    rng_stash,
    with_rng_stash,
)
from memprof.units import is_positive_int

LLAMA_FAMILY = ("llama", "mistral", "qwen2")

# What a Llama-family config means when a field is absent: the dataclass defaults of
# transformers 5.24's configuration_{llama,mistral,qwen2}.py (LlamaConfig, MistralConfig,
# Qwen2Config). num_key_value_heads None means "as many as num_attention_heads"
# (__post_init__ of all three); Qwen2Config's own default is 32 and Mistral's 8.
LLAMA_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None,
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "use_cache": True, "hidden_act": "silu",
    },
    "mistral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None,
        "max_position_embeddings": 4096 * 32, "tie_word_embeddings": False, "attention_dropout": 0.0,
        "use_cache": True, "hidden_act": "silu",
    },
    "qwen2": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": None,
        "max_position_embeddings": 32768, "tie_word_embeddings": False, "attention_dropout": 0.0,
        "use_cache": True, "hidden_act": "silu",
    },
}


# ---- config ----------------------------------------------------------------------------------


def llama_family_fields(cfg: dict[str, Any], where: str = "model config") -> dict[str, Any]:
    """The architecture of a llama/mistral/qwen2 config with every absent field filled as the HF
    config class fills it (``LLAMA_FAMILY_DEFAULTS``), checked: positive whole numbers, heads
    dividing the hidden size (when ``head_dim`` is not given) and query heads a multiple of the
    key/value heads. MemprofError naming the field otherwise."""
    model_type = cfg.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise MemprofError(f"{where}: model_type {model_type!r} is not one of {', '.join(LLAMA_FAMILY)}")
    out = {**LLAMA_FAMILY_DEFAULTS[model_type], **cfg}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        _positive_int(out, key, where)
    heads = out["num_attention_heads"]
    if out.get("num_key_value_heads") is None:
        out["num_key_value_heads"] = heads
    _positive_int(out, "num_key_value_heads", where)
    if out.get("head_dim") is None:
        if out["hidden_size"] % heads:
            raise MemprofError(f"{where}: hidden_size {out['hidden_size']} is not divisible by num_attention_heads {heads}")
        out["head_dim"] = out["hidden_size"] // heads
    _positive_int(out, "head_dim", where)
    if out["head_dim"] % 2:
        raise MemprofError(f"{where}: head_dim {out['head_dim']} must be even (rotary embeddings rotate pairs of channels)")
    if heads % out["num_key_value_heads"]:
        raise MemprofError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {out['num_key_value_heads']}"
        )
    return out


def _positive_int(cfg: dict[str, Any], key: str, where: str) -> None:
    value = cfg.get(key)
    if not is_positive_int(value):
        raise MemprofError(f"{where} needs a positive integer {key!r} (got {value!r})")


def check_launchable(config: dict[str, Any], where: str) -> None:
    """The launcher's check of a llama/mistral/qwen2 config (:func:`llama_family_fields`)."""
    llama_family_fields(config, where)


def _config_default(config: dict[str, Any], key: str) -> Any:
    """``config[key]``, or its config class's default where absent."""
    return config.get(key, LLAMA_FAMILY_DEFAULTS[config["model_type"]][key])


# ---- parameters ------------------------------------------------------------------------------


def _llama_biases(f: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, MLP bias) by family: LlamaAttention/LlamaMLP take
    ``attention_bias`` (all four projections) and ``mlp_bias``; Qwen2Attention has
    ``bias=True`` on q/k/v and none on o_proj, Qwen2MLP none; Mistral none anywhere."""
    if f["model_type"] == "llama":
        att = bool(f.get("attention_bias", False))
        return att, att, bool(f.get("mlp_bias", False))
    if f["model_type"] == "qwen2":
        return True, False, False
    return False, False, False


def _sliding_window(f: dict[str, Any]) -> int | None:
    """The attention window in effect: MistralConfig's ``sliding_window`` (default 4096, None
    turns it off); Qwen2's only with ``use_sliding_window`` (Qwen2Config.__post_init__); Llama none."""
    if f["model_type"] == "mistral":
        return f.get("sliding_window", 4096)
    if f["model_type"] == "qwen2" and f.get("use_sliding_window"):
        return f.get("sliding_window", 4096)
    return None


def llama_param_numels(cfg: dict[str, Any]) -> tuple[int, ...]:
    """``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` parameter numels in
    ``parameters()`` (registration) order, which DeepSpeed flattens them in: model.embed_tokens
    V*H; per decoder layer self_attn.q_proj a*d*H (+a*d), k_proj and v_proj kv*d*H (+kv*d each),
    o_proj H*a*d (+H), mlp.gate_proj, up_proj I*H (+I each), down_proj H*I (+H),
    input_layernorm H, post_attention_layernorm H (RMSNorm: weight only); model.norm H; lm_head
    V*H unless tied (``tie_word_embeddings``; no bias). a heads, kv key/value heads, d head_dim."""
    f = llama_family_fields(cfg)
    h, inter, vocab = f["hidden_size"], f["intermediate_size"], f["vocab_size"]
    a, kv, d = f["num_attention_heads"], f["num_key_value_heads"], f["head_dim"]
    qkv_bias, o_bias, mlp_bias = _llama_biases(f)
    layer: list[int] = []
    for out in (a * d, kv * d, kv * d):  # q_proj, k_proj, v_proj (nn.Linear weight is (out, in))
        layer += [out * h] + ([out] if qkv_bias else [])
    layer += [h * a * d] + ([h] if o_bias else [])  # o_proj
    for out, inp in ((inter, h), (inter, h), (h, inter)):  # gate_proj, up_proj, down_proj
        layer += [out * inp] + ([out] if mlp_bias else [])
    layer += [h, h]  # input_layernorm, post_attention_layernorm
    numels = [vocab * h] + layer * f["num_hidden_layers"] + [h]
    if not f["tie_word_embeddings"]:
        numels.append(vocab * h)
    return tuple(numels)


def llama_fetch_modules(cfg: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """Every module in forward call order, as the ZeRO-3 parameter coordinator's forward hooks see
    them (LlamaForCausalLM.forward -> LlamaModel.forward: embed_tokens, rotary_emb, then per
    LlamaDecoderLayer input_layernorm, self_attn (q_proj, k_proj, v_proj, o_proj),
    post_attention_layernorm, mlp (gate_proj, act_fn, up_proj: ``down_proj(act_fn(gate_proj(x)) *
    up_proj(x))``, down_proj); then norm and lm_head), each as the indices into
    :func:`llama_param_numels` of its own parameters (``parameters(recurse=False)``); modules with
    none (the model, LlamaModel, rotary_emb, each layer, self_attn, mlp, act_fn) are empty: their
    fetch still prefetches. A tied lm_head is embed_tokens' weight (index 0)."""
    f = llama_family_fields(cfg)
    qkv_bias, o_bias, mlp_bias = _llama_biases(f)
    sizes = [1 + qkv_bias] * 3 + [1 + o_bias] + [1 + mlp_bias] * 3 + [1, 1]  # per layer, param order
    per_layer = sum(sizes)
    modules: list[tuple[int, ...]] = [(), (), (0,), ()]  # LlamaForCausalLM, LlamaModel, embed_tokens, rotary_emb
    for layer in range(f["num_hidden_layers"]):
        start, own = 1 + layer * per_layer, []
        for n in sizes:
            own.append(tuple(range(start, start + n)))
            start += n
        q, k, v, o, gate, up, down, ln_in, ln_post = own
        modules += [(), ln_in, (), q, k, v, o, ln_post, (), gate, (), up, down]
    norm = 1 + f["num_hidden_layers"] * per_layer
    modules.append((norm,))
    modules.append((0,) if f["tie_word_embeddings"] else (norm + 1,))
    return tuple(modules)


def llama_param_modules(cfg: dict[str, Any]) -> tuple[ParamModule, ...]:
    """The parameter-holding modules in ``parameters()`` (registration) order, named as
    ``named_modules()`` names them, with each nn.Linear's (in_features, out_features); indices as
    in :func:`llama_param_numels`. ``lm_head`` (the output embedding) last, holding
    embed_tokens' weight when tied."""
    f = llama_family_fields(cfg)
    h, inter, vocab = f["hidden_size"], f["intermediate_size"], f["vocab_size"]
    a, kv, d = f["num_attention_heads"], f["num_key_value_heads"], f["head_dim"]
    qkv_bias, o_bias, mlp_bias = _llama_biases(f)
    linears = (("self_attn.q_proj", h, a * d, qkv_bias), ("self_attn.k_proj", h, kv * d, qkv_bias),
               ("self_attn.v_proj", h, kv * d, qkv_bias), ("self_attn.o_proj", a * d, h, o_bias),
               ("mlp.gate_proj", h, inter, mlp_bias), ("mlp.up_proj", h, inter, mlp_bias),
               ("mlp.down_proj", inter, h, mlp_bias))
    out = [ParamModule("model.embed_tokens", (("weight", 0),))]
    i = 1
    for layer in range(f["num_hidden_layers"]):
        name = f"model.layers.{layer}"
        for sub, fan_in, fan_out, bias in linears:
            params = (("weight", i), ("bias", i + 1)) if bias else (("weight", i),)
            out.append(ParamModule(f"{name}.{sub}", params, (fan_in, fan_out)))
            i += len(params)
        out += [ParamModule(f"{name}.input_layernorm", (("weight", i),)),
                ParamModule(f"{name}.post_attention_layernorm", (("weight", i + 1),))]
        i += 2
    out.append(ParamModule("model.norm", (("weight", i),)))
    tied = bool(f["tie_word_embeddings"])
    out.append(ParamModule("lm_head", (("weight", 0 if tied else i + 1),), (h, vocab), output_embedding=True))
    return tuple(out)


def llama_shape_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """ModelShape's fields for a llama/mistral/qwen2 config; MemprofError on a bad shape."""
    f = llama_family_fields(cfg)
    return {
        "param_numels": llama_param_numels(cfg),
        "model_type": f["model_type"],
        "n_layer": f["num_hidden_layers"],
        "hidden": f["hidden_size"],
        "n_head": f["num_attention_heads"],
        "inner": f["intermediate_size"],
        "vocab": f["vocab_size"],
        "n_positions": f["max_position_embeddings"],
        "tied_embeddings": bool(f["tie_word_embeddings"]),
        "dropout": {"attention_dropout": float(f.get("attention_dropout") or 0.0)},
        "use_cache": f.get("use_cache", True) is not False,
        "fetch_modules": llama_fetch_modules(cfg),
        "n_kv_head": f["num_key_value_heads"],
        "head_dim": f["head_dim"],
        "buffer_numel": 2 * (f["head_dim"] // 2),  # LlamaRotaryEmbedding: inv_freq, original_inv_freq
        "mlp_bias": _llama_biases(f)[2],
        "hidden_act": str(f.get("hidden_act", "silu")),
        "sliding_window": _sliding_window(f),
    }


# ---- activations -----------------------------------------------------------------------------


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


@dataclass(frozen=True)
class _Sizes:
    """The module docstring's symbols for one query, and the switches the formulas branch on."""

    B: int
    S: int
    e: int
    H: int
    I: int
    a: int
    V: int
    L: int
    kv: int
    d: int
    kernel: str  # attention_kernel's answer
    # GradientCheckpointingLayer (modeling_layers.py) sets use_cache=False and cache=None in training
    cache: bool
    cpu: bool = False  # CPU kernels (the dropout mask's dtype)
    fused: Any = None  # TRL's fused LM head's bytes (ActivationQuery.fused_head), else the HF loss

    @property
    def n_rep(self) -> int:
        return self.a // self.kv

    @property
    def BS(self) -> int:
        return self.B * self.S

    @property
    def BSH(self) -> int:
        return self.BS * self.H

    @property
    def BSI(self) -> int:
        return self.BS * self.I

    @property
    def BSQ(self) -> int:
        return self.BS * self.a * self.d

    @property
    def BSK(self) -> int:
        return self.BS * self.kv * self.d

    @property
    def bass(self) -> int:
        return self.B * self.a * self.S * self.S

    @property
    def norm_saved(self) -> int:
        """One RMSNorm's saved tensors: fp32 input (copy or itself), rsqrt, normalised in e."""
        return 4 * self.BSH + 4 * self.BS + self.BSH * self.e

    @property
    def eager_core(self) -> int:
        """eager_attention_forward at its widest: repeat_kv's copies of k and v (n_rep > 1), then
        the scores and their scaled copy (``matmul(...) * scaling``), or in bf16 the masked scores
        beside softmax(dtype=float32)'s fp32 input copy and output (traced)."""
        B, a, S, d, e, bass = self.B, self.a, self.S, self.d, self.e, self.bass
        return ((2 * B * a * S * d * e if self.n_rep > 1 else 0)
                + max(2 * bass * e, bass * e + (2 * bass * FP32 if e < FP32 else bass * FP32)))


def _sizes(shape: Any, q: ActivationQuery) -> _Sizes:
    H, I, a, V, L = shape.hidden, shape.inner, shape.n_head, shape.vocab, shape.n_layer
    kv, d = shape.n_kv_head, shape.head_dim
    assert H and I and a and V and L and kv and d
    kernel = attention_kernel(q.attn_implementation, q.device_type, q.element_size, a // kv)
    return _Sizes(q.micro_batch, q.seq_len, q.element_size, H, I, a, V, L, kv, d, kernel,
                  cache=shape.use_cache and not q.checkpointing, cpu=q.cpu, fused=q.fused_head)


@dataclass(frozen=True)
class _Attention:
    saved: int  # what the attention core saves for backward, per layer
    kv_saved: int  # of which k and v (0 for flash: not needed)
    cache_not_saved: int  # KV-cache copies no kernel saved, alive until the loss returns, per layer
    words: str


def _attention(s: _Sizes) -> _Attention:
    """The attention core's saved tensors, by kernel (module docstring)."""
    e, BSQ, BSK, bass = s.e, s.BSQ, s.BSK, s.bass
    if s.kernel == "flash":
        return _Attention(BSQ * e + 2 * BSK * e + BSQ * e + s.B * s.a * s.S * FP32, 0, 0,  # q, k, v, output, lse
                          "BSQ*e (q) + 2BSK*e (k, v unexpanded: enable_gqa) + BSQ*e (output = o_proj input) "
                          "+ 4BaS (logsumexp)")
    ae = FP32 if s.kernel == "math" else e
    kv_saved = 2 * (s.B * s.a * s.S * s.d * ae if s.n_rep > 1 else BSK * ae)  # repeat_kv copies, or the cache tensors
    probs = bass * FP32 + (bass * e if e < FP32 and s.kernel == "eager" else 0)  # softmax fp32 out (+ bf16 copy)
    cache_not_saved = 2 * BSK * e if s.cache and s.n_rep > 1 else 0
    words = (f"BSQ*{ae} (q) + 2 B*a*S*d*{ae} (repeat_kv copies of k, v) " if s.n_rep > 1 else
             f"BSQ*{ae} (q) + 2BSK*{ae} (k, v) ") + (
                 f"+ B*a*S*S*4 (softmax){' + B*a*S*S*e (its copy)' if probs > bass * FP32 else ''} + BSQ*e (o_proj input)")
    return _Attention(BSQ * ae + kv_saved + probs + BSQ * e, kv_saved, cache_not_saved, words)  # q, k, v, probs, o_proj input


def _mlp(s: _Sizes) -> int:
    """SwiGLU: gate output, silu output, up output, their product."""
    return 4 * s.BSI * s.e


def _per_layer(s: _Sizes, attn: _Attention) -> int:
    norms = 2 * s.norm_saved + 2 * s.BSH * s.e  # input_layernorm, post_attention_layernorm + outputs
    return norms + _mlp(s) + attn.saved


@dataclass(frozen=True)
class _Outside:
    """What lives outside the layers: the loop's batch, cos and sin, the final norm and the loss."""

    input_ids: int
    shift_labels: int  # what nll_loss saves of the labels
    rotary: int  # cos, sin (saved by the rotary muls, shared by all layers)
    log_softmax: int
    saved: int  # every saved tensor outside the layers
    loss_end: int  # what the loss's end adds to the saved tensors (cache copies included)


def _outside(s: _Sizes, attn: _Attention) -> _Outside:
    BS, V, e = s.BS, s.V, s.e
    input_ids = BS * INT64
    padded_labels = s.B * (s.S + 1) * INT64  # pad(labels, (0, 1)), alive until the loss returns
    shift_labels = BS * INT64  # labels[..., 1:].contiguous(), saved by nll_loss
    if s.B == 1:
        # a (1, S+1) row sliced [..., 1:] is already contiguous: contiguous() returns the view,
        # so nll_loss saves the padded labels' storage itself and there is no second copy
        shift_labels, padded_labels = padded_labels, 0
    ids = input_ids + shift_labels + FP32  # + nll's total_weight
    rotary = 2 * s.S * s.d * e
    final_norm = s.norm_saved + s.BSH * e  # model.norm's saved tensors + its output (lm_head's input)
    log_softmax = BS * V * FP32
    logits = BS * V * e
    upcast = BS * V * FP32 if e < FP32 else 0  # logits.float() in ForCausalLMLoss
    if s.fused is not None:
        # TRL's add_fused_lm_head: no logits; ChunkedLogProbFunction saves the shifted hidden
        # copy (in log_softmax's place) and holds its chunk buffer and tiles at the loss
        log_softmax, logits, upcast = s.fused.saved, s.fused.forward_transient, 0
    loss_end = logits + upcast + s.L * attn.cache_not_saved + padded_labels + FP32  # + the loss
    return _Outside(input_ids, shift_labels, rotary, log_softmax, ids + rotary + final_norm + log_softmax, loss_end)


def _loss_backward(s: _Sizes) -> int:
    """What the loss's backward holds at its start: nll_loss_backward's and
    _log_softmax_backward_data's outputs (B*S*V*4 each), or TRL's fused head's backward (its chunk
    buffer, tiles and fp32 grad_hidden: trainer_terms.trl_fused_head_bytes)."""
    if s.fused is not None:
        return s.fused.backward_transient
    return 2 * s.BS * s.V * FP32


def _forward(s: _Sizes, q: ActivationQuery, per_layer: int, attn: _Attention, out: _Outside) -> tuple[int, int, int]:
    """(saved once forward returns, forward's peak, what backward recomputes of the last layer)."""
    e, BSH, L = s.e, s.BSH, s.L
    positions = s.S * INT64  # position ids
    if q.checkpointing:
        # non-reentrant torch.utils.checkpoint: each layer keeps only its input (BSH*e); backward
        # recomputes the last layer first, so its saved tensors come back (less the fp32 norm
        # input, which is the layer input itself in fp32). The checkpoints also hold their other
        # inputs: cos, sin (already outside), the position ids (freed after the rotary embedding
        # without checkpointing), and for eager attention the causal mask create_causal_mask
        # built (B, 1, S, S) in the compute dtype
        mask = s.B * s.S * s.S * e if s.kernel == "eager" else 0
        saved = L * BSH * e + out.saved + positions + mask
        recomputed = per_layer - (BSH * FP32 if e == FP32 else 0)
        # inside the last layer's forward (only live locals count: the checkpoint drops what
        # autograd would save): ids, position ids, cos, sin, the mask, every layer's input,
        # then either the MLP at its widest (the post-attention sum and post_attention_layernorm's
        # output beside silu's output, up's output and their product, 3 BSI*e), or eager
        # attention at its widest (input_layernorm's output, v_proj's output, the rotated q and k,
        # repeat_kv's copies, then the scores and their scaled copy, or in bf16 the masked scores
        # beside softmax's fp32 input copy and output)
        # every checkpoint's stashed CPU RNG state (common.rng_stash) is alive from its block's forward
        # to its backward: at the loss all L (traced on the 2-rank ZeRO-3 Llama w96 run: the measured
        # forward peak held 3 x 5,056 bytes beyond the rest), inside the last layer all L too
        layer_base = out.input_ids + positions + out.rotary + mask + L * BSH * e + L * rng_stash(q)
        moments = [saved + out.loss_end + L * rng_stash(q), layer_base + 2 * BSH * e + 3 * s.BSI * e]
        if s.kernel == "eager":
            moments.append(layer_base + BSH * e + s.BSQ * e + 2 * s.BSK * e + s.eager_core)
        return saved, max(moments), recomputed
    saved = L * per_layer + out.saved
    forward_peak = saved + out.loss_end
    if s.kernel == "eager":
        # inside the last layer's attention, at its widest: the earlier layers' saved tensors
        # (and cache copies), ids, position ids (a local of LlamaModel.forward), cos, sin, the
        # causal mask (B, 1, S, S), input_layernorm's saved tensors and output, the rotated q,
        # k and v (the cache copies), repeat_kv's copies and the scores (see eager_core)
        # In bf16 two more bf16 copies of the residual stream are alive than autograd saves (it
        # saves the norms' fp32 copies): the layer's input (``residual``) and the embedding
        # output (LlamaModel.forward's ``inputs_embeds`` local); in fp32 both are saved tensors.
        mask = s.B * s.S * s.S * e
        stream = 0 if e == FP32 else (2 if L > 1 else 1) * BSH * e
        inside = ((L - 1) * (per_layer + attn.cache_not_saved) + out.input_ids + positions + out.rotary + mask + stream
                  + s.norm_saved + BSH * e + s.BSQ * e + 2 * s.BSK * e + s.eager_core)
        forward_peak = max(forward_peak, inside)
    return saved, forward_peak, 0


def _backward_first_hook(s: _Sizes, shape: Any, attn: _Attention, saved: int, recomputed: int, out: _Outside
                         ) -> tuple[int, tuple[tuple[int, int], ...], int, int]:
    """The largest moment from the first parameter gradient hook through the last layer's
    backward (traced; module docstring), the last layer's in-block moments as
    ``Activations.block_moments`` (activation bytes, elements of its own parameters' .grad), the
    first hook's own moment and the final norm's backward."""
    e, H, I, BSH, BSI, norm_saved, bass = s.e, s.H, s.I, s.BSH, s.BSI, s.norm_saved, s.bass
    # After the final norm's backward (its saved tensors and output freed, the residual stream's
    # gradient BSH*e alive; the loss gradients and log_softmax's output freed; a tied embedding's
    # lm_head gradient V*H*e waiting in its AccumulateGrad buffer for the embedding's share):
    after_norm = (saved + recomputed - out.shift_labels - out.log_softmax - norm_saved
                  + (0 if not shape.tied_embeddings else s.V * H * e) + 2 * FP32)
    # the final RMSNorm's backward at its widest (pow's backward): its saved tensors, the fp32
    # gradient of the normalised states (a ToCopyBackward copy when e < 4) and the pow/mean/rsqrt
    # chain's BSH*4 temporaries, less the B*S*4 of rsqrt's gradient already freed
    norm_bwd = after_norm - recomputed + norm_saved + 3 * BSH * FP32 + (BSH * FP32 if e < FP32 else 0) - 4 * s.BS
    # the last layer's down_proj backward: grad_x (BSI*e) and grad_W (H*I*e) (+ its bias)
    down_proj = after_norm + BSI * e + H * I * e + (H * e if shape.mlp_bias else 0)
    # the first hook itself: lm_head.weight's (untied: only the loss gradients are gone) or
    # model.norm.weight's (tied: the normalised states and lm_head's input freed)
    first = ((saved - out.shift_labels - out.log_softmax + 2 * FP32) if not shape.tied_embeddings
             else (after_norm - recomputed + norm_saved - BSH * e))
    # the SwiGLU product's backward (grad of silu's output and of up's output, BSI*e each, beside
    # down_proj's grad_x; down_proj's saved input, the product, already freed)
    swiglu_mul = after_norm + 2 * BSI * e
    mlp_b = 2 * I + H if shape.mlp_bias else 0
    # own .grads by then: none at down_proj (its grad_W is the one being formed); down_proj's at
    # the SwiGLU product; at the attention backward the MLP's three weights, post_attention_layernorm's
    # and o_proj's (LlamaDecoderLayer runs the MLP half's backward first)
    block = [(down_proj, 0), (swiglu_mul, H * I + (H if shape.mlp_bias else 0))]
    if s.kernel != "flash":
        # The last layer's eager attention backward, at _softmax_backward_data (traced): by then its
        # MLP half is released (SwiGLU's 4 BSI*e, post_attention_layernorm's saved tensors and
        # output, o_proj's input, replaced by o_proj's grad_x, BSQ*e), and matmul(probs, v)'s
        # backward has freed v's saved copy, the output gradient and (bf16) the probabilities'
        # copy; alive: the gradient of the probabilities in fp32 (a ToCopyBackward copy when
        # e < 4) and softmax's backward output (B*a*S*S*4 each).
        after_o_proj = after_norm - _mlp(s) - norm_saved - BSH * e
        block.append((after_o_proj - attn.kv_saved // 2 + 2 * bass * FP32
                      - (bass * e if e < FP32 and s.kernel == "eager" else 0), 3 * H * I + mlp_b + H + s.a * s.d * H))
    return max([first, norm_bwd, *(m for m, _ in block)]), tuple(block), first, norm_bwd


# ---- LoRA on a frozen model ------------------------------------------------------------------
#
# PEFT 0.21.2 ``lora.Linear.forward`` (peft/tuners/lora/layer.py): ``result = base_layer(x)``, then
# per adapter ``result = result + lora_B(lora_A(dropout(x))) * scaling``. With the base weights
# frozen, autograd saves what each op needs for the gradients that are required only
# (``derivatives.yaml``): a frozen Linear whose input requires grad saves its weight (a
# parameter, not an activation), not its input; ``lora_A`` (trainable) saves its input x (or the
# dropout's copy), ``lora_B`` the B*S*r intermediate; ``* scaling`` (a Python number) and the sum
# save nothing. ``LlamaRMSNorm`` with a frozen weight saves its fp32 input and rsqrt for the input's
# gradient, but no longer the normalised states (``weight * h`` saves the weight). A tensor that
# does not require grad (the frozen embedding's output; everything before the first adapter without
# checkpointing) makes the ops reading it save nothing. With checkpointing PEFT's
# ``_prepare_model_for_gradient_checkpointing`` calls ``enable_input_require_grads`` (a forward hook
# setting ``requires_grad_`` on the embedding output), so every layer's input requires grad.
# ``lora_dropout > 0`` (nn.Dropout per target): each target makes its own copy of x (B*S*in*e),
# and where x requires grad the dropout saves its mask for backward: torch ``at::dropout`` on CUDA
# runs ``native_dropout`` (a bool mask, 1 byte a element), on CPU ``_dropout_impl`` (``input *
# noise``: a noise tensor in the compute dtype). The frozen embedding saves no indices.

_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def _adapters_reading(s: _Sizes, lora: LoraQuery, targets: tuple[str, ...], modules: tuple[str, ...], fan_in: int,
                      x_grad: bool, x_saved_anyway: bool) -> int:
    """What the adapters on ``modules`` (all reading one input x of B*S*fan_in) save: lora_A's
    input (x itself, once, unless something else saves x; with dropout a copy per target and, when
    x requires grad, its mask) and lora_B's input (B*S*r per target)."""
    n = sum(1 for m in modules if m in targets)
    if not n:
        return 0
    x = s.BS * fan_in
    if lora.dropout > 0:
        mask = (x * s.e if s.cpu else x) if x_grad else 0  # CPU: noise in the compute dtype; CUDA: bool
        inputs = n * (x * s.e + mask)
    else:
        inputs = 0 if x_saved_anyway else x * s.e
    return inputs + n * s.BS * lora.r * s.e


def _lora_attention_core(s: _Sizes, attn: _Attention, q_grad: bool, k_grad: bool, v_grad: bool) -> int:
    """What the attention core saves when only some of q, k, v require grad (layer 0 without
    checkpointing), o_proj's input left out. sdpa's flash kernel saves q, k, v, its output and
    the logsumexp whenever any input requires grad. Eager (and math) by op: ``matmul(q, k^T)``
    saves k's copy for q's gradient and q for k's; softmax its output for its input's;
    ``matmul(probs, v)`` saves v for the probabilities' gradient and the probabilities (the bf16
    copy when e < 4) for v's."""
    if not (q_grad or k_grad or v_grad):
        return 0
    if s.kernel == "flash":
        return attn.saved
    ae = FP32 if s.kernel == "math" else s.e
    copy = s.bass * s.e if s.e < FP32 and s.kernel == "eager" else 0  # softmax's output cast to e
    probs_grad = q_grad or k_grad
    return (s.BSQ * ae * k_grad + attn.kv_saved // 2 * (q_grad + probs_grad)
            + s.bass * FP32 * (probs_grad or (v_grad and not copy)) + copy * v_grad)


def _lora_layer(s: _Sizes, attn: _Attention, lora: LoraQuery, targets: tuple[str, ...], grad_in: bool
                ) -> tuple[int, bool, bool]:
    """(bytes one decoder layer saves with adapters on ``targets``, whether its output requires
    grad, whether its attention does), given whether its input does (the comment block above)."""
    e, H, Q = s.e, s.H, s.a * s.d
    norm = 4 * s.BSH + 4 * s.BS  # a frozen RMSNorm: fp32 input (copy or itself) and rsqrt
    saved = (norm if grad_in else 0) + _adapters_reading(s, lora, targets, _QKV, H, grad_in, False)
    q_grad, k_grad, v_grad = (grad_in or m in targets for m in _QKV)
    att_grad = q_grad or k_grad or v_grad
    saved += _lora_attention_core(s, attn, q_grad, k_grad, v_grad)
    # sdpa's flash kernel saves its output, which is o_proj's input; eager/math's o_proj input is a
    # contiguous copy only a trainable reader (o_proj's lora_A) saves
    o_input_saved = att_grad and s.kernel == "flash"
    saved += _adapters_reading(s, lora, targets, ("self_attn.o_proj",), Q, att_grad, o_input_saved)
    grad_mid = att_grad or "self_attn.o_proj" in targets
    saved += (norm if grad_mid else 0) + _adapters_reading(s, lora, targets, _GATE_UP, H, grad_mid, False)
    gate_grad = grad_mid or "mlp.gate_proj" in targets
    up_grad = grad_mid or "mlp.up_proj" in targets
    # silu saves its input (gate's output) for gate's gradient; the product saves each factor
    # for the other's gradient; the frozen down_proj saves nothing of the product
    saved += s.BSI * e * (2 * gate_grad + up_grad)
    prod_grad = gate_grad or up_grad
    saved += _adapters_reading(s, lora, targets, ("mlp.down_proj",), s.I, prod_grad, False)
    return saved, prod_grad or "mlp.down_proj" in targets, att_grad


def _lora_layers(s: _Sizes, attn: _Attention, lora: LoraQuery, grad_in: bool) -> tuple[int, int, int]:
    """(every layer's saved bytes, the last layer's, KV-cache copies no kernel saved), walking
    the layers in forward order. The cache (``use_cache``, no checkpointing) holds k and v
    copies until the loss returns: saved by sdpa where the attention needs grad; in a layer whose
    attention needs none, or eager with GQA (repeat_kv saves expanded copies), not."""
    total = last = cache = 0
    grad = grad_in
    for layer in range(s.L):
        last, grad, att_grad = _lora_layer(s, attn, lora, lora.targets(layer), grad)
        total += last
        cache += attn.cache_not_saved if att_grad else (2 * s.BSK * s.e if s.cache else 0)
    return total, last, cache


def _lora_activations(s: _Sizes, q: ActivationQuery, attn: _Attention, lora: LoraQuery) -> Activations:
    """Activation memory of a PEFT-wrapped Llama (the comment block above). Outside the layers:
    the final norm saves its fp32 input and rsqrt; its output (lm_head's input, frozen lm_head:
    not saved) stays alive until the loss returns (LlamaForCausalLM.forward's ``outputs`` local);
    the loss terms are those of full fine-tuning; the ids are held by the loop, not saved."""
    e, BSH, BS = s.e, s.BSH, s.BS
    out = _outside(s, attn)
    final_norm = 4 * BSH + 4 * BS
    outside = out.shift_labels + FP32 + out.rotary + final_norm + out.log_softmax
    # ids, the final norm's output, logits and the loss's copies (the cache's copies apart)
    alive_at_loss = out.input_ids + BSH * e + out.loss_end - s.L * attn.cache_not_saved
    positions = s.S * INT64
    if q.checkpointing:
        mask = s.B * s.S * s.S * e if s.kernel == "eager" else 0
        saved = s.L * BSH * e + outside + positions + mask  # each layer's input, as in full fine-tuning
        _, last, _ = _lora_layers(s, attn, lora, True)  # enable_input_require_grads: every input requires grad
        recomputed = last - (BSH * FP32 if e == FP32 else 0)  # the fp32 norm input is the layer input
        layer_base = out.input_ids + positions + out.rotary + mask + s.L * BSH * e
        in_layer = layer_base + 2 * BSH * e + 3 * s.BSI * e
        forward_peak = max(saved + alive_at_loss, in_layer)
        last_block_end = 0
    else:
        layers, _, cache = _lora_layers(s, attn, lora, False)  # the frozen embedding's output needs no grad
        saved, recomputed = layers + outside, 0
        forward_peak = saved + alive_at_loss + cache
        in_layer = 0
        last_block_end = _lora_last_block_end(s, attn, lora, layers + cache, out, positions)
    # With checkpointing the loop's last loss keeps the embedding output and its .grad alive after
    # backward (common.lora_checkpoint_held; reentrant: also the layers' kwargs, position ids, cos
    # and sin, and the stashed CPU RNG states) until the next forward returns a new loss: held
    # between steps and through the next forward, gone in backward (the new step's are counted there)
    kept_inputs = lora_checkpoint_held(BSH * e, s.S, s.L, reentrant=q.checkpoint_reentrant, cpu=s.cpu,
                                       kwargs_bytes=positions + out.rotary) if q.checkpointing else 0
    held = saved + out.input_ids  # after forward: saved tensors and the loop's batch
    bwd_start = held + _loss_backward(s) - out.shift_labels + 2 * FP32
    # after the loss's and the final norm's backward: the residual stream's gradient beside the
    # rest (the recomputed last layer with checkpointing)
    after_norm = held + recomputed - out.shift_labels - out.log_softmax - final_norm + BSH * e + 2 * FP32
    # the final norm's backward at its widest (as in full fine-tuning: the fp32 chain's temporaries)
    norm_bwd = after_norm - recomputed + final_norm + 3 * BSH * FP32 + (BSH * FP32 if e < FP32 else 0) - 4 * BS
    # a layer's MLP backward: the SwiGLU product's two gradients beside down_proj's grad_x and
    # the residual stream's gradient (an adapter's B*S*r terms left out). The first adapter
    # gradient comes in the last layer's backward, before some layer's MLP backward (the last
    # one's when an adapter sits in its attention, the one before it otherwise): the largest
    # moment from then on is taken as this one (traced within ~8% at the tiny presets, an
    # approximation: memprof's test_activations_lora.py)
    mlp_bwd = after_norm + 2 * s.BSI * e
    first_hook = mlp_bwd
    formula = (f"LoRA r={lora.r} on a frozen model: per layer the frozen RMSNorms' 2x(4BSH+4BS), attention "
               f"[{s.kernel}: {attn.words}], SwiGLU 3BSI*e, the adapters' inputs and B*S*r intermediates"
               + (f", lora_dropout {lora.dropout} copies and masks" if lora.dropout > 0 else ""))
    return Activations(saved, forward_peak + kept_inputs, max(bwd_start, norm_bwd, mlp_bwd), saved // max(s.L, 1),
                       formula, loop_held=out.input_ids + FP32 + kept_inputs, backward_first_hook=first_hook,
                       forward_in_layer=in_layer + kept_inputs if in_layer else 0,
                       last_block_end=0 if q.checkpointing else last_block_end)


def _lora_last_block_end(s: _Sizes, attn: _Attention, lora: LoraQuery, layers: int, out: _Outside, positions: int) -> int:
    """Activations when the last decoder layer's forward returns (no checkpointing): every layer's
    saved tensors (and cache copies), the loop's ids and last loss, the position ids, cos and sin,
    eager's causal mask, ``LlamaModel.forward``'s ``inputs_embeds`` local (the frozen embedding's
    output, saved by nothing), the layer's output, and its input where nothing saves it as it is
    (its input_layernorm saves the fp32 input: that input itself in fp32, where it requires grad).
    Traced on the 2-rank FSDP2 LoRA run of tests/test_fsdp2.py (fp32, sdpa): within 1 KB."""
    grad = False  # the embedding's output needs no grad
    for layer in range(s.L - 1):
        grad = _lora_layer(s, attn, lora, lora.targets(layer), grad)[1]
    last_input = 0 if s.L == 1 or (grad and s.e == FP32) else s.BSH * s.e
    mask = s.B * s.S * s.S * s.e if s.kernel == "eager" else 0
    return layers + out.input_ids + FP32 + positions + out.rotary + mask + 2 * s.BSH * s.e + last_input

def llama_activations(shape: Any, q: ActivationQuery) -> Activations | None:
    """Activation memory of a Llama-family causal LM for one micro-batch (module docstring), or
    None where it is not modelled: an MLP activation other than SiLU, or a sequence longer than a
    sliding attention window (the mask then materialises and sdpa changes kernel; not traced).
    ``shape`` is a Llama-family :class:`memprof.estimate.model_shapes.ModelShape`."""
    if (shape.hidden_act or "silu") != "silu":
        return None
    if shape.sliding_window is not None and q.seq_len > shape.sliding_window:
        return None
    s = _sizes(shape, q)
    attn = _attention(s)
    if q.lora is not None:
        return _lora_activations(s, q, attn, q.lora)
    per_layer = _per_layer(s, attn)
    out = _outside(s, attn)
    saved, forward_peak, recomputed = _forward(s, q, per_layer, attn, out)
    # backward's start: nll_loss_backward and _log_softmax_backward_data outputs (B*S*V*4 each),
    # shift_labels released, the loss and its gradient seed alive
    bwd_start = saved + _loss_backward(s) - out.shift_labels + 2 * FP32
    first_hook, block_moments, first, norm_bwd = _backward_first_hook(s, shape, attn, saved, recomputed, out)
    head_split = _head_split(shape, q, s.L, bwd_start, first, norm_bwd, block_moments)
    # block by block where the fetch order is LlamaForCausalLM's: then the last layer's in-layer
    # moment is no longer paired with the replay's highest state (an upper bound)
    in_blocks = _forward_in_blocks(shape, s, q, out)
    formula = (
        f"per layer = RMSNorms 2x(4BSH+4BS+BSH*e) + norm outputs 2BSH*e + SwiGLU 4BSI*e + attention "
        f"[{s.kernel}: {attn.words}]" + ("; KV cache copies of k, v per layer" if s.cache else "")
    )
    return Activations(saved, forward_peak, max(bwd_start, first_hook), per_layer, formula,
                       loop_held=out.input_ids + FP32, backward_first_hook=first_hook,  # the batch and the loss
                       # each block keeps its saved tensors (checkpointing: its input, BSH*e) until its backward
                       block_moments=with_rng_stash(block_moments, s.L, q),
                       block_kept=(s.BSH * s.e + rng_stash(q)) if q.checkpointing else per_layer,
                       later_grad_elements=_later_grads(shape),
                       forward_in_layer=0 if in_blocks else _in_layer_moment(s, q, attn, out) if q.checkpointing else 0,
                       forward_in_blocks=in_blocks, backward_head_split=head_split)


def _later_grads(shape: Any) -> tuple[int, ...]:
    """``Activations.later_grad_elements``: LlamaForCausalLM.parameters() is embed_tokens, the
    layers, model.norm, then lm_head unless tied (it is embed_tokens' tensor then, counted once
    and first). Full fine-tuning only."""
    if shape.trainable_mask is not None or shape.quantization is not None:
        return ()
    return later_grad_elements(shape.param_numels, shape.n_layer, 1, 1 if shape.tied_embeddings else 2)


def _head_split(shape: Any, q: ActivationQuery, layers: int, bwd_start: int, first: int, norm_bwd: int,
                block_moments: tuple[tuple[int, int], ...]) -> tuple[int, int, int]:
    """Activations.backward_head_split: (backward's start, lm_head.weight's hook: an untied head's
    grad_W formed, the loss gradients and log_softmax's output gone (_backward_first_hook's
    ``first``), the final norm's backward and the last layer's in-block moments); backward's start
    and after the head with every checkpoint's CPU RNG stash (common.rng_stash). Untied only: a
    tied head's first hook is model.norm's, after lm_head's backward."""
    if shape.tied_embeddings or not block_moments:
        return ()
    stashes = layers * rng_stash(q)
    return (bwd_start + stashes, first + stashes, max(norm_bwd, *(m for m, _ in block_moments)) + stashes)


def _block_fetch_positions(shape: Any) -> tuple[tuple[int, int], ...]:
    """Per layer, the positions in llama_fetch_modules' order of its self_attn.v_proj (the attention
    core, LlamaAttention.forward: rotary, repeat_kv, the scores, runs after v_proj's fetch and
    release, before o_proj's fetch) and of its mlp.up_proj (LlamaMLP.forward: ``down_proj(act_fn(
    gate_proj(x)) * up_proj(x))``: the product is formed after up_proj's forward, before down_proj's
    fetch); () where the shape's fetch order is not that layout (a bare count, another family)."""
    fetch, L = shape.fetch_modules, shape.n_layer or 0
    if fetch is None or L == 0 or len(fetch) != 4 + 13 * L + 2:
        return ()
    out = []
    for layer in range(L):
        m = 4 + 13 * layer  # the layer's own (parameter-less) module; then the 12 of llama_fetch_modules
        v, up = m + 5, m + 11
        if fetch[m] != () or fetch[m + 2] != () or fetch[m + 8] != () or fetch[m + 10] != () or not fetch[v] or not fetch[up]:
            return ()
        out.append((v, up))
    return tuple(out)


def _forward_in_blocks(shape: Any, s: _Sizes, q: ActivationQuery, out: _Outside) -> tuple[tuple[int, int], ...]:
    """Activations.forward_in_blocks under checkpointing: layer i's MLP product moment (and eager
    attention's scores moment) are the last layer's (_in_layer_moment) less the L-1-i layer inputs
    not made yet (non-reentrant torch/utils/checkpoint.py keeps each layer's input only), plus the
    CPU RNG states the i+1 checkpoints so far stashed (common.rng_stash). The attention moment is
    modelled for eager attention only (sdpa's kernels: not traced), as in _forward."""
    if not q.checkpointing or q.lora is not None:
        return ()
    positions = _block_fetch_positions(shape)
    if not positions:
        return ()
    mask = s.B * s.S * s.S * s.e if s.kernel == "eager" else 0
    layer_base = out.input_ids + s.S * INT64 + out.rotary + mask + s.L * s.BSH * s.e
    mlp = layer_base + 2 * s.BSH * s.e + 3 * s.BSI * s.e
    eager = layer_base + s.BSH * s.e + s.BSQ * s.e + 2 * s.BSK * s.e + s.eager_core
    moments = []
    for i, (v, up) in enumerate(positions):
        less = (s.L - 1 - i) * s.BSH * s.e - (i + 1) * rng_stash(q)
        if s.kernel == "eager":
            moments.append((v, eager - less))
        moments.append((up, mlp - less))
    return tuple(moments)


def _in_layer_moment(s: _Sizes, q: ActivationQuery, attn: _Attention, out: _Outside) -> int:
    """With checkpointing, the last layer's widest forward moment (_forward's in-layer moments: its
    MLP, or eager attention's scores), every layer's input kept."""
    mask = s.B * s.S * s.S * s.e if s.kernel == "eager" else 0
    layer_base = out.input_ids + s.S * INT64 + out.rotary + mask + s.L * s.BSH * s.e
    moments = [layer_base + 2 * s.BSH * s.e + 3 * s.BSI * s.e]
    if s.kernel == "eager":
        moments.append(layer_base + s.BSH * s.e + s.BSQ * s.e + 2 * s.BSK * s.e + s.eager_core)
    return max(moments)


FAMILY = ModelFamily(
    name="Llama family",
    hf_classes={
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    },
    positions_field="max_position_embeddings",
    train_mode="no dropout: attention_dropout 0",
    check_launchable=check_launchable,
    vocab_size=lambda config: _config_default(config, "vocab_size"),
    max_positions=lambda config: int(_config_default(config, "max_position_embeddings")),
    default_special_token_id=None,  # LlamaConfig / MistralConfig: 1, 2; Qwen2Config: None
    shape_fields=llama_shape_fields,
    activations=llama_activations,
    param_modules=llama_param_modules,
    lora_default_targets=("q_proj", "v_proj"),
)
