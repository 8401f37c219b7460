"""Cost of the memory profiler: the same training loop with and without it, in one process.

Loop: GPT-2 with 4 layers x 256 hidden (HF GPT2LMHeadModel, vocab 50257), batch 4 x 128 tokens,
AdamW, plain torch (no DeepSpeed, so only the profiler's own cost is measured). Modes, interleaved
round by round so drifting machine load hits each alike:

* ``baseline``  -- the loop alone;
* ``tracking``  -- inside ``with profiler:`` but with no step/phase contexts: allocation tracking
  (CPU) with no phase-end work, i.e. the cost of seeing every allocation and free;
* ``profiler``  -- the full API: tracking plus phase-end snapshots (ownership walk, relabelling,
  RSS, one fsynced record per step).

Reported: median step time per mode and its ratio to the baseline. Snapshot cost is
(profiler - tracking) / baseline. On CUDA the ``tracking`` mode measures nothing extra (no
dispatch mode there) and the profiler's cost is the snapshot cost.

Usage: python benchmarks/bench_profiler.py [--rounds 5] [--steps 3] [--device cpu|cuda]
                                           [--threads N] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from memprof.measure import MemoryProfiler
from memprof.models import preset_config
from memprof.runfile import write_text_atomic


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


def plain_step(model, optimizer, batch) -> None:
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


PHASE_END_SECONDS: list[float] = []  # per profiled step, the profiler's own phase-end time


def run_mode(mode: str, steps: int, model, optimizer, batch, device, out_dir: Path) -> list[float]:
    times: list[float] = []
    if mode == "baseline":
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            plain_step(model, optimizer, batch)
            sync(device)
            times.append(time.perf_counter() - t0)
        return times
    prof = MemoryProfiler(model=model, optimizer=optimizer, out_dir=out_dir, run={"model": "bench"})
    with prof:
        for i in range(steps):
            sync(device)
            t0 = time.perf_counter()
            if mode == "tracking":
                plain_step(model, optimizer, batch)
            else:
                profiled_step(prof, i, model, optimizer, batch)
            sync(device)
            times.append(time.perf_counter() - t0)
    prof.finish()
    if mode == "profiler":
        PHASE_END_SECONDS.append(prof.diagnostics["phase_end_seconds"] / steps)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per mode per round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--markdown", type=Path, help="also write the result as a markdown section here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, optimizer, batch = build(device, args.layers, args.hidden, args.batch, args.seq)
    modes = ["baseline", "tracking", "profiler"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for m in modes:  # warm-up: first-step allocations (AdamW state), kernel caches
            run_mode(m, 1, model, optimizer, batch, device, Path(tmp) / f"warm-{m}")
        for r in range(args.rounds):
            order = modes if r % 2 == 0 else modes[::-1]
            for m in order:
                times[m] += run_mode(m, args.steps, model, optimizer, batch, device, Path(tmp) / f"{m}-{r}")
    base = statistics.median(times["baseline"])
    cmd = "python benchmarks/bench_profiler.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        f"### Profiler overhead ({device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads)",
        "",
        f"`{cmd.strip()}` -- GPT-2 {args.layers} layers x {args.hidden}, batch {args.batch}x{args.seq}, "
        f"AdamW; {args.rounds} rounds x "
        f"{args.steps} steps per mode, interleaved; median step time.",
        "",
        "| mode | median step (s) | min (s) | vs baseline |",
        "|---|---|---|---|",
    ]
    for m in modes:
        med = statistics.median(times[m])
        lines.append(f"| {m} | {med:.4f} | {min(times[m]):.4f} | {med / base:.3f}x |")
    snap = (statistics.median(times["profiler"]) - statistics.median(times["tracking"])) / base
    direct = statistics.median(PHASE_END_SECONDS[1:] or PHASE_END_SECONDS) / base  # [0] is the warm-up
    lines += [
        "",
        f"Phase-end snapshot cost (profiler - tracking) / baseline: {snap * 100:+.1f}%",
        f"Phase-end snapshot time measured directly (the profiler's own timer, median per step) / baseline: "
        f"{direct * 100:.2f}%",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        write_text_atomic(args.markdown, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
