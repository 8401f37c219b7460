"""Model presets as plain HF-config dicts (no torch, no transformers import, no hub).

Both the launcher (which builds the HF causal-LM class from them) and the estimator (which counts
parameters in closed form) read these, so a preset means the same model everywhere.

Families: GPT-2 (``GPT2LMHeadModel``) and the Llama family, ``model_type`` ``llama``
(``LlamaForCausalLM``), ``mistral`` (``MistralForCausalLM``) and ``qwen2`` (``Qwen2ForCausalLM``),
one file each under memprof/families/, which the launcher's checks here consult. The real
Llama-family shapes are the published ``config.json`` values of the named checkpoints
(architecture fields only; random init, nothing is downloaded).
"""

from __future__ import annotations

import os
from typing import Any

from memprof.errors import MemprofError
from memprof.families import SUPPORTED_MODEL_TYPES, family_of, gpt2, llama
from memprof.jsonfile import read_json_object

# Per-family knowledge (HF classes, config defaults and checks, shapes, activations) lives in one file
# per family under memprof/families/; these names stay importable from here.
GPT2_FAMILY = gpt2.FAMILY.model_types
LLAMA_FAMILY = llama.LLAMA_FAMILY
LLAMA_FAMILY_DEFAULTS = llama.LLAMA_FAMILY_DEFAULTS
llama_family_fields = llama.llama_family_fields

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


def validate_launchable(config: dict[str, Any], name: str) -> None:
    """Check that the launcher can build and feed ``config`` (a preset or an HF config.json):
    a supported family (one with a file in memprof/families/; other families are refused, naming
    the supported ones), a consistent shape (the family's ``check_launchable``), and a vocabulary of
    at least 256 tokens (the training data are raw bytes, memprof/train/data.py). MemprofError
    naming the problem otherwise."""
    model_type = config.get("model_type", "gpt2")
    where = f"model config {name}"
    family = family_of(model_type)
    if family is None:
        raise MemprofError(
            f"{where} has model_type {model_type!r}: the launcher builds {', '.join(SUPPORTED_MODEL_TYPES)} models only"
        )
    family.check_launchable(config, where)
    if config.get("quantization_config") is not None:
        # the launcher builds the model from its config, unquantized; its run's estimate would read
        # the quantization_config and model a 4-bit base that was never built
        raise MemprofError(f"{where} has a quantization_config: the launcher trains unquantized models only "
                           "(a 4-bit QLoRA base is estimated by memprof estimate / plan / advise, not launched)")
    vocab = family.vocab_size(config)
    # Tokens are raw UTF-8 bytes (ids 0..255), so the embedding table needs at least 256 rows.
    if not isinstance(vocab, int) or vocab < 256:
        raise MemprofError(f"{where} has vocab_size {vocab!r}: byte-level tokens need vocab_size >= 256")


def max_positions(config: dict[str, Any]) -> tuple[str, int]:
    """(field name, value) of the longest sequence the model takes, as its family reads it: GPT-2's
    ``n_positions`` (default 1024), the Llama family's ``max_position_embeddings`` (default per
    family). A config without a family reads as GPT-2's (validate_launchable refuses it first)."""
    family = family_of(config.get("model_type", "gpt2")) or gpt2.FAMILY
    return family.positions_field, family.max_positions(config)
