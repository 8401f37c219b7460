"""The training loop, top to bottom: process group, model, DeepSpeed engine, profiled steps, files.

Runs unchanged under ``deepspeed``, ``torchrun`` and plain ``python`` (one process), on CPU
(gloo, ``DS_ACCELERATOR=cpu``) or on GPUs (nccl): DeepSpeed's accelerator decides the device and
the backend, never this code.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any

from memprof.errors import MemprofError
from memprof.train.config import TrainConfig
from memprof.train.ports import ANY_FREE_PORT

# Exit status when the device (or the simulated --memory-budget) runs out of memory; bad input is 2.
EXIT_OUT_OF_MEMORY = 3


def run_training(config: TrainConfig) -> int:
    """Train ``config.run.steps`` steps on every rank and write the run files; returns an exit code."""
    _default_single_process_env()

    # Heavy imports only now: every flag and the DeepSpeed JSON were validated before this point.
    import deepspeed
    import torch
    import torch.distributed as torch_dist
    from deepspeed.accelerator import get_accelerator

    from memprof.run_teardown import shutdown_distributed
    from memprof.train.data import ByteBatches, load_text, tokenize
    from memprof.train.deepspeed_shm import release_after_peers_mapped
    from memprof.train.model import build_model, count_parameters
    from memprof.train.run_meta import DistributedFacts, build_run_meta, count_nodes, estimate_for_run

    # 1. Join the process group. The accelerator picks the backend: nccl on CUDA, gloo on CPU.
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
    dist_facts = DistributedFacts(
        world_size=world_size,
        nodes=count_nodes(os.environ, world_size),
        device_type=device_type,
        backend=torch_dist.get_backend(),
    )

    # 2. Data before the model: a text too short for this many ranks fails before any big allocation.
    tokens = tokenize(load_text(config.data.text_path))
    batches = ByteBatches(
        tokens,
        seq_len=config.data.seq_len,
        micro_batch=config.deepspeed.micro_batch,
        seed=config.data.seed,
        rank=rank,
        world_size=world_size,
    )

    # 3. The model, counted before DeepSpeed wraps it (ZeRO-3 would replace parameters with shards).
    model = build_model(config.model.config, seed=config.data.seed, activation_checkpointing=config.deepspeed.activation_checkpointing)
    n_params = count_parameters(model)
    run_meta = build_run_meta(config, dist_facts, n_params)
    # The script's own resident tensors (the token stream and the batch start offsets) live in the
    # measured device memory on a CPU run; recorded so the estimate can count them as `other`.
    run_meta["data_tensor_bytes"] = batches.resident_bytes()

    # 4. The engine: the DeepSpeed JSON, exactly as loaded, is the only source of training settings.
    # A deep copy, so whatever DeepSpeed fills in never leaks into the recorded run metadata.
    ds_config = copy.deepcopy(config.deepspeed.config)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    device = engine.device

    from memprof.measure import MemoryProfiler

    estimate_json = estimate_for_run(run_meta, rank, "train.py")

    # 5. The profiled steps. Each iteration is one micro-batch, profiled whole; with
    # gradient_accumulation_steps k > 1, DeepSpeed's engine.step() is called every micro-batch and
    # updates the weights on every k-th call only. profiler.step() reads the micro-step's place in
    # the cycle from the engine, so each step record says whether it was a boundary.
    profiler = MemoryProfiler(engine=engine, out_dir=config.run.out_dir, run=run_meta, memory_budget=config.run.memory_budget_bytes)
    try:
        with profiler:
            for step in range(config.run.steps):
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
    except torch.OutOfMemoryError as e:
        # Simulated (--memory-budget) or real: the profiler has written the rank's oom record.
        # Other ranks may be blocked in a collective, so no gather: the launcher ends them and
        # `memprof report <out>` reads the rank files.
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"train.py: rank {rank}: out of memory: {first_line}", file=sys.stderr, flush=True)
        return EXIT_OUT_OF_MEMORY

    # 6. Gather every rank's records into memprof.json (collective), then rank 0 reports.
    run_doc = profiler.finish(estimate=estimate_json)
    if rank == 0:
        profiler.print_table(run_doc, console=_table_console())
        _write_report(run_doc, config.run.out_dir / "report.html")
        print(f"memprof: run files in {config.run.out_dir.resolve()} (memprof.json, rank<R>.jsonl)", flush=True)
    # the last collective, then the process group goes (memprof.run_teardown: why gloo ranks aborted at exit)
    shutdown_distributed(destroy=True)
    return 0


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


def _table_console() -> Any:
    """A rich console for the end-of-run table. Under a launcher stdout is a pipe, where rich
    falls back to 80 columns and truncates every cell; logs get a width the table fits in."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=180)


def _write_report(run_doc: dict[str, Any], path: os.PathLike) -> None:
    try:
        from memprof.report import write_report
    except ImportError as e:
        print(f"train.py: report.html skipped: memprof.report is not available ({e})", flush=True)
        return
    try:
        write_report([run_doc], path)
    except MemprofError as e:
        print(f"train.py: report.html skipped: {e}", file=sys.stderr, flush=True)
        return
    print(f"memprof: report {os.fspath(path)}", flush=True)

