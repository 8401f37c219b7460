"""A model's parameters once transformers 5.25 has loaded it in 4 bits with bitsandbytes 0.50.2
(``BitsAndBytesConfig(load_in_4bit=True)``, QLoRA's base): which Linear weights become packed
``Params4bit`` tensors and how many elements ``model.parameters()`` then yields for them.

From transformers' code:

* ``Bnb4BitHfQuantizer._process_model_before_weight_loading`` (quantizers/quantizer_bnb_4bit.py)
  takes ``get_modules_to_not_convert``: with ``llm_int8_skip_modules`` None,
  ``get_keys_to_not_convert`` (quantizers/base.py): the tied weights' modules, the last
  parameter's module and the output embedding (``get_output_embeddings``): the LM head, tied or
  not (the tied embedding is no Linear); with a list, those names only (the LM head is then
  quantized unless listed);
* ``replace_with_bnb_linear`` (integrations/bitsandbytes.py) swaps every ``nn.Linear`` and
  ``Conv1D`` not matched by ``should_convert_module`` (quantizers_utils.py: a name matched from
  its start up to a module boundary, as a regex, or as a suffix) for ``bnb.nn.Linear4bit``; its
  weight becomes ``Params4bit`` (bitsandbytes ``quantize_4bit``); a bias stays a plain parameter;
* the module's weight is a parameter of ``(n + 1) // (2 * itemsize)`` elements of
  ``quant_storage`` (memprof.quant_config); its ``QuantState`` tensors are no parameters.

LoRA (memprof.estimate.lora_shape) then wraps the quantized Linears as it wraps plain ones: the
adapters are shaped by the module's in/out features, not by the packed weight.
"""

from __future__ import annotations

import re
from typing import Any

from memprof.errors import MemprofError
from memprof.families.common import ModelFamily, ParamModule
from memprof.peft_config import LoraSetup
from memprof.quant_config import Bnb4bitSetup, packed_numel


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """transformers' ``should_convert_module`` negated: the module is left unconverted."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{key}){boundary}", name) or name.endswith(key) for key in patterns)


def quantized_modules(modules: tuple[ParamModule, ...], setup: Bnb4bitSetup, model_type: str) -> list[ParamModule]:
    """The Linear / Conv1D modules replace_with_bnb_linear turns into Linear4bit."""
    if setup.skip_modules is None:
        # get_keys_to_not_convert: tied keys, the last parameter's module, the output embedding
        last = modules[-1].name if modules else None
        return [m for m in modules if m.linear and not m.output_embedding and m.name != last]
    out = [m for m in modules if m.linear and not _skipped(m.name, setup.skip_modules)]
    shared = {i for m in modules for _, i in m.params if sum(i in dict(o.params).values() for o in modules) > 1}
    for m in out:
        if any(i in shared for _, i in m.params):
            raise MemprofError(f"{setup.source}: llm_int8_skip_modules leaves {m.name!r}, which shares its weight with "
                               f"another module (tied embeddings), to be quantized: not modelled for this {model_type} "
                               "model (skip it, or leave llm_int8_skip_modules null)")
    return out


def apply_bnb_4bit(fields: dict[str, Any], cfg: dict[str, Any], setup: Bnb4bitSetup, family: ModelFamily,
                   lora: LoraSetup | None) -> dict[str, Any]:
    """``ModelShape`` fields of the 4-bit model, before LoRA wraps it: each quantized weight's
    entry of ``param_numels`` becomes its packed element count; ``quantization`` and
    ``quantized_numels`` (each quantized weight's own element count) are set."""
    if family.param_modules is None:
        raise MemprofError(f"4-bit quantization of {family.name} models is not modelled")
    model_type = str(fields.get("model_type"))
    modules = family.param_modules(cfg)
    quantized = quantized_modules(modules, setup, model_type)
    if not quantized:
        raise MemprofError(f"{setup.source}: no Linear module of this {model_type} model is quantized")
    saved = lora.modules_to_save if lora is not None else ()
    numels = list(fields["param_numels"])
    logical: list[int] = []
    for m in quantized:
        if any(m.name == s or m.name.endswith("." + s) for s in saved):
            raise MemprofError(f"{lora.source if lora else setup.source}: modules_to_save {m.name!r} is a 4-bit Linear "
                               "(a trainable copy of a quantized module is not modelled)")
        i = dict(m.params)["weight"]
        logical.append(numels[i])
        numels[i] = packed_numel(numels[i], setup.storage_itemsize)
    out = dict(fields)
    out["param_numels"] = tuple(numels)
    out["quantization"] = setup
    out["quantized_numels"] = tuple(logical)
    return out
