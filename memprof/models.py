"""Model presets as plain HF-config dicts (no torch, no transformers import, no hub).

Both the launcher (which builds the HF causal-LM class from them) and the estimator (which counts
parameters in closed form) read these, so a preset means the same model everywhere.

Families: GPT-2 (``GPT2LMHeadModel``) and the Llama family, ``model_type`` ``llama``
(``LlamaForCausalLM``), ``mistral`` (``MistralForCausalLM``) and ``qwen2`` (``Qwen2ForCausalLM``).
The real Llama-family shapes are the published ``config.json`` values of the named checkpoints
(architecture fields only; random init, nothing is downloaded).
"""

from __future__ import annotations

import os
from typing import Any

from memprof.errors import MemprofError
from memprof.jsonfile import read_json_object
from memprof.units import is_positive_int

GPT2_FAMILY = ("gpt2",)
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = GPT2_FAMILY + LLAMA_FAMILY

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

_GPT2_BASE: dict[str, Any] = {
    "model_type": "gpt2",
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_inner": None,  # None means 4 * n_embd, as in HF GPT2Config
    "activation_function": "gelu_new",
    "tie_word_embeddings": True,
}

_LLAMA_2_BASE: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 32000, "hidden_act": "silu", "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
    "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
}

PRESETS: dict[str, dict[str, Any]] = {
    # tests: small enough for 2-3 CPU ranks in seconds; vocab >= 256 for byte-level tokens
    "gpt2-tiny": {
        **_GPT2_BASE, "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512, "n_positions": 256,
        "bos_token_id": 0, "eos_token_id": 0,  # GPT-2's 50256 lies outside this vocabulary
    },
    "gpt2": {**_GPT2_BASE, "n_layer": 12, "n_embd": 768, "n_head": 12},
    "gpt2-medium": {**_GPT2_BASE, "n_layer": 24, "n_embd": 1024, "n_head": 16},
    "gpt2-large": {**_GPT2_BASE, "n_layer": 36, "n_embd": 1280, "n_head": 20},
    "gpt2-xl": {**_GPT2_BASE, "n_layer": 48, "n_embd": 1600, "n_head": 25},
    # tests: grouped-query attention (4 query heads share 2 key/value heads), untied lm_head
    "llama-tiny": {
        **_LLAMA_2_BASE, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    },
    # tests: Qwen2's shape in small: tied embeddings, q/k/v biases (modeling_qwen2.py), GQA
    "qwen2-tiny": {
        "model_type": "qwen2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "tie_word_embeddings": True, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False, "attention_dropout": 0.0,
        "bos_token_id": 0, "eos_token_id": 0,
    },
    # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T config.json: 1,100,048,384 parameters
    "tinyllama-1.1b": {
        **_LLAMA_2_BASE, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
    },
    # meta-llama/Llama-2-7b-hf config.json: 6,738,415,616 parameters (multi-head: kv heads = heads)
    "llama-2-7b": {
        **_LLAMA_2_BASE, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    },
    # meta-llama/Llama-2-70b-hf config.json: 68,976,648,192 parameters (GQA, 8 kv heads)
    "llama-2-70b": {
        **_LLAMA_2_BASE, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 4096,
    },
    # Qwen/Qwen2-0.5B config.json: 494,032,768 parameters (tied, 151,936-token vocabulary)
    "qwen2-0.5b": {
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 131072, "max_window_layers": 24, "tie_word_embeddings": True,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "use_sliding_window": False,
        "sliding_window": 131072, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    },
}


def preset_config(name: str) -> dict[str, Any]:
    """The HF config dict of a preset; MemprofError for an unknown name."""
    if name not in PRESETS:
        raise MemprofError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)} or pass --model-config PATH")
    return dict(PRESETS[name])


def load_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """An HF ``config.json`` as a dict; MemprofError if missing or malformed."""
    return read_json_object(path, "model config", "pass an HF config.json")


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


def validate_launchable(config: dict[str, Any], name: str) -> None:
    """Check that the launcher can build and feed ``config`` (a preset or an HF config.json):
    a supported family (GPT-2 or llama/mistral/qwen2; other families are refused, naming the
    supported ones), a consistent shape, and a vocabulary of at least 256 tokens (the training
    data are raw bytes, memprof/train/data.py). MemprofError naming the problem otherwise."""
    model_type = config.get("model_type", "gpt2")
    where = f"model config {name}"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MemprofError(
            f"{where} has model_type {model_type!r}: the launcher builds {', '.join(SUPPORTED_MODEL_TYPES)} models only"
        )
    if model_type in LLAMA_FAMILY:
        fields = llama_family_fields(config, where)
        vocab = fields["vocab_size"]
    else:
        for key in ("n_layer", "n_embd", "n_head", "n_positions"):
            value = config.get(key, 1024) if key == "n_positions" else config.get(key)  # GPT2Config's default
            if not is_positive_int(value):
                raise MemprofError(f"{where} needs a positive integer {key!r} (got {value!r})")
        if config["n_embd"] % config["n_head"]:
            raise MemprofError(f"{where}: n_embd {config['n_embd']} is not divisible by n_head {config['n_head']}")
        vocab = config.get("vocab_size", 50257)
    # Tokens are raw UTF-8 bytes (ids 0..255), so the embedding table needs at least 256 rows.
    if not isinstance(vocab, int) or vocab < 256:
        raise MemprofError(f"{where} has vocab_size {vocab!r}: byte-level tokens need vocab_size >= 256")


def max_positions(config: dict[str, Any]) -> tuple[str, int]:
    """(field name, value) of the longest sequence the model takes: GPT-2's ``n_positions``
    (default 1024), the Llama family's ``max_position_embeddings`` (default per family)."""
    model_type = config.get("model_type", "gpt2")
    if model_type in LLAMA_FAMILY:
        field = "max_position_embeddings"
        return field, int(config.get(field, LLAMA_FAMILY_DEFAULTS[model_type][field]))
    return "n_positions", int(config.get("n_positions", 1024))
