"""A model's parameters once PEFT's ``get_peft_model`` has wrapped it with LoRA (peft 0.21.2): which
modules the adapter config targets, the adapter tensors it adds, where they fall in
``model.parameters()`` order, and which parameters train.

From peft's code:

* targets: ``tuners_utils.check_target_module_exists`` over ``model.named_modules()``: a list
  entry matches a module named exactly so or ending in ``"." + entry``; a string is a regex
  ``re.fullmatch``-ed against the name; ``exclude_modules`` and ``modules_to_save`` names win over
  targets; ``"all-linear"`` (``_maybe_include_all_linear_layers``) is every nn.Linear / Conv1D but
  the output embedding (``get_output_embeddings``);
* adapters: ``lora.Linear`` keeps the module as ``base_layer`` and registers, after it,
  ``lora_A.default`` = nn.Linear(in_features, r, bias=False) and ``lora_B.default`` =
  nn.Linear(r, out_features, bias=False) (``LoraLayer.update_layer``), so in ``parameters()`` a
  target's own weight and bias come first, then A (r*in) and B (out*r). Forward calls
  ``base_layer``, then ``lora_A``, then ``lora_B`` (``Linear.forward``): the ZeRO-3 fetch order;
* ``modules_to_save``: ``ModulesToSaveWrapper`` keeps the module (``original_module``, frozen)
  and a trainable deep copy (``modules_to_save.default``) that forward calls instead;
* trainable: ``_mark_only_adapters_as_trainable``: adapter weights; with ``bias="all"`` every
  parameter named ``bias``, with ``"lora_only"`` the targets' biases; everything else frozen.
"""

from __future__ import annotations

import re
from typing import Any

from memprof.errors import MemprofError
from memprof.families.common import ModelFamily, ParamModule
from memprof.peft_config import ALL_LINEAR, LoraSetup


def _matches(names: tuple[str, ...] | str, key: str) -> bool:
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == n or key.endswith("." + n) for n in names)


def _saved(lora: LoraSetup, key: str) -> bool:
    return any(key == m or key.endswith("." + m) for m in lora.modules_to_save)


def lora_targets(modules: tuple[ParamModule, ...], lora: LoraSetup, model_type: str) -> set[str]:
    """Names of the modules LoRA wraps; MemprofError naming a target the model does not have, or a
    target that is not a Linear / Conv1D."""
    excluded = {m.name for m in modules if (lora.exclude_modules and _matches(lora.exclude_modules, m.name))
                or _saved(lora, m.name)}
    if lora.target_modules == ALL_LINEAR:
        return {m.name for m in modules if m.linear and not m.output_embedding and m.name not in excluded}
    found = {m.name for m in modules if _matches(lora.target_modules, m.name)} - excluded
    linear_names = sorted({m.name.rsplit(".", 1)[-1] for m in modules if m.linear})
    if isinstance(lora.target_modules, str):
        if not found:
            raise MemprofError(f"{lora.source}: target_modules regex {lora.target_modules!r} matches no module of this "
                               f"{model_type} model (its Linear modules: {', '.join(linear_names)})")
    else:
        for name in lora.target_modules:
            if not any(_matches((name,), m.name) for m in modules):
                raise MemprofError(f"{lora.source}: target module {name!r} does not exist in this {model_type} model "
                                   f"(its Linear modules: {', '.join(linear_names)})")
    for m in modules:
        if m.name in found and not m.linear:
            raise MemprofError(f"{lora.source}: target module {m.name!r} is not a Linear layer (LoRA on it is not modelled)")
    for name in lora.modules_to_save:
        if not any(_saved(lora, m.name) and (m.name == name or m.name.endswith("." + name)) for m in modules):
            raise MemprofError(f"{lora.source}: modules_to_save {name!r} does not exist in this {model_type} model")
    return found


