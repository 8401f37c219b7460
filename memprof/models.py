"""GPT-2 model presets as plain HF-config dicts (no torch, no transformers import, no hub).

Both the launcher (which builds ``GPT2LMHeadModel`` from them) and the estimator (which counts
parameters in closed form) read these, so a preset means the same model everywhere.
"""

from __future__ import annotations

import os
from typing import Any

from memprof.errors import MemprofError
from memprof.jsonfile import read_json_object

_GPT2_BASE: dict[str, Any] = {
    "model_type": "gpt2",
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_inner": None,  # None means 4 * n_embd, as in HF GPT2Config
    "activation_function": "gelu_new",
    "tie_word_embeddings": True,
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
}


def preset_config(name: str) -> dict[str, Any]:
    """The HF config dict of a preset; MemprofError for an unknown name."""
    if name not in PRESETS:
        raise MemprofError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)} or pass --model-config PATH")
    return dict(PRESETS[name])


def load_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """An HF ``config.json`` as a dict; MemprofError if missing or malformed."""
    return read_json_object(path, "model config", "pass an HF config.json")
