"""The training loop, top to bottom: process group, model, DeepSpeed engine, profiled steps, the end
of the run (:func:`memprof.end_of_run.finish_run`, shared with the integrations).

Runs unchanged under ``deepspeed``, ``torchrun`` and plain ``python`` (one process), on CPU
(gloo, ``DS_ACCELERATOR=cpu``) or on GPUs (nccl): DeepSpeed's accelerator decides the device and
the backend, never this code.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

from memprof.run.facts import count_nodes, count_parameters
from memprof.train.config import TrainConfig
from memprof.train.launched_run import DistributedFacts, describe_launched_run
from memprof.train.ports import ANY_FREE_PORT

# Exit status when the device (or the simulated --memory-budget) runs out of memory; bad input is 2.
EXIT_OUT_OF_MEMORY = 3


def run_training(config: TrainConfig) -> int:
    """Train ``config.run.steps`` steps on every rank and write the run files; returns an exit code."""
    _default_single_process_env()

    # Heavy imports only now: every flag and the DeepSpeed JSON were validated before this point.
    import deepspeed
    import torch

    from memprof.end_of_run import finish_run
    from memprof.measure import MemoryProfiler

    dist_facts, rank = _join_process_group(config)
    batches = _batches(config, rank, dist_facts.world_size)
    model, run_meta = _model_and_run_meta(config, dist_facts, batches)

    # 4. The engine: the DeepSpeed JSON, exactly as loaded, is the only source of training settings.
    # A deep copy, so whatever DeepSpeed fills in never leaks into the recorded run metadata.
    ds_config = copy.deepcopy(config.deepspeed.config)
    # With adapters the optimizer is given the trainable parameters only (as HF's Trainer does):
    # DeepSpeed's ZeRO and FP16/BF16 optimizers drop frozen ones anyway (is_optimized_parameter),
    # and a constructor-made state (torch Adagrad) then covers the trainable ones alone.
    params = [p for p in model.parameters() if p.requires_grad] if config.peft is not None else model.parameters()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)

    # 5. The profiled steps.
    profiler = MemoryProfiler(engine=engine, out_dir=config.run.out_dir, run=run_meta, memory_budget=config.run.memory_budget_bytes)
    try:
        with profiler:
            _profiled_steps(profiler, engine, batches, config.run.steps)
    except torch.OutOfMemoryError as e:
        # Simulated (--memory-budget) or real: the profiler has written the rank's oom record.
        # Other ranks may be blocked in a collective, so no gather: the launcher ends them and
        # `memprof report <out>` reads the rank files.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"train.py: rank {rank}: out of memory: {first_line}", file=sys.stderr, flush=True)
        # No teardown collective is possible here (peers may be blocked in one), so interpreter
        # shutdown could race gloo's worker threads (memprof.run_teardown) and turn exit 3 into
        # SIGABRT: leave without it, the rank file already written and the streams flushed.
        sys.stdout.flush()
        os._exit(EXIT_OUT_OF_MEMORY)

    # 6. The estimate, every rank's records gathered into memprof.json (collective), rank 0 reports.
    # ... then the run's last collective, and the process group goes (memprof.run_teardown: why
    # gloo ranks aborted at exit without it)
    finish_run(profiler, prog="train.py", owns_process_group=True)
    return 0


def _join_process_group(config: TrainConfig) -> tuple[DistributedFacts, int]:
    """1. Join the process group (the accelerator picks the backend: nccl on CUDA, gloo on CPU);
    returns its facts and this process's rank."""
    import deepspeed
    import torch.distributed as torch_dist
    from deepspeed.accelerator import get_accelerator

    from memprof.run.deepspeed_shm import release_after_peers_mapped

    accelerator = get_accelerator()
    device_type = accelerator.device_name()
    local_rank = int(os.environ.get("LOCAL_RANK", config.local_rank_flag or 0))
    if device_type != "cpu":
        # Bind this rank to its own GPU before nccl creates its communicator on the current one.
        accelerator.set_device(local_rank)
    backend = accelerator.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend)
    rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
    if device_type == "cpu":
        # Otherwise every CPU `deepspeed` launch leaks ~67 MB of /dev/shm per rank (deepspeed_shm).
        release_after_peers_mapped(rank, world_size)
    facts = DistributedFacts(
        world_size=world_size,
        nodes=count_nodes(os.environ, world_size),
        device_type=device_type,
        backend=torch_dist.get_backend(),
    )
    return facts, rank


def _batches(config: TrainConfig, rank: int, world_size: int) -> Any:
    """2. Data before the model: a text too short for this many ranks fails before any big allocation."""
    from memprof.train.data import ByteBatches, load_text, tokenize

    tokens = tokenize(load_text(config.data.text_path))
    return ByteBatches(
        tokens,
        seq_len=config.data.seq_len,
        micro_batch=config.deepspeed.micro_batch,
        seed=config.data.seed,
        rank=rank,
        world_size=world_size,
    )


def _model_and_run_meta(config: TrainConfig, dist_facts: DistributedFacts, batches: Any) -> tuple[Any, dict[str, Any]]:
    """3. The model and the run metadata, counted before DeepSpeed wraps it (ZeRO-3 would replace
    parameters with shards)."""
    from memprof.run.facts import peft_facts
    from memprof.train.model import build_model, wrap_with_peft

    model = build_model(config.model.config, seed=config.data.seed, activation_checkpointing=config.deepspeed.activation_checkpointing)
    if config.peft is not None:
        model = wrap_with_peft(model, config.peft_config_raw or {})
    run_meta = describe_launched_run(config, dist_facts, count_parameters(model))
    run_meta.update(peft_facts(model))
    # The script's own resident tensors live in the measured device memory on a CPU run; recorded so
    # the estimate can count them as `other` (the launcher's text is a bytearray, not a tensor: 0).
    run_meta["data_tensor_bytes"] = batches.resident_bytes()
    return model, run_meta


def _profiled_steps(profiler: Any, engine: Any, batches: Any, steps: int) -> None:
    """Each iteration is one micro-batch, profiled whole; with gradient_accumulation_steps k > 1,
    DeepSpeed's engine.step() is called every micro-batch and updates the weights on every k-th call
    only. profiler.step() reads the micro-step's place in the cycle from the engine, so each step
    record says whether it was a boundary."""
    device = engine.device
    for step in range(steps):
        with profiler.step(step) as s:
            with s.phase("forward"):
                # The batch is made inside the step, so its bytes count as this step's.
                x = batches.next_batch().to(device)
                # HF shifts labels by one inside the model: labels are the inputs themselves.
                loss = engine(input_ids=x, labels=x).loss
            with s.phase("backward"):
                engine.backward(loss)
            with s.phase("step"):
                engine.step()
            s.loss = loss.item()
            # Keep the loss's value to the next forward, not its graph: with PEFT and checkpointing
            # the graph holds the frozen embedding's output as a leaf (peft's
            # enable_input_require_grads) and its .grad, 2 x B*S*H that nothing would name (`other`).
            loss = loss.detach()


def _default_single_process_env() -> None:
    """Plain ``python launch/train.py``: no launcher set RANK/WORLD_SIZE, so make this process a
    world of one. Its rendezvous store binds whatever port is free at bind time (port 0), so it
    never clashes with another run on the same machine."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(ANY_FREE_PORT)
