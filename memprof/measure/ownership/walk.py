"""The ownership walk's entry point: which engine's walk applies, then the model and the torch
optimizers every engine holds.

An engine is detected from its optimizer wrapper (DeepSpeed's ZeRO / BF16 / FP16 wrappers,
``deepspeed.py``); anything else (plain torch, DDP) is walked as plain torch objects. Supporting
another engine means one module beside ``deepspeed.py`` whose detection and walk join
``_ENGINE_WALKS``.
"""

from __future__ import annotations

from typing import Any

import torch

from memprof.measure.ownership import deepspeed, fsdp2
from memprof.measure.ownership.core import Collector, Owned, Placement, StorageKey
from memprof.measure.ownership.plain_torch import (
    inner_torch_optimizers,
    input_batches_of,
    walk_input_batches,
    walk_module,
    walk_torch_optimizers,
)

# Each engine's walk of its optimizer wrapper: None when the wrapper is not that engine's.
_ENGINE_WALKS = (deepspeed.walk_optimizer_wrapper,)


def _compute_on_cpu(engine: Any, model: torch.nn.Module | None) -> bool:
    compute_device = getattr(engine, "device", None) if engine is not None else None
    if compute_device is None and model is not None:
        compute_device = next((p.device for p in model.parameters()), None)
    return compute_device is None or torch.device(compute_device).type == "cpu"


def owned_storages(engine: Any = None, *, model: torch.nn.Module | None = None,
                   optimizer: Any = None) -> dict[StorageKey, Owned]:
    """Every storage that the engine (or the model and optimizer) holds, with its owner.

    Pass a DeepSpeed engine, or a plain ``model`` and/or torch ``optimizer`` (or a DeepSpeed
    optimizer wrapper). Activations and ``other`` are not found here: they are what a tracker
    measures beyond these storages, except the input batches fed to ``model`` while a profiler
    records them (plain_torch.InputBatches): ``activations``.
    """
    if engine is not None:
        model = model if model is not None else getattr(engine, "module", None)
        optimizer = optimizer if optimizer is not None else getattr(engine, "optimizer", None)
    col = Collector(_compute_on_cpu(engine, model))

    placement = Placement({}, False)
    if optimizer is not None:
        for walk_wrapper in _ENGINE_WALKS:
            found = walk_wrapper(col, optimizer)
            if found is not None:
                placement = found
                break

    # The module after the optimizer's own buffers: with ZeRO-3 offload_param even persistent
    # params' partitions are views of the CPU flat buffer, whose location the optimizer walk set.
    # stage3.py: `offload_param` (bool) says non-persistent partitions live on the CPU.
    if model is not None:
        offloaded = fsdp2.walk_fsdp2(col, model)  # FSDP2's shards first: an offloaded shard is host
        if offloaded:  # ... and so is its optimizer state (CPUOffloadPolicy)
            placement = Placement({**placement.offloaded_by_id, **offloaded}, placement.default_offloaded)
        walk_module(col, model, bool(getattr(optimizer, "offload_param", False)))

    inner = inner_torch_optimizers(optimizer)
    basic = deepspeed.first_built_optimizer(engine, inner)
    if basic is not None:
        inner.append(basic)
    walk_torch_optimizers(col, inner, placement.offloaded_by_id, placement.default_offloaded)
    walk_input_batches(col, input_batches_of(model))
    return col.owned
