"""The optimizer zoo memprof models: one row per optimizer, and nothing else lists optimizer names.

Every fact memprof knows about an optimizer lives in its :class:`Optimizer` row: how DeepSpeed's
``"optimizer"`` block spells it, which torch class (and kwargs) it is, whether DeepSpeed's ZeRO has
tested it, the state it keeps, the temporaries of its step. The config reader
(:mod:`memprof.dsconfig`), the estimator (:mod:`memprof.estimate.optimizers`), the launcher's checks
and the command line all read these rows. Plain Python: no torch import (the integrations hand
:func:`zoo_name_of_torch_optimizer` a torch optimizer and it reads class names and attributes only).

Sources, DeepSpeed 0.19.8 and torch 2.x:

* DeepSpeed spellings: ``runtime/config.py`` ``DEEPSPEED_OPTIMIZERS`` (matched after ``.lower()``:
  adam, adamw, adagrad, ...); any other ``"type"`` goes to ``getattr(torch.optim, type)`` in
  ``runtime/engine.py`` ``_configure_basic_optimizer``, which is case-sensitive (``SGD``,
  ``RMSprop``). DeepSpeed's ``Adam`` is AdamW unless ``adam_w_mode`` is false; Adam/AdamW are
  FusedAdam (DeepSpeedCPUAdam under optimizer offload) unless ``"torch_adam": true``
  (``engine.get_optimizer_configuration``); FusedAdam raises on ``amsgrad``.
* ZeRO-tested: ``runtime/zero/utils.py`` ``ZERO_SUPPORTED_OPTIMIZERS`` (torch Adam, AdamW, Adagrad,
  FusedAdam, DeepSpeedCPUAdam, ...); anything else needs ``"zero_allow_untested_optimizer": true``
  (``engine._do_optimizer_sanity_check``).
* State: ``torch/optim/{sgd,rmsprop,adagrad,adam,adamw}.py`` ``_init_group``: full-size tensors
  per parameter tensor, plus ``step`` as a 0-dim fp32 tensor for those that count steps
  (``_get_scalar_dtype()``); Adagrad creates its state in ``__init__``, the others in ``step()``.
* Step temporaries: the single-tensor loops (``_single_tensor_adam`` etc.), see
  :attr:`Optimizer.step_temporaries`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memprof.errors import MemprofError


@dataclass(frozen=True)
class Optimizer:
    """One optimizer of the zoo."""

    name: str
    """memprof's zoo name (run metadata, ``--optimizer``)."""
    deepspeed_type: str
    """The ``"type"`` a DeepSpeed ``optimizer`` block names it with (as the shipped configs write it)."""
    deepspeed_case_sensitive: bool
    """DeepSpeed hands the type to ``getattr(torch.optim, type)`` (not in DEEPSPEED_OPTIMIZERS)."""
    deepspeed_params: str
    """The ``optimizer.params`` that select this row among the rows of the same type."""
    torch_class: str
    """The torch.optim class DeepSpeed builds (with ``"torch_adam": true`` for Adam/AdamW)."""
    torch_spelling: str
    """The class with the kwargs that select this row, as the estimate's assumptions name it."""
    deepspeed_builds_its_own: bool
    """Without ``"torch_adam": true`` DeepSpeed builds FusedAdam / DeepSpeedCPUAdam instead of torch's."""
    zero_tested: bool
    """In ZERO_SUPPORTED_OPTIMIZERS: ZeRO stages 1-3 take it without ``zero_allow_untested_optimizer``."""
    state_names: tuple[str, ...]
    """Full-size state tensors per parameter tensor (torch ``_init_group``)."""
    has_step_tensor: bool
    """torch keeps ``state["step"]`` as a 4-byte tensor per parameter tensor."""
    lazy: bool
    """State created at the first ``step()``; False: in the constructor (Adagrad)."""
    step_temporaries: int
    """Parameter-sized temporaries one tensor's update holds at once in torch's single-tensor loop."""
    temporary_outlives_its_tensor: bool
    """The loop binds the temporary to a local rebound only on the next tensor (Adam's ``denom``,
    RMSprop's ``avg``, Adagrad's ``std``), so the previous tensor's is alive beside this one's."""
    note: str
    """What the state is, for the estimate's assumptions."""
    deepspeed_selecting_params: tuple[tuple[str, Any], ...] = ()
    """The ``optimizer.params`` entries that make DeepSpeed build this row's optimizer from
    ``deepspeed_type`` (what ``deepspeed_params`` says in words), for writing a config."""

    @property
    def states_per_param(self) -> int:
        return len(self.state_names)


