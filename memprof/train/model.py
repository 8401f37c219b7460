"""Build the model from a config dict, randomly initialised, no hub: HF ``GPT2LMHeadModel`` for
``model_type`` gpt2, ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` for the
Llama family (memprof.models.validate_launchable has refused every other family)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from memprof.models import LLAMA_FAMILY
from memprof.run.facts import count_parameters  # noqa: F401 - its home is memprof.run.facts; importable here too


def model_classes(model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) of a supported ``model_type``.

    Importing them is what ZeRO-3's ``deepspeed.zero.Init`` must not see: importing a transformers
    model module inside it fails on torch 2.13 (torch._dynamo's polyfills check
    ``torch.Tensor.__new__``, which ``zero.Init`` replaced: "TypeError: Signature mismatch ...
    tensor_pynew"), so :func:`build_model` resolves the classes before entering any context."""
    if model_type == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2Config, GPT2LMHeadModel
    if model_type == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaConfig, LlamaForCausalLM
    if model_type == "mistral":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralConfig, MistralForCausalLM
    if model_type == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2Config, Qwen2ForCausalLM
    raise ValueError(f"model_type {model_type!r} is not one of gpt2, {', '.join(LLAMA_FAMILY)}")


def build_model(
    model_config: dict[str, Any],
    seed: int,
    activation_checkpointing: bool = False,
    init_context: Any = None,
) -> torch.nn.Module:
    """A fresh causal LM with random weights drawn from ``seed``.

    Every rank seeds identically, so all ranks start from the same weights even before DeepSpeed
    broadcasts them (ZeRO-3 partitions without broadcasting). ``init_context`` (e.g.
    ``deepspeed.zero.Init(...)``) is entered around the construction only, after the model
    classes were imported (see :func:`model_classes`).
    """
    config_dict = dict(model_config)
    model_type = config_dict.get("model_type", "gpt2")
    config_cls, model_cls = model_classes(model_type)
    vocab_size = int(config_dict.get("vocab_size", 50257 if model_type == "gpt2" else 32000))
    for key in ("bos_token_id", "eos_token_id"):
        # GPT2Config defaults these to 50256, outside a small preset's vocabulary (gpt2-tiny has
        # 512 tokens); training never generates, so the last id serves and silences HF's warning.
        value = config_dict.get(key, 50256 if model_type == "gpt2" else None)
        if isinstance(value, int) and value >= vocab_size:
            config_dict[key] = vocab_size - 1
    config_dict.pop("model_type", None)
    config_dict.pop("architectures", None)
    config = config_cls.from_dict(config_dict)
    torch.manual_seed(seed)
    with init_context if init_context is not None else contextlib.nullcontext():
        model = model_cls(config)
    # Name the loss HF would pick anyway (next-token cross-entropy) so it does not warn each run.
    model.loss_type = "ForCausalLM"
    if activation_checkpointing:
        # use_reentrant=False: the non-reentrant torch checkpoint works with inputs that need no
        # grad (token ids) and is what current PyTorch recommends.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model
