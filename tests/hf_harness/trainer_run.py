"""An HF Trainer run with memprof's callback, as a user writes it: tiny GPT-2 from a config (random
init, no hub, no tokenizer), random token ids from a torch Dataset, TrainingArguments on the CPU.

Launched by tests/test_integration_trainer.py and benchmarks/bench_callback.py as
``deepspeed --num_gpus 2 tests/hf_harness/trainer_run.py --out DIR --deepspeed DS.json ...`` (or
plain ``python`` without ``--deepspeed``). Faults for the early-stop tests: ``--raise-at K`` raises
inside the K-th training forward (0-based micro-step) on every rank; ``--kill-rank R --kill-at K``
SIGKILLs rank R there.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
import transformers

from memprof.models import preset_config


class RandomTokens(torch.utils.data.Dataset):
    """``n`` samples of ``seq_len`` random token ids; each drawn on demand from its own seed, so
    the data set keeps no tensor alive between batches."""

    def __init__(self, n: int, seq_len: int, vocab: int) -> None:
        self.n, self.seq_len, self.vocab = n, seq_len, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, self.vocab, (self.seq_len,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def build_model(checkpointing: bool) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**preset_config("gpt2-tiny")))
    model.loss_type = "ForCausalLM"
    return model


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON; none: plain Trainer")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--no-callback", action="store_true")
    p.add_argument("--raise-at", type=int, default=None)
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher adds it
    args = p.parse_args()

    from memprof.integrations.transformers import MemprofCallback

    training_args = transformers.TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.gas,
        gradient_checkpointing=args.checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.checkpointing else None,
        max_steps=args.steps,
        learning_rate=1e-3,
        logging_steps=10**6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        deepspeed=args.deepspeed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    model = build_model(args.checkpointing)
    n_samples = args.steps * args.gas * args.micro_batch * max(1, int(os.environ.get("WORLD_SIZE", "1")))
    dataset = RandomTokens(n_samples, args.seq_len, model.config.vocab_size)
    callbacks = [] if args.no_callback else [MemprofCallback(out_dir=args.out)]
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=callbacks)

    if args.raise_at is not None or args.kill_at is not None:
        rank = int(os.environ.get("RANK", "0"))
        calls = {"n": 0}

        def fault(module: torch.nn.Module, inputs: object) -> None:
            if not module.training:
                return
            k = calls["n"]
            calls["n"] += 1
            if args.kill_at == k and args.kill_rank == rank:
                os.kill(os.getpid(), signal.SIGKILL)
            if args.raise_at == k:
                raise RuntimeError(f"injected failure in training forward {k}")

        model.transformer.h[0].register_forward_pre_hook(fault)
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
