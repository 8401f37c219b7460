"""memprof's cost on an FSDP2 step beside torch's FSDPMemTracker, in one run (issue 19).

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_fsdp2.py [--rounds 5] [--steps 4]

Two gloo CPU ranks, a GPT-2 (``--layers``, ``--hidden``; ``fully_shard`` on each block and the
root, torch AdamW), one model. Each round times ``--steps`` training steps in each mode, the modes
interleaved so that load on the machine falls on all alike: ``bare`` (no tool), ``memprof``
(``MemoryProfiler(model=...)`` with its forward / backward / step phases) and ``fsdp_mem_tracker``
(torch/distributed/_tools/fsdp2_mem_tracker.py ``FSDPMemTracker(model, optimizer)`` around the
same steps, with its ``reset_mod_stats()`` after each, which it needs for a second iteration).
Rank 0 prints each mode's median step time (wall clock, and rank 0's process CPU time, which
other jobs on a loaded machine disturb less) and its ratio to ``bare``, the load average, and
memprof's CPU tracker and ownership walks per step. A tool's set-up and its end-of-run files are
outside the timed steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel

from memprof.measure.profiler import MemoryProfiler


def build(layers: int, hidden: int) -> tuple[GPT2LMHeadModel, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=hidden, n_head=max(1, hidden // 64),
                                       vocab_size=8192, n_positions=512))
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def train_step(model, opt, x) -> torch.Tensor:
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def timed(steps: int, one_step) -> list[tuple[float, float]]:
    """(wall seconds, this process's CPU seconds) of each step."""
    out = []
    for i in range(steps):
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        one_step(i)
        out.append((time.perf_counter() - start, time.process_time() - cpu))
    return out


def round_bare(model, opt, x, steps: int) -> list[tuple[float, float]]:
    return timed(steps, lambda i: train_step(model, opt, x))


def round_memprof(model, opt, x, steps: int, out_dir: Path, diagnostics: dict) -> list[tuple[float, float]]:
    prof = MemoryProfiler(model=model, optimizer=opt, out_dir=out_dir,
                          run={"model_config": model.config.to_dict(), "micro_batch": x.shape[0],
                               "seq_len": x.shape[1], "optimizer": "adamw"})

    def one_step(i: int) -> None:
        with prof.step(i) as st:
            with st.phase("forward"):
                loss = model(input_ids=x, labels=x).loss
            with st.phase("backward"):
                loss.backward()
            with st.phase("step"):
                opt.step()
                opt.zero_grad()
            st.loss = loss

    with prof:
        times = timed(steps, one_step)
    prof.finish()
    diagnostics.update(prof.diagnostics)
    diagnostics["steps"] = diagnostics.get("steps", 0) + steps
    diagnostics["walks"] = diagnostics.get("walks", 0) + prof.diagnostics["mid_phase_walks"]
    return times


def round_tracker(model, opt, x, steps: int) -> list[tuple[float, float]]:
    fmt = FSDPMemTracker(model, opt)
    fmt.track_inputs((x,))
    def one_step(i: int) -> None:
        train_step(model, opt, x)
        fmt.reset_mod_stats()  # FSDPMemTracker refuses a second iteration without it (its own error)

    with fmt:
        return timed(steps, one_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    model, opt = build(args.layers, args.hidden)
    x = torch.randint(0, 8192, (args.batch, args.seq))
    train_step(model, opt, x)  # warm-up: lazy init, optimizer state
    times: dict[str, list[tuple[float, float]]] = {"bare": [], "memprof": [], "fsdp_mem_tracker": []}
    diagnostics: dict = {}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            times["bare"] += round_bare(model, opt, x, args.steps)[1:]  # each round's first step: warm-up
            times["memprof"] += round_memprof(model, opt, x, args.steps, Path(tmp) / f"r{r}", diagnostics)[1:]
            times["fsdp_mem_tracker"] += round_tracker(model, opt, x, args.steps)[1:]
    if dist.get_rank() == 0:
        bare = [statistics.median(t[k] for t in times["bare"]) for k in (0, 1)]
        print(f"FSDP2, {dist.get_world_size()} gloo CPU ranks, GPT-2 {args.layers} layers x {args.hidden}, batch "
              f"{args.batch} x seq {args.seq}, {args.rounds} rounds x {args.steps - 1} timed steps per mode")
        for mode, t in times.items():
            wall, cpu = (statistics.median(x[k] for x in t) for k in (0, 1))
            print(f"  {mode:17s} median step {wall * 1000:8.1f} ms  {wall / bare[0]:5.2f}x bare;  "
                  f"CPU {cpu * 1000:8.1f} ms  {cpu / bare[1]:5.2f}x bare")
        print(f"memprof: {diagnostics.get('cpu_tracker')}, {diagnostics['walks'] / diagnostics['steps']:.1f} ownership "
              f"walks a step (mid-phase); load average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