ZOO: dict[str, Optimizer] = {o.name: o for o in (
    # sgd.py _single_tensor_sgd updates in place (param.add_(grad), buf.mul_(momentum).add_(grad))
    Optimizer(name="sgd", deepspeed_type="SGD", deepspeed_case_sensitive=True, deepspeed_params="momentum 0",
              torch_class="SGD", torch_spelling="SGD(momentum=0)", deepspeed_builds_its_own=False, zero_tested=False,
              state_names=(), has_step_tensor=False, lazy=True, step_temporaries=0, temporary_outlives_its_tensor=False,
              note="plain SGD keeps no state (momentum_buffer stays None)"),
    Optimizer(name="momentum", deepspeed_type="SGD", deepspeed_case_sensitive=True, deepspeed_params="momentum > 0",
              torch_class="SGD", torch_spelling="SGD(momentum>0)", deepspeed_builds_its_own=False, zero_tested=False,
              state_names=("momentum_buffer",), has_step_tensor=False, lazy=True, step_temporaries=0,
              temporary_outlives_its_tensor=False, note="momentum_buffer",
              deepspeed_selecting_params=(("momentum", 0.9),)),
    # nesterov: grad.add(buf, alpha=momentum), freed when the loop rebinds grad = grads[i] at its top
    Optimizer(name="nesterov", deepspeed_type="SGD", deepspeed_case_sensitive=True,
              deepspeed_params="momentum > 0, nesterov true, dampening 0", torch_class="SGD",
              torch_spelling="SGD(momentum>0, nesterov=True)", deepspeed_builds_its_own=False, zero_tested=False,
              state_names=("momentum_buffer",), has_step_tensor=False, lazy=True, step_temporaries=1,
              temporary_outlives_its_tensor=False, note="momentum_buffer",
              deepspeed_selecting_params=(("momentum", 0.9), ("nesterov", True))),
    # rmsprop.py _single_tensor_rmsprop: avg = square_avg.sqrt().add_(eps)
    Optimizer(name="rmsprop", deepspeed_type="RMSprop", deepspeed_case_sensitive=True,
              deepspeed_params="momentum 0, centered false", torch_class="RMSprop", torch_spelling="RMSprop",
              deepspeed_builds_its_own=False, zero_tested=False, state_names=("square_avg",), has_step_tensor=True,
              lazy=True, step_temporaries=1, temporary_outlives_its_tensor=True,
              note="square_avg and step (momentum=0, centered=False)"),
    # adagrad.py __init__ makes sum and step; _single_tensor_adagrad: std = state_sum.sqrt().add_(eps)
    Optimizer(name="adagrad", deepspeed_type="Adagrad", deepspeed_case_sensitive=False, deepspeed_params="",
              torch_class="Adagrad", torch_spelling="Adagrad", deepspeed_builds_its_own=False, zero_tested=True,
              state_names=("sum",), has_step_tensor=True, lazy=False, step_temporaries=1,
              temporary_outlives_its_tensor=True, note="sum and step, created in the constructor"),
    # adam.py _single_tensor_adam: denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps): the
    # sqrt output is alive while the division allocates
    Optimizer(name="adam", deepspeed_type="Adam", deepspeed_case_sensitive=False, deepspeed_params="adam_w_mode false",
              torch_class="Adam", torch_spelling="Adam", deepspeed_builds_its_own=True, zero_tested=True,
              state_names=("exp_avg", "exp_avg_sq"), has_step_tensor=True, lazy=True, step_temporaries=2,
              temporary_outlives_its_tensor=True, note="exp_avg, exp_avg_sq and step",
              deepspeed_selecting_params=(("adam_w_mode", False),)),
    Optimizer(name="adamw", deepspeed_type="AdamW", deepspeed_case_sensitive=False,
              deepspeed_params='"Adam" too, unless adam_w_mode is false', torch_class="AdamW", torch_spelling="AdamW",
              deepspeed_builds_its_own=True, zero_tested=True, state_names=("exp_avg", "exp_avg_sq"),
              has_step_tensor=True, lazy=True, step_temporaries=2, temporary_outlives_its_tensor=True,
              note="exp_avg, exp_avg_sq and step"),
    # only torch's Adam has AMSGrad (FusedAdam raises): the max goes into max_exp_avg_sq in place, then as Adam
    Optimizer(name="amsgrad", deepspeed_type="Adam", deepspeed_case_sensitive=False,
              deepspeed_params="amsgrad true, torch_adam true", torch_class="Adam", torch_spelling="Adam(amsgrad=True)",
              deepspeed_builds_its_own=False, zero_tested=True, state_names=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
              has_step_tensor=True, lazy=True, step_temporaries=2, temporary_outlives_its_tensor=True,
              note="exp_avg, exp_avg_sq, max_exp_avg_sq and step",
              deepspeed_selecting_params=(("amsgrad", True), ("torch_adam", True))),
)}


