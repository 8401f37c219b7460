"""Build the model: HF ``GPT2LMHeadModel`` from a config dict, randomly initialised, no hub."""

from __future__ import annotations

from typing import Any

import torch


def build_model(model_config: dict[str, Any], seed: int, activation_checkpointing: bool = False) -> torch.nn.Module:
    """A fresh ``GPT2LMHeadModel`` with random weights drawn from ``seed``.

    Every rank seeds identically, so all ranks start from the same weights even before DeepSpeed
    broadcasts them (ZeRO-3 partitions without broadcasting).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config_dict = dict(model_config)
    vocab_size = int(config_dict.get("vocab_size", 50257))
    for key in ("bos_token_id", "eos_token_id"):
        # GPT2Config defaults these to 50256, outside a small preset's vocabulary (gpt2-tiny has
        # 512 tokens); training never generates, so the last id serves and silences HF's warning.
        if int(config_dict.get(key, 50256)) >= vocab_size:
            config_dict[key] = vocab_size - 1
    config = GPT2Config.from_dict(config_dict)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    # Name the loss HF would pick anyway (next-token cross-entropy) so it does not warn each run.
    model.loss_type = "ForCausalLM"
    if activation_checkpointing:
        # use_reentrant=False: the non-reentrant torch checkpoint works with inputs that need no
        # grad (token ids) and is what current PyTorch recommends.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters: ``model.parameters()`` yields a tied weight (wte / lm_head) once."""
    return sum(p.numel() for p in model.parameters())