def apply_lora(fields: dict[str, Any], cfg: dict[str, Any], lora: LoraSetup, family: ModelFamily) -> dict[str, Any]:
    """``ModelShape`` fields of the PEFT-wrapped model: ``param_numels`` with the adapter tensors
    (and modules_to_save copies) inserted in ``parameters()`` order, ``trainable_mask``,
    ``fetch_modules`` remapped, and the adapters' shapes for the activation terms."""
    if family.param_modules is None:
        raise MemprofError(f"LoRA on {family.name} models is not modelled")
    modules = family.param_modules(cfg)
    model_type = str(fields.get("model_type"))
    targets = lora_targets(modules, lora, model_type)
    old = fields["param_numels"]
    numels: list[int] = []
    trainable: list[bool] = []
    new_index: dict[int, int] = {}  # original index -> its index in the wrapped model
    called: dict[int, tuple[int, ...]] = {}  # an original module's first param -> what forward fetches instead
    extra_fetch: dict[int, list[tuple[int, ...]]] = {}  # ... and what it fetches after it (lora_A, lora_B)
    adapters: list[tuple[int, int]] = []

    def emit(numel: int, trains: bool) -> int:
        numels.append(numel)
        trainable.append(trains)
        return len(numels) - 1

    for m in modules:
        is_target = m.name in targets
        own = [(pn, i) for pn, i in m.params if i not in new_index]
        for pn, i in own:
            bias_trains = pn == "bias" and (lora.bias == "all" or (lora.bias == "lora_only" and is_target))
            new_index[i] = emit(old[i], bias_trains)
        key = m.params[0][1]
        if _saved(lora, m.name):
            if len(own) < len(m.params) or any(i in dict(o.params).values() for o in modules if o is not m for _, i in m.params):
                raise MemprofError(f"{lora.source}: modules_to_save {m.name!r} shares its weight with another module "
                                   "(tied embeddings): not modelled")
            called[key] = tuple(emit(old[i], True) for _, i in m.params)
        if is_target:
            fan_in, fan_out = m.linear
            a = emit(lora.r * fan_in, True)
            b = emit(fan_out * lora.r, True)
            extra_fetch[key] = [(a,), (b,)]
            adapters.append((fan_in, fan_out))
    if not any(trainable):
        raise MemprofError(f"{lora.source}: no parameter trains")
    out = dict(fields)
    out["param_numels"] = tuple(numels)
    out["trainable_mask"] = tuple(trainable)
    out["lora_adapters"] = tuple(adapters)
    out["lora_targets"] = tuple(m.name for m in modules if m.name in targets)
    # the activation formulas model adapters on a frozen model (memprof.families.common.LoraQuery)
    out["lora_frozen_rest"] = lora.bias == "none" and not lora.modules_to_save
    out["lora_r"] = lora.r
    out["lora_dropout"] = lora.lora_dropout
    out["fetch_modules"] = _remapped_fetch(fields.get("fetch_modules"), new_index, called, extra_fetch)
    return out


def _remapped_fetch(fetch: tuple[tuple[int, ...], ...] | None, new_index: dict[int, int],
                    called: dict[int, tuple[int, ...]], extra_fetch: dict[int, list[tuple[int, ...]]]
                    ) -> tuple[tuple[int, ...], ...] | None:
    """The family's forward call order in the wrapped model's indices (peft 0.21.2): PeftModel's root
    first; a wrapped module becomes lora.Linear (no parameters of its own), its base_layer,
    lora_dropout.default (nn.Identity at 0: a module all the same), lora_A.default and
    lora_B.default (``Linear.forward``); a modules_to_save module becomes its wrapper and the
    trainable copy forward calls. A tied LM head fetches the embedding's weight again (the same
    entry twice): its adapters follow the last."""
    if fetch is None:
        return None
    out: list[tuple[int, ...]] = [()]  # PeftModelForCausalLM, the engine's root (LoraModel's hooks do not fire)
    last = {module: pos for pos, module in enumerate(fetch) if module}  # a module's last place in the order
    for pos, module in enumerate(fetch):
        if not module:  # a module without parameters of its own
            out.append(())
            continue
        key = module[0]
        adapters = extra_fetch.get(key, []) if last[module] == pos else []  # a tied pair's embedding entry gets none
        if key in called:  # ModulesToSaveWrapper, then its trainable copy
            out += [(), called[key]]
        elif adapters:  # lora.Linear, base_layer, lora_dropout.default, lora_A.default, lora_B.default
            out += [(), tuple(new_index[i] for i in module), (), *adapters]
        else:
            out.append(tuple(new_index[i] for i in module))
    return tuple(out)