def deepspeed_optimizer_block(name: str, lr: float) -> dict[str, Any]:
    """A DeepSpeed ``optimizer`` block that builds zoo optimizer ``name`` (what a written config holds)."""
    row = ZOO[name]
    return {"type": row.deepspeed_type, "params": {"lr": lr, **dict(row.deepspeed_selecting_params)}}

OPTIMIZERS: tuple[str, ...] = tuple(ZOO)
"""The zoo names, in the table's order."""

DEEPSPEED_TYPES: tuple[str, ...] = tuple(dict.fromkeys(o.deepspeed_type for o in ZOO.values()))
"""The DeepSpeed ``"type"`` spellings the zoo covers (SGD, RMSprop, Adagrad, Adam, AdamW)."""

CASE_FREE_DEEPSPEED_TYPES: tuple[str, ...] = tuple(dict.fromkeys(
    o.deepspeed_type.lower() for o in ZOO.values() if not o.deepspeed_case_sensitive))
"""Types DeepSpeed lower-cases before matching (runtime/config.py DEEPSPEED_OPTIMIZERS)."""

TORCH_DEEPSPEED_TYPES: tuple[str, ...] = tuple(dict.fromkeys(
    o.deepspeed_type for o in ZOO.values() if o.deepspeed_case_sensitive))
"""Types DeepSpeed hands to ``getattr(torch.optim, type)``, case-sensitive."""

ZERO_TESTED_DEEPSPEED_TYPES: tuple[str, ...] = tuple(dict.fromkeys(
    o.deepspeed_type.lower() for o in ZOO.values() if o.zero_tested))
"""Types (lower case) whose optimizer is in ZERO_SUPPORTED_OPTIMIZERS."""

UNMODELLED_DEEPSPEED_TYPES: dict[str, str] = {
    # DeepSpeed types (and torch.optim classes) the zoo does not model: lower case, no "_"/"-" -> their name
    "lamb": "Lamb", "onebitadam": "1-bit Adam", "zerooneadam": "0/1 Adam", "onebitlamb": "1-bit Lamb",
    "lion": "Lion", "muon": "Muon", "muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD",
    "adamax": "Adamax", "adadelta": "Adadelta", "nadam": "NAdam", "radam": "RAdam", "lbfgs": "LBFGS",
}


def deepspeed_types_text(last: str = ", ") -> str:
    """The zoo's DeepSpeed types for messages: ``SGD, RMSprop, Adagrad, Adam, AdamW`` (``last``
    joins the final two, e.g. " or ")."""
    head, tail = DEEPSPEED_TYPES[:-1], DEEPSPEED_TYPES[-1]
    return f"{', '.join(head)}{last}{tail}"


# ---- naming a DeepSpeed "optimizer" block (memprof.dsconfig) --------------------------------------

# the types DeepSpeed builds its own Adam for (ADAM_OPTIMIZER, ADAMW_OPTIMIZER in engine.py)
_ADAM_TYPES = frozenset(o.deepspeed_type.lower() for o in ZOO.values() if o.deepspeed_builds_its_own)


def zoo_name_of_deepspeed_type(opt_type: str, params: Mapping[str, Any], source: str) -> str:
    """The zoo name DeepSpeed's ``{"type": opt_type, "params": params}`` block trains with
    (``engine._configure_basic_optimizer``; the type matched case-free, as the estimator reads
    it: the launcher's case-sensitivity is memprof.dsconfig.launch's). MemprofError naming
    ``source`` for what torch refuses or the zoo does not model."""
    kind = opt_type.lower()
    if kind in _ADAM_TYPES:
        # DeepSpeed's "Adam" means AdamW unless adam_w_mode is false (engine._configure_basic_optimizer)
        adam_w = kind == "adamw" or bool(params.get("adam_w_mode", True))
        return "amsgrad" if params.get("amsgrad") else ("adamw" if adam_w else "adam")
    if kind in {t.lower() for t in TORCH_DEEPSPEED_TYPES}:
        return _torch_type_name(kind, params, source)
    if kind in ZOO and ZOO[kind].deepspeed_type.lower() == kind:  # a type with one row (Adagrad)
        return kind
    supported = deepspeed_types_text(" or ")
    feature = UNMODELLED_DEEPSPEED_TYPES.get(kind.replace("_", "").replace("-", ""))
    if feature is not None:
        raise MemprofError(f"{source}: optimizer type {opt_type!r} ({feature}) is not modelled by memprof: use {supported}")
    raise MemprofError(f"{source}: unknown optimizer type {opt_type!r}, not modelled by memprof: use {supported}")


