"""What the launcher records about a run it started: the ``run`` dict, from its own validated
settings (what was trained, how, and where). The estimator reads it to rebuild the run's own setup
(``memprof.estimate.inputs_from_run``) and every report shows it. A run memprof did not start is
described by :mod:`memprof.integrations.observed_run`, in the same keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.run.facts import cuda_device_facts, package_versions
from memprof.train.config import TrainConfig


@dataclass(frozen=True)
class DistributedFacts:
    """Facts about the process group, the same on every rank."""

    world_size: int
    nodes: int
    device_type: str
    """``cpu`` or ``cuda`` (the accelerator DeepSpeed picked)."""
    backend: str
    """``gloo`` or ``nccl`` (the torch.distributed backend in use)."""


def describe_launched_run(config: TrainConfig, dist: DistributedFacts, n_params: int) -> dict[str, Any]:
    """The ``run`` dict recorded in every rank file header and in memprof.json."""
    ds = config.deepspeed
    return {
        "model": config.model.name,
        "model_config": config.model.config,
        "n_params": n_params,
        "world_size": dist.world_size,
        "nodes": dist.nodes,
        "zero_stage": ds.zero_stage,
        "optimizer": ds.optimizer,
        "precision": ds.precision,
        "micro_batch": ds.micro_batch,
        "gradient_accumulation_steps": ds.gradient_accumulation_steps,
        "seq_len": config.data.seq_len,
        "steps": config.run.steps,
        "seed": config.data.seed,
        "activation_checkpointing": ds.activation_checkpointing,
        "offload_optimizer": ds.offload_optimizer,
        "offload_param": ds.offload_param,
        "device_type": dist.device_type,
        "backend": dist.backend,
        "versions": package_versions(),
        "deepspeed_config_path": str(ds.path),
        "deepspeed_config": ds.config,
        "memory_budget_bytes": config.run.memory_budget_bytes,
        **cuda_device_facts(dist.device_type),
    }
