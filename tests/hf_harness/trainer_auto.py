"""HF Trainer + DeepSpeed on CPU ranks with an "auto" DeepSpeed config; rank 0 writes the values the
engine ended up with. Launched by tests/test_hf_trainer_auto.py as

  deepspeed --num_gpus 2 tests/hf_harness/trainer_auto.py --ds-config X.json --out OUT.json \
      --micro-batch 2 --gradient-accumulation-steps 2 --bf16

A tiny GPT-2 built from memprof's gpt2-tiny preset (no hub, no tokenizer); random token ids fed
through a torch Dataset.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from memprof.models import preset_config
from memprof.run.deepspeed_shm import release_after_peers_mapped


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int):
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ds-config", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--gradient-accumulation-steps", type=int, required=True)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = p.parse_args()

    cfg = preset_config("gpt2-tiny")
    model = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in cfg.items() if k != "model_type"}))
    targs = TrainingArguments(
        output_dir=str(Path(args.out).parent / "trainer"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_steps=2, bf16=args.bf16, use_cpu=True,
        deepspeed=args.ds_config, report_to=[], save_strategy="no", logging_steps=1, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=RandomTokens(64, 32, cfg["vocab_size"]))
    trainer.train()
    import torch.distributed as dist

    # the CPU shm segment each rank made in init_distributed (memprof/run/deepspeed_shm.py)
    release_after_peers_mapped(dist.get_rank(), dist.get_world_size())
    engine = trainer.model_wrapped
    zc = engine._config.zero_config
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps({
            "engine": type(engine).__name__,
            "world_size": engine.world_size,
            "zero_stage": int(engine.zero_optimization_stage()),
            "reduce_bucket_size": zc.reduce_bucket_size,
            "prefetch_bucket_size": zc.prefetch_bucket_size,
            "param_persistence_threshold": zc.param_persistence_threshold,
            "micro_batch": engine.train_micro_batch_size_per_gpu(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
            "train_batch_size": engine.train_batch_size(),
            "bf16": bool(engine.bfloat16_enabled()),
            "fp16": bool(engine.fp16_enabled()),
            "hidden_size": model.config.hidden_size,
            "global_steps": engine.global_steps,
        }))


if __name__ == "__main__":
    main()