def _torch_type_name(kind: str, params: Mapping[str, Any], source: str) -> str:
    """The zoo name of DeepSpeed's torch.optim ``SGD`` / ``RMSprop`` block (``kind`` lower-cased):
    torch's kwargs pick the row; refuses what torch refuses or what memprof does not model."""
    momentum = config_number(params, "momentum", source)
    if momentum < 0:
        raise MemprofError(f"{source}: optimizer.params.momentum is {params.get('momentum')!r}: it must be 0 or more")
    if kind == "sgd":
        nesterov = bool(params.get("nesterov", False))  # torch.optim.SGD tests its truth value
        if nesterov and (momentum <= 0 or config_number(params, "dampening", source) != 0):
            # torch.optim.SGD: "Nesterov momentum requires a momentum and zero dampening"
            raise MemprofError(f"{source}: SGD with nesterov needs momentum > 0 and dampening 0 in optimizer.params")
        return "nesterov" if nesterov else ("momentum" if momentum > 0 else "sgd")
    if kind == "rmsprop":
        # momentum and centered add buffers (momentum_buffer, grad_avg) the zoo does not model.
        if momentum > 0 or params.get("centered", False):
            raise MemprofError(f"{source}: RMSprop with momentum or centered=true is not supported by memprof: drop them")
        return "rmsprop"
    raise ValueError(f"not a torch.optim type memprof maps: {kind!r}")


def config_number(params: Mapping[str, Any], key: str, source: str, default: float = 0.0) -> float:
    """A numeric optimizer setting (``momentum``, ``dampening``, ...) of ``optimizer.params``;
    MemprofError naming the field when it is not a finite number."""
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MemprofError(f"{source}: optimizer.params.{key} is {value!r}: it must be a number, e.g. 0.9")
    return float(value)


# ---- naming a torch optimizer instance (the integrations) ---------------------------------------

_DEEPSPEED_ADAM_CLASSES = ("FusedAdam", "DeepSpeedCPUAdam")


def zoo_name_of_torch_optimizer(optimizer: Any) -> str | None:
    """The zoo name of an optimizer object (torch.optim or DeepSpeed's Adam), or None when it is
    none of the zoo. Reads the class names along the MRO (subclasses count, as ``isinstance``
    would) and the constructor's settings (``defaults``, else the first param group)."""
    return torch_optimizer_facts(optimizer)["optimizer"] if _zoo_class(optimizer) else None


def torch_optimizer_facts(optimizer: Any) -> dict[str, Any]:
    """``{"optimizer": zoo name or class name, "torch_adam": bool[, "optimizer_implementation"]}``
    of an optimizer object: the run metadata the estimator reads back (memprof.estimate
    ``inputs_from_run``). ``torch_adam`` is true where torch's for-loop/foreach Adam runs (a step
    tensor per tensor and the update's temporaries); a fused torch Adam (``fused=True``, HF
    Trainer's ``adamw_torch_fused``) updates in one kernel as FusedAdam does."""
    cls = _zoo_class(optimizer)
    settings = _settings(optimizer)
    if cls in ("Adam", "AdamW"):
        if settings.get("amsgrad"):
            name = "amsgrad"
        else:  # torch 2.x Adam(decoupled_weight_decay=True) is AdamW
            name = "adamw" if cls == "AdamW" or settings.get("decoupled_weight_decay") else "adam"
        fused = bool(settings.get("fused"))
        return {"optimizer": name, "torch_adam": not fused or name == "amsgrad",
                "optimizer_implementation": "fused" if fused else ("foreach" if settings.get("foreach") else "default")}
    if cls == "SGD":
        momentum = float(settings.get("momentum", 0) or 0)
        return {"optimizer": "nesterov" if settings.get("nesterov") else ("momentum" if momentum > 0 else "sgd"),
                "torch_adam": False}
    if cls in ("RMSprop", "Adagrad"):
        return {"optimizer": cls.lower(), "torch_adam": False}
    if cls in _DEEPSPEED_ADAM_CLASSES:
        return {"optimizer": "adamw" if getattr(optimizer, "adam_w_mode", True) else "adam", "torch_adam": False}
    return {"optimizer": type(optimizer).__name__, "torch_adam": False}


def _zoo_class(optimizer: Any) -> str | None:
    """The first class along the MRO that the zoo knows (a torch class or DeepSpeed's Adam)."""
    known = {o.torch_class for o in ZOO.values()} | set(_DEEPSPEED_ADAM_CLASSES)
    for klass in type(optimizer).__mro__:
        if klass.__name__ in known and (klass.__name__ in _DEEPSPEED_ADAM_CLASSES or klass.__module__.startswith("torch.optim")):
            return klass.__name__
    return None


def _settings(optimizer: Any) -> Mapping[str, Any]:
    defaults = getattr(optimizer, "defaults", None)
    if isinstance(defaults, Mapping) and defaults:
        return defaults
    groups = getattr(optimizer, "param_groups", None)
    return groups[0] if isinstance(groups, list) and groups and isinstance(groups[0], Mapping) else {}
