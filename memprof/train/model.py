"""Build the model from a config dict, randomly initialised, no hub: the HF causal-LM class its
family names (memprof/families/: ``GPT2LMHeadModel`` for ``model_type`` gpt2,
``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` for the Llama family;
memprof.models.validate_launchable has refused every other family)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from memprof.families import SUPPORTED_MODEL_TYPES, family_of
from memprof.run.facts import count_parameters  # noqa: F401 - its home is memprof.run.facts; importable here too


def model_classes(model_type: str) -> tuple[type, type]:
    """(config class, causal-LM class) of a supported ``model_type``: the transformers classes its
    family file names (``ModelFamily.hf_classes``).

    Importing them is what ZeRO-3's ``deepspeed.zero.Init`` must not see: importing a transformers
    model module inside it fails on torch 2.13 (torch._dynamo's polyfills check
    ``torch.Tensor.__new__``, which ``zero.Init`` replaced: "TypeError: Signature mismatch ...
    tensor_pynew"), so :func:`build_model` resolves the classes before entering any context.
    (Reading an attribute of transformers' lazy top-level module imports the model module.)"""
    family = family_of(model_type)
    if family is None:
        raise ValueError(f"model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    import transformers

    config_name, model_name = family.hf_classes[model_type]
    return getattr(transformers, config_name), getattr(transformers, model_name)


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
    family = family_of(model_type)
    vocab_size = int(family.vocab_size(config_dict))
    for key in ("bos_token_id", "eos_token_id"):
        # GPT2Config defaults these to 50256 (the family's default_special_token_id), outside a
        # small preset's vocabulary (gpt2-tiny has 512 tokens); training never generates, so the
        # last id serves and silences HF's warning.
        value = config_dict.get(key, family.default_special_token_id)
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


def wrap_with_peft(model: torch.nn.Module, adapter_config: dict[str, Any]) -> torch.nn.Module:
    """``peft.get_peft_model`` with the LoraConfig of an adapter_config.json object (its LoraConfig
    fields; ``peft_type``, versions and the like dropped), before ``deepspeed.initialize``.

    get_peft_model freezes every base parameter, adds lora_A / lora_B to each target and, when the
    model has gradient checkpointing on (``is_gradient_checkpointing``), calls
    ``enable_input_require_grads`` (peft_model.py ``PeftModel.__init__`` ->
    ``_prepare_model_for_gradient_checkpointing``) so the embedding output requires grad."""
    import dataclasses

    from peft import LoraConfig, get_peft_model

    names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    kwargs = {k: v for k, v in adapter_config.items() if k in names and k not in ("peft_type", "revision")}
    peft_model = get_peft_model(model, LoraConfig(**kwargs))
    peft_model.train()
    return peft_model
