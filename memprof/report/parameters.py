"""Trainable and frozen parameters of a run, and its adapter config, as plain data (issue 16).

What a run records (memprof.run.facts.peft_facts, written by the launcher and the integrations):
``peft_config`` (the active adapter's config as adapter_config.json writes it) and
``n_trainable_params`` / ``n_frozen_params`` (``requires_grad``; ZeRO-3 placeholders counted by
``ds_numel``). What the estimate records for LoRA: the same two counts from
``ModelShape.trainable_mask`` (memprof.estimate.result.Estimate.to_json). Neither records bytes
split into trainable and frozen: the ``params`` category holds both, measured and estimated, so
the page shows counts and says that bytes are not split.
"""

from __future__ import annotations

from typing import Any

from memprof.units import is_positive_int

BYTES_NOT_SPLIT = ("bytes are not split: the run records trainable and frozen parameter counts only, and "
                   "the params category (measured and estimated) holds frozen and trainable parameters together")


def _count(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _targets(value: Any) -> str:
    if isinstance(value, str):
        return value if value == "all-linear" else f"modules matching {value!r}"
    if isinstance(value, list) and value:
        return ", ".join(str(v) for v in value)
    return "?"


def adapter_summary(cfg: Any) -> dict[str, Any] | None:
    """The adapter config's memory-relevant fields and one line of words; None without one."""
    if not isinstance(cfg, dict):
        return None
    kind = str(cfg.get("peft_type") or "?")
    r, alpha, dropout = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("lora_dropout")
    targets = _targets(cfg.get("target_modules"))
    extra = [f"{k} {_targets(cfg[k])}" for k in ("exclude_modules", "modules_to_save") if cfg.get(k)]
    words = (f"{'LoRA' if kind == 'LORA' else kind} r={r if r is not None else '?'}"
             f"{'' if alpha is None else f', alpha {alpha}'} on {targets}, dropout {dropout if dropout is not None else '?'}, "
             f"bias {cfg.get('bias', '?')}" + "".join(f", {e}" for e in extra))
    return {"type": kind, "r": r, "lora_alpha": alpha, "targets": targets, "dropout": dropout,
            "bias": cfg.get("bias"), "modules_to_save": cfg.get("modules_to_save"),
            "exclude_modules": cfg.get("exclude_modules"), "words": words}


def adapter_short(run: dict[str, Any]) -> str | None:
    """The adapters in a run's one-line label: ``LoRA r=4 on c_attn``."""
    a = adapter_summary(run.get("peft_config"))
    if a is None:
        return None
    return f"{'LoRA' if a['type'] == 'LORA' else a['type']} r={a['r']} on {a['targets']}"


def _split(trainable: int | None, frozen: int | None) -> dict[str, Any] | None:
    if trainable is None or frozen is None:
        return None
    total = trainable + frozen
    return {"trainable": trainable, "frozen": frozen, "total": total,
            "trainable_share": trainable / total if total else None}


def parameters_data(run: dict[str, Any], estimate: dict[str, Any] | None) -> dict[str, Any]:
    """Parameter counts: the run's total, its recorded trainable / frozen split, the estimate's
    split (LoRA only), the adapter config; ``bytes_note`` says why no bytes are split."""
    est = estimate or {}
    recorded = _split(_count(run.get("n_trainable_params")), _count(run.get("n_frozen_params")))
    estimated = _split(_count(est.get("n_trainable_params")), _count(est.get("n_frozen_params")))
    n_params = run.get("n_params") if is_positive_int(run.get("n_params")) else (
        est.get("n_params") if is_positive_int(est.get("n_params")) else None)
    adapter = adapter_summary(run.get("peft_config"))
    split = recorded is not None or estimated is not None
    return {
        "n_params": n_params,
        "recorded": recorded,
        "estimated": estimated,
        "adapter": adapter,
        "split": split,  # False: no adapter config and no frozen parameter recorded
        "bytes_note": BYTES_NOT_SPLIT if split else None,
    }


def parameters_words(p: dict[str, Any]) -> str | None:
    """The summary's "Parameters" value: the total, with the trainable / frozen split when recorded."""
    n = p["n_params"]
    total = None if n is None else f"{int(n):,}"
    split = p["recorded"] or p["estimated"]
    if split is None:
        return total
    where = "recorded" if p["recorded"] else "estimated"
    total = total or f"{split['total']:,}"
    return f"{total} ({split['trainable']:,} trainable, {split['frozen']:,} frozen; {where})"
