"""PEFT's ``adapter_config.json`` (what ``LoraConfig.save_pretrained`` writes), read once: the LoRA
settings that change memory, as a :class:`LoraSetup`, or a one-line MemprofError naming what
memprof does not model.

Modelled (peft 0.21.2, ``peft/tuners/lora/config.py`` LoraConfig): ``r``, ``target_modules`` (a
list, a regex fully matched against the module's name, or ``"all-linear"``), ``exclude_modules``,
``modules_to_save``, ``bias`` (none / all / lora_only), ``lora_dropout``; ``lora_alpha``,
``use_rslora`` and the initialisation choices (``init_lora_weights``, ``loftq_config``, ...) only
scale or initialise the same tensors (no bytes). Refused: other PEFT types (prefix tuning, IA3,
...), DoRA, QA-LoRA, a LoRA bias, per-module ranks (``rank_pattern``), ``layers_to_transform``,
``layer_replication``, ``target_parameters``, ``trainable_token_indices``, ``inference_mode``.

Torch-free and peft-free: the estimator imports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from memprof.errors import MemprofError

ALL_LINEAR = "all-linear"  # peft's INCLUDE_LINEAR_LAYERS_SHORTHAND
BIAS_MODES = ("none", "all", "lora_only")

# option -> (the value that means "off", why it is refused when on)
_UNMODELLED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (use_dora) is not modelled"),
    "use_qalora": (False, "QA-LoRA (use_qalora) is not modelled"),
    "lora_bias": (False, "a LoRA bias on lora_B (lora_bias) is not modelled"),
    "rank_pattern": ({}, "per-module ranks (rank_pattern) are not modelled"),
    "layers_to_transform": (None, "layers_to_transform is not modelled"),
    "layer_replication": (None, "layer_replication is not modelled"),
    "target_parameters": (None, "target_parameters (LoRA on nn.Parameter) is not modelled"),
    "trainable_token_indices": (None, "trainable_token_indices is not modelled"),
    "megatron_config": (None, "megatron_config is not modelled"),
    "use_bdlora": (None, "use_bdlora is not modelled"),
    "alora_invocation_tokens": (None, "aLoRA (alora_invocation_tokens) is not modelled"),
    "arrow_config": (None, "arrow_config is not modelled"),
    "monteclora_config": (None, "monteclora_config is not modelled"),
    "inference_mode": (False, "inference_mode true: nothing trains"),
}


@dataclass(frozen=True)
class LoraSetup:
    """The LoRA settings that change memory (hashable: part of EstimateInputs)."""

    r: int = 8
    # a tuple of names (a module matches one when its name equals it or ends with "." + it), or
    # one regex string fully matched against the name, or "all-linear"
    target_modules: tuple[str, ...] | str = ()
    exclude_modules: tuple[str, ...] | str = ()
    modules_to_save: tuple[str, ...] = ()
    bias: str = "none"
    lora_dropout: float = 0.0
    source: str = "--lora-r / --lora-target-modules"

    def describe(self) -> str:
        targets = self.target_modules if isinstance(self.target_modules, str) else ",".join(self.target_modules)
        extra = f", modules_to_save {','.join(self.modules_to_save)}" if self.modules_to_save else ""
        return (f"LoRA r={self.r} on {targets} (lora_dropout {self.lora_dropout}, bias {self.bias}{extra}; "
                f"from {self.source})")

    def to_json(self) -> dict[str, Any]:
        """The adapter_config.json keys this setup stands for (what a run records)."""
        return {"peft_type": "LORA", "r": self.r,
                "target_modules": self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules),
                "exclude_modules": (self.exclude_modules if isinstance(self.exclude_modules, str)
                                    else list(self.exclude_modules) or None),
                "modules_to_save": list(self.modules_to_save) or None, "bias": self.bias,
                "lora_dropout": self.lora_dropout}


def read_peft_config(path: str | os.PathLike) -> LoraSetup:
    """The adapter_config.json at ``path`` (a file, or the folder save_pretrained wrote)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        p = os.path.join(p, "adapter_config.json")
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise MemprofError(f"--peft-config {p}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise MemprofError(f"--peft-config {p}: not JSON ({e.msg}, line {e.lineno})") from None
    return lora_setup_from_dict(data, source=p)


def lora_setup_from_dict(data: Any, source: str = "adapter config") -> LoraSetup:
    """A LoraSetup from adapter_config.json's dict (also what a run records); MemprofError, one
    line naming the key, for anything not modelled or malformed."""
    if not isinstance(data, dict):
        raise MemprofError(f"{source}: must be a JSON object (PEFT's adapter_config.json)")
    peft_type = str(data.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise MemprofError(f"{source}: peft_type {data.get('peft_type')!r} is not modelled (only LORA)")
    for key, (off, why) in _UNMODELLED.items():
        value = data.get(key, off)
        if value not in (off, None, False, {}, []):
            raise MemprofError(f"{source}: {why} ({key} = {value!r})")
    r = data.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise MemprofError(f"{source}: r = {r!r} must be a positive whole number")
    dropout = data.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise MemprofError(f"{source}: lora_dropout = {dropout!r} must be a number in [0, 1)")
    bias = data.get("bias", "none")
    if bias not in BIAS_MODES:
        raise MemprofError(f"{source}: bias = {bias!r} is not one of {', '.join(BIAS_MODES)}")
    targets = _names(data.get("target_modules"), "target_modules", source)
    if not targets:
        raise MemprofError(f"{source}: target_modules is empty (name the modules LoRA wraps, or \"all-linear\")")
    saved = _names(data.get("modules_to_save"), "modules_to_save", source)
    if isinstance(saved, str):
        saved = (saved,)
    return LoraSetup(r=r, target_modules=targets, exclude_modules=_names(data.get("exclude_modules"), "exclude_modules", source),
                     modules_to_save=saved, bias=bias, lora_dropout=float(dropout), source=source)


def _names(value: Any, key: str, source: str) -> tuple[str, ...] | str:
    if value is None:
        return ()
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(sorted(set(value)))  # peft keeps a set
    raise MemprofError(f"{source}: {key} = {value!r} must be a list of module names or one regex string")


def lora_setup_from_flags(r: int | None, target_modules: str | None, base: LoraSetup | None = None) -> LoraSetup | None:
    """``--lora-r N`` / ``--lora-target-modules a,b`` over ``--peft-config``'s setup (or alone: a
    quick what-if, LoRA's defaults otherwise). None when neither flag nor file is given."""
    if r is None and target_modules is None:
        return base
    if r is not None and (not isinstance(r, int) or r <= 0):
        raise MemprofError(f"--lora-r {r!r} must be a positive whole number")
    out = base or LoraSetup()
    if r is not None:
        out = LoraSetup(r, out.target_modules, out.exclude_modules, out.modules_to_save, out.bias, out.lora_dropout,
                        out.source if base else "--lora-r / --lora-target-modules")
    if target_modules is not None:
        names = tuple(t.strip() for t in target_modules.split(",") if t.strip())
        if not names:
            raise MemprofError("--lora-target-modules is empty: name modules, e.g. q_proj,v_proj, or all-linear")
        targets: tuple[str, ...] | str = ALL_LINEAR if names == (ALL_LINEAR,) else tuple(sorted(set(names)))
        out = LoraSetup(out.r, targets, out.exclude_modules, out.modules_to_save, out.bias, out.lora_dropout, out.source)
    if not out.target_modules:
        raise MemprofError("--lora-r needs target modules: add --lora-target-modules (e.g. q_proj,v_proj or all-linear) "
                           "or --peft-config")
    return out
