"""The ``run`` metadata dict: what was trained, how, and where. The estimator reads it to rebuild
the run's own setup (``memprof.estimate.inputs_from_run``) and every report shows it."""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from memprof import __version__ as memprof_version
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


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape memory, read from installed metadata (no imports)."""
    versions = {"memprof": memprof_version, "python": platform.python_version()}
    for dist in ("torch", "deepspeed", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    return versions


def cuda_device_facts(device_type: str) -> dict[str, str]:
    """The current GPU's name and compute capability ("9.0") on a CUDA run, for the estimator's
    cuBLAS workspace sizes; empty on any other device (torch.cuda is then never touched)."""
    if device_type != "cuda":
        return {}
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {"cuda_device_name": torch.cuda.get_device_name(), "cuda_capability": f"{major}.{minor}"}


def build_run_meta(config: TrainConfig, dist: DistributedFacts, n_params: int) -> dict[str, Any]:
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
        "offload_params": ds.offload_params,
        "device_type": dist.device_type,
        "backend": dist.backend,
        "versions": package_versions(),
        "deepspeed_config_path": str(ds.path),
        "deepspeed_config": ds.config,
        "memory_budget_bytes": config.run.memory_budget_bytes,
        **cuda_device_facts(dist.device_type),
    }


def estimate_for_run(run: dict[str, Any], rank: int, prog: str) -> dict[str, Any] | None:
    """The estimator's prediction for a run's own setup (``memprof.estimate.inputs_from_run``), as
    the launcher and the integrations store it in memprof.json; None with a one-line warning on rank
    0 (``prog`` names the caller) if it fails: a missing estimate must not cost the measurement."""
    try:
        from memprof.estimate import estimate, inputs_from_run

        return estimate(inputs_from_run(run)).to_json()
    except Exception as e:  # noqa: BLE001 - any estimator failure degrades to "estimate": null
        if rank == 0:
            print(f"{prog}: warning: no estimate recorded ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return None
