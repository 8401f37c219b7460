"""Facts about a run that the launcher (:mod:`memprof.train.launched_run`) and the integrations
(:mod:`memprof.integrations.observed_run`) both record in its ``run`` dict, computed one way."""

from __future__ import annotations

import enum
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from memprof import __version__ as memprof_version


def count_nodes(environ: Mapping[str, str], world_size: int) -> int:
    """Distinct hosts (launcher nodes) in the run, from the launchers' environment.

    torchrun sets GROUP_WORLD_SIZE (agents = nodes) and the deepspeed launcher CROSS_SIZE; both
    count a node even when two "nodes" share one machine (127.0.0.1), which a hostname count
    would not. Without either, assume equal nodes of LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE
    (deepspeed) ranks; a plain ``python`` run is one node.
    """
    for key in ("GROUP_WORLD_SIZE", "CROSS_SIZE"):
        value = environ.get(key, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = environ.get(key, "")
        if value.isdigit() and int(value) >= 1:
            return max(1, -(-world_size // int(value)))
    return 1


def package_version(dist_name: str) -> str:
    """An installed distribution's version from its metadata (no import), or ``missing``."""
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return "missing"


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape memory, read from installed metadata (no imports)."""
    versions = {"memprof": memprof_version, "python": platform.python_version()}
    for dist in ("torch", "deepspeed", "transformers"):
        versions[dist] = package_version(dist)
    return versions


def cuda_device_facts(device_type: str) -> dict[str, str]:
    """The current GPU's name and compute capability ("9.0") on a CUDA run, for the estimator's
    cuBLAS workspace sizes; empty on any other device (torch.cuda is then never touched)."""
    if device_type != "cuda":
        return {}
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"cuda_device_name": torch.cuda.get_device_name(), "cuda_capability": f"{major}.{minor}"}


def count_parameters(model: Any) -> int:
    """Unique parameters of a ``torch.nn.Module``: ``model.parameters()`` yields a tied weight
    (embedding / lm_head) once; under ZeRO-3 (``zero.Init``) each parameter is an empty placeholder
    that keeps its full size as ``ds_numel`` (deepspeed/runtime/zero/partition_parameters.py)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def peft_facts(model: Any) -> dict[str, Any]:
    """What a run records about PEFT adapters on ``model`` (a ``peft.PeftModel``, found by duck
    typing, no peft import): ``peft_config``, the active adapter's config as adapter_config.json
    writes it (``PeftConfig.to_dict``, sets as sorted lists), which ``inputs_from_run`` reads back
    (memprof.peft_config.lora_setup_from_dict); and ``n_trainable_params`` / ``n_frozen_params``
    (requires_grad; ZeRO-3 placeholders counted by ``ds_numel``). Empty for a model without
    adapters, apart from the two counts when some parameter is frozen."""
    out: dict[str, Any] = {}
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and configs:
        name = getattr(model, "active_adapter", None)
        config = configs.get(name) if isinstance(name, str) and name in configs else next(iter(configs.values()))
        raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        out["peft_config"] = {k: _json_value(v) for k, v in raw.items()}
    trainable = frozen = 0
    for p in model.parameters():
        n = int(getattr(p, "ds_numel", p.numel()))
        if p.requires_grad:
            trainable += n
        else:
            frozen += n
    if out or frozen:
        out.update(n_trainable_params=trainable, n_frozen_params=frozen)
    return out


def _json_value(value: Any) -> Any:
    """A PeftConfig field as JSON (enum -> its value, set -> sorted list, anything else odd -> str)."""
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    # an Enum first: peft's PeftType / TaskType are `str` subclasses, which the str test below would
    # pass through as the enum itself (its str() is "PeftType.LORA", which no reader knows)
    if isinstance(value, enum.Enum):
        return _json_value(value.value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)
