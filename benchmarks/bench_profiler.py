"""Cost of the memory profiler beside its peers: the same training step, in one process.

Step: GPT-2 with 4 layers x 256 hidden (HF GPT2LMHeadModel, vocab 50257), batch 4 x 128 tokens,
AdamW, plain torch (no DeepSpeed, so only the measuring tools' own cost is in the figures). Modes,
interleaved round by round (the order rotates each round) so drifting machine load hits each alike:

* ``baseline``       -- the bare step, no tool;
* ``tracking``       -- inside ``with profiler:`` but with no step/phase contexts: memprof's
  allocation tracking alone (on CPU its compiled allocator hook, memprof/measure/native/);
* ``profiler``       -- memprof's full API: tracking plus the per-phase bookkeeping (ownership walk,
  relabelling, RSS, one record per step);
* ``profiler_dispatch`` -- the same on the dispatch-mode tracker (memprof/measure/dispatch_tracker.py, the
  fallback where the hook cannot be built: ``MEMPROF_CPU_TRACKER=dispatch``);
* ``memtracker``     -- PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker`` (a
  TorchDispatchMode with module hooks), model and optimizer registered with ``track_external``,
  ``reset_mod_stats()`` before each step (it refuses a second iteration otherwise);
* ``torch_profiler`` -- ``torch.profiler.profile(activities=[CPU], profile_memory=True)``.

Each mode opens its tool once per round, times ``--steps`` steps inside it, and separately times
closing it: torch.profiler does most of its work there (turning the recorded events into Python
objects), which the per-step time does not show. Reported: the median step per mode, its ratio to
the baseline's, the median of the per-round paired ratios (each mode against the baseline of the
same round, which cancels load drifting between rounds), and the ratio with the close time spread
over the round's steps.

Then, to show where the cost of each mechanism lies, the same modes' cost per aten op on a loop
of tiny ops (an out-of-place add, a view, an in-place mul; one thread), beside an empty
TorchDispatchMode (the price of any Python dispatch mode before it does any work).

Usage: python benchmarks/bench_profiler.py [--rounds 10] [--steps 2] [--device cpu|cuda]
                                           [--threads N] [--modes a,b,...] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from memprof.measure import MemoryProfiler, native
from memprof.measure.ownership import owned_storages
from memprof.models import preset_config
from memprof.run.files import write_text_atomic

MODES = ("baseline", "tracking", "profiler", "profiler_dispatch", "memtracker", "torch_profiler")


def build(device: torch.device, layers: int = 4, hidden: int = 256, batch: int = 4,
          seq: int = 128) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = preset_config("gpt2")
    cfg.update(n_layer=layers, n_embd=hidden, n_head=max(1, hidden // 64))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**cfg)).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    return model, optimizer, {"input_ids": ids, "labels": ids}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(model, optimizer, batch) -> None:
    """The step every mode runs: the bare loop of launch/train.py without a profiler."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def profiled_step(prof: MemoryProfiler, i: int, model, optimizer, batch) -> None:
    with prof.step(i) as s:
        with s.phase("forward"):
            loss = model(**batch).loss
        with s.phase("backward"):
            loss.backward()
        with s.phase("step"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        s.loss = loss


class TimedWalk:
    """The profiler's default ownership walk, timed: CPU seconds of each call (``time.thread_time``,
    so time the process spends descheduled on a busy machine is not counted)."""

    def __init__(self, model, optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.seconds: list[float] = []

    def __call__(self) -> Any:
        t0 = time.thread_time()
        owned = owned_storages(model=self.model, optimizer=self.optimizer)
        self.seconds.append(time.thread_time() - t0)
        return owned


class Round:
    """One mode's tool opened once: ``step(i)`` runs one step inside it, ``close()`` ends it."""

    def __init__(self, mode: str, model, optimizer, batch, device: torch.device, out_dir: Path) -> None:
        self.mode, self.model, self.optimizer, self.batch = mode, model, optimizer, batch
        self.prof: MemoryProfiler | None = None
        self.walk = TimedWalk(model, optimizer)
        self.step: Callable[[int], None] = lambda i: bare_step(model, optimizer, batch)
        ctx: Any = nullcontext()
        if mode in ("tracking", "profiler", "profiler_dispatch"):
            # "profiler_dispatch": the same profiler on the dispatch-mode tracker (the fallback
            # where the allocator hook cannot be built), chosen when the profiler starts
            os.environ[native.TRACKER_ENV] = "dispatch" if mode == "profiler_dispatch" else "allocator"
            self.prof = MemoryProfiler(model=model, optimizer=optimizer, out_dir=out_dir, run={"model": "bench"},
                                       owner_walk=self.walk)
            ctx = self.prof
            if mode in ("profiler", "profiler_dispatch"):
                self.step = lambda i: profiled_step(self.prof, i, model, optimizer, batch)
        elif mode == "memtracker":
            from torch.distributed._tools.mem_tracker import MemTracker

            ctx = MemTracker()
            ctx.track_external(model, optimizer)
            tracker = ctx

            def memtracker_step(i: int) -> None:
                # MemTracker refuses a second iteration unless its module stats are cleared first
                tracker.reset_mod_stats()
                bare_step(model, optimizer, batch)

            self.step = memtracker_step
        elif mode == "torch_profiler":
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            ctx = profile(activities=activities, profile_memory=True)
        elif mode != "baseline":
            raise ValueError(f"unknown mode {mode!r}: use {', '.join(MODES)}")
        self.ctx = ctx
        ctx.__enter__()

    def close(self) -> dict[str, Any] | None:
        self.ctx.__exit__(None, None, None)
        if self.prof is not None:
            self.prof.finish()
            return self.prof.diagnostics
        return None


def per_op_costs(n: int = 20000, rounds: int = 5) -> list[str]:
    """Microseconds per aten op added by each mechanism on a loop of tiny ops, and for
    torch.profiler the microseconds per op spent closing it. Markdown lines."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    from memprof.measure.allocation_hook_tracker import NativeAllocationTracker
    from memprof.measure.dispatch_tracker import AllocationTracker

    class EmptyMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            return func(*args, **kwargs) if kwargs else func(*args)

    x, w = torch.ones(64), torch.ones(64)
    ops = 3 * n

    def tiny_ops() -> None:
        y = x
        for _ in range(n):
            y = y + w  # a new storage (and the previous one freed)
            y.view(8, 8)  # a view: no new storage
            y.mul_(1.0)  # in place: no new storage

    makers: dict[str, Callable[[], Any]] = {
        "no tool": nullcontext,
        "empty TorchDispatchMode": EmptyMode,
        "memprof's dispatch-mode tracker (the fallback)": AllocationTracker,
        "memprof's allocator hook (the default)": NativeAllocationTracker,
        "torch.profiler(profile_memory=True)": lambda: profile(activities=[ProfilerActivity.CPU], profile_memory=True),
    }
    class RawAllocationEvents:
        """torch.profiler's machinery at its lowest Python level, memory events only: what memprof
        would pay to use the allocator's reportMemoryUsage events (c10 reports every alloc/free to
        the profiler in C++) for a phase: enable, run, disable, read the allocation events."""

        def __enter__(self) -> None:
            from torch._C._profiler import ProfilerConfig, ProfilerState, _ExperimentalConfig
            from torch.autograd import _enable_profiler, _prepare_profiler

            # (state, report_input_shapes, profile_memory, with_stack, with_flops, with_modules, experimental)
            cfg = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
            _prepare_profiler(cfg, {ProfilerActivity.CPU})
            _enable_profiler(cfg, {ProfilerActivity.CPU})

        def __exit__(self, *exc: Any) -> None:
            from torch.autograd import _disable_profiler

            live = 0
            for ev in _disable_profiler().events():
                if ev.name() == "[memory]":
                    live += ev.nbytes()  # a replay would follow each alloc/free like this

    makers["torch.profiler's allocation events, raw (enable, disable, read them)"] = RawAllocationEvents
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in makers}
    try:
        for r in range(rounds + 1):  # round 0 warms up (first dispatch into Python) and is dropped
            for name, make in makers.items():
                ctx = make()
                ctx.__enter__()
                t0 = time.perf_counter()
                tiny_ops()
                t1 = time.perf_counter()
                ctx.__exit__(None, None, None)
                if r > 0:
                    runs[name].append((t1 - t0, time.perf_counter() - t1))
    finally:
        torch.set_num_threads(threads)
    bare = statistics.median(t for t, _ in runs["no tool"])
    lines = [
        f"Per aten op, {ops} tiny ops (add, view, mul_) x {rounds} rounds, 1 thread, median:",
        "",
        "| mechanism | added while running (us/op) | closing the tool (us/op) |",
        "|---|---|---|",
    ]
    for name in list(makers)[1:]:
        run = statistics.median(t for t, _ in runs[name])
        close = statistics.median(c for _, c in runs[name])
        lines.append(f"| {name} | {(run - bare) / ops * 1e6:.2f} | {close / ops * 1e6:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per mode per round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    ap.add_argument("--markdown", type=Path, help="also write the result as a markdown section here")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if "baseline" not in modes or any(m not in MODES for m in modes):
        ap.error(f"--modes must include baseline and name only {', '.join(MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, optimizer, batch = build(device, args.layers, args.hidden, args.batch, args.seq)
    times: dict[str, list[float]] = {m: [] for m in modes}
    close_per_step: dict[str, list[float]] = {m: [] for m in modes}
    own_time: list[float] = []  # memprof's own bookkeeping per step (diagnostics["phase_end_seconds"])
    walk_seconds: list[float] = []  # each ownership walk of the profiler mode during its timed steps
    walks_per_step: list[float] = []
    # per round, each mode's mean step over the baseline's mean step in the same round: modes run
    # back to back in a round, so machine load that drifts between rounds cancels in the ratio
    paired: dict[str, list[float]] = {m: [] for m in modes}
    round_mean: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds + 1):  # round 0 warms up (AdamW state, kernel caches) and is dropped
            order = modes[r % len(modes):] + modes[: r % len(modes)]
            for m in order:
                rnd = Round(m, model, optimizer, batch, device, Path(tmp) / f"{m}-{r}")
                step_times = []
                walks_before = len(rnd.walk.seconds)  # the walk at the profiler's start is not in a step
                for i in range(args.steps):
                    sync(device)
                    t0 = time.perf_counter()
                    rnd.step(i)
                    sync(device)
                    step_times.append(time.perf_counter() - t0)
                walked = rnd.walk.seconds[walks_before:]
                t0 = time.perf_counter()
                diagnostics = rnd.close()
                closed = time.perf_counter() - t0
                del rnd
                if r == 0:
                    continue
                times[m] += step_times
                round_mean[m] = statistics.fmean(step_times)
                close_per_step[m].append(closed / args.steps)
                if m == "profiler" and diagnostics is not None:
                    own_time.append(diagnostics["phase_end_seconds"] / args.steps)
                    walk_seconds.extend(walked)
                    walks_per_step.append(len(walked) / args.steps)
            if r > 0:
                for m in modes:
                    paired[m].append(round_mean[m] / round_mean["baseline"])
    base = statistics.median(times["baseline"])
    cmd = "python benchmarks/bench_profiler.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        f"### Profiler overhead beside its peers ({device.type}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)",
        "",
        f"`{cmd.strip()}` -- GPT-2 {args.layers} layers x {args.hidden}, batch {args.batch}x{args.seq}, "
        f"AdamW; {args.rounds} rounds x {args.steps} steps per mode, interleaved; median step time; "
        "paired = median over rounds of the mode's mean step / the baseline's in the same round.",
        "",
        "| mode | median step (s) | min (s) | step vs baseline | paired vs baseline | closing the tool, per step (s) | with closing |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in modes:
        med = statistics.median(times[m])
        close = statistics.median(close_per_step[m])
        pair = statistics.median(paired[m])
        lines.append(
            f"| {m} | {med:.4f} | {min(times[m]):.4f} | {med / base:.3f}x | {pair:.3f}x | {close:.4f} | "
            f"{(med + close) / base:.3f}x |"
        )
    if own_time:
        lines += [
            "",
            f"memprof's own per-phase bookkeeping (its timer, median per step) / baseline step: "
            f"{statistics.median(own_time) / base * 100:.2f}%",
        ]
    if walk_seconds:
        lines += [
            "",
            f"ownership walks in the profiler's steps: {statistics.median(walks_per_step):.1f} per step, "
            f"{statistics.median(walk_seconds) * 1e6:.0f} us each (median CPU time; min "
            f"{min(walk_seconds) * 1e6:.0f} us)",
        ]
    lines += [""] + per_op_costs()
    text = "\n".join(lines + [""])
    print(text)
    if args.markdown:
        write_text_atomic(args.markdown, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
