"""Cost of MemprofCallback: the same HF Trainer run with and without it, in one process.

Run: GPT-2 with 4 layers x 256 hidden (HF GPT2LMHeadModel, vocab 50257), micro-batch 4 x 128
tokens, gradient accumulation 2, the Trainer's own AdamW, no DeepSpeed (one process: only the
callback's cost is measured, not a collective's). Modes, interleaved round by round so drifting
machine load hits each alike, each round a fresh ``Trainer`` over the same model:

* ``baseline`` -- ``Trainer(...)`` alone;
* ``callback`` -- ``Trainer(..., callbacks=[MemprofCallback(out_dir=...)])``.

Reported: the median optimizer-step time per mode (from ``on_step_begin`` to ``on_step_end``, two
micro-steps each; the first step of each round is dropped as warm-up) and its ratio to the
baseline; separately the fixed cost per run outside the steps (the callback's start: seeding the
tracker; its end: gather, memprof.json, estimate, report.html), as the difference in whole
``trainer.train()`` time.

Usage: python benchmarks/bench_callback.py [--rounds 5] [--steps 6] [--threads N] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

GOAL_CPU = 1.05


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.n, self.seq, self.vocab = n, seq, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, self.vocab, (self.seq,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--markdown", default=None, help="also write the result table to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    import transformers

    from memprof.integrations.transformers import MemprofCallback
    from memprof.models import preset_config

    cfg = preset_config("gpt2")
    cfg.update(n_layer=4, n_embd=256, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
    model.loss_type = "ForCausalLM"
    data = RandomTokens(args.steps * args.gas * args.micro_batch, args.seq_len, cfg["vocab_size"])

    step_times: dict[str, list[float]] = {"baseline": [], "callback": []}
    bookkeeping: list[float] = []  # the profiler's own timer per timed run, seconds per micro-step
    run_times: dict[str, list[float]] = {"baseline": [], "callback": []}

    class StepTimer(transformers.TrainerCallback):
        def __init__(self, sink: list[float]) -> None:
            self.sink, self.started, self.n = sink, 0.0, 0

        def on_step_begin(self, *a, **k) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k) -> None:
            if self.n > 0:  # the first optimizer step of a run is warm-up
                self.sink.append(time.perf_counter() - self.started)
            self.n += 1

    with tempfile.TemporaryDirectory(prefix="bench_callback_") as tmp:
        for r in range(args.rounds):
            for mode in ("baseline", "callback"):
                targs = transformers.TrainingArguments(
                    output_dir=os.path.join(tmp, "trainer"), per_device_train_batch_size=args.micro_batch,
                    gradient_accumulation_steps=args.gas, max_steps=args.steps, learning_rate=1e-4,
                    logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                    dataloader_num_workers=0, seed=0,
                )
                # StepTimer runs first: the callback's own on_step_begin/on_step_end work is inside the timed span
                callbacks: list = [StepTimer(step_times[mode])]
                if mode == "callback":
                    callbacks.append(MemprofCallback(out_dir=os.path.join(tmp, f"run{r}"), report=True))
                trainer = transformers.Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks)
                started = time.perf_counter()
                trainer.train()
                run_times[mode].append(time.perf_counter() - started)
                if mode == "callback":
                    doc = callbacks[-1].run_doc
                    seconds = doc["ranks"][0]["diagnostics"]["phase_end_seconds"]
                    bookkeeping.append(seconds / len(doc["ranks"][0]["steps"]))
                print(f"round {r} {mode}: train() {run_times[mode][-1]:.2f} s", flush=True)

    base = statistics.median(step_times["baseline"])
    cb = statistics.median(step_times["callback"])
    ratio = cb / base
    base_min, cb_min = min(step_times["baseline"]), min(step_times["callback"])
    own = statistics.median(bookkeeping) * args.gas / base  # per optimizer step, over the baseline step
    fixed = statistics.median(run_times["callback"]) - statistics.median(run_times["baseline"])
    fixed_steps = fixed - (cb - base) * (args.steps - 1)
    command = "python benchmarks/bench_callback.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        (f"HF Trainer, GPT-2 4x256 (vocab 50257), micro-batch {args.micro_batch} x {args.seq_len}, "
         f"gradient accumulation {args.gas}, torch AdamW, CPU, {torch.get_num_threads()} threads, "
         f"{args.rounds} rounds x {args.steps - 1} timed optimizer steps"),
        "",
        "| mode | median optimizer step | ratio | fastest optimizer step | ratio |",
        "|---|---|---|---|---|",
        f"| baseline (no callback) | {base * 1000:.1f} ms | 1.000x | {base_min * 1000:.1f} ms | 1.000x |",
        f"| MemprofCallback | {cb * 1000:.1f} ms | {ratio:.3f}x | {cb_min * 1000:.1f} ms | {cb_min / base_min:.3f}x |",
        "",
        (f"The profiler's own step/phase bookkeeping (its timer, diagnostics.phase_end_seconds): "
         f"{own:.2%} of the baseline optimizer step; the rest of the difference is allocation tracking."),
        "",
        (f"Fixed cost per run outside the steps (start, gather, memprof.json, estimate, report.html): "
         f"{fixed_steps:.2f} s"),
        "",
        f"Command: `{command.strip()}`",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    verdict = "within" if ratio <= GOAL_CPU else "OVER"
    print(f"goal <= {GOAL_CPU:.2f}x on CPU: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
