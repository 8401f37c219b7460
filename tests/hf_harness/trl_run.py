"""A TRL run with memprof's callback, as a user writes it: ``SFTTrainer`` or ``DPOTrainer`` with a PEFT
LoRA config on a tiny Llama built from memprof's ``llama-tiny`` preset (random init, no hub), a
tokenizer built in memory (tokenizers' WordLevel over the preset's 512-token vocabulary, wrapped in
``PreTrainedTokenizerFast``), text data of fixed length, TRL's own config defaults (gradient
checkpointing on) and ``use_cpu=True``.

Launched by tests/test_integration_trl.py as
``deepspeed --num_gpus 2 tests/hf_harness/trl_run.py --trainer sft --out DIR --deepspeed DS.json``.
``--ref-model``: DPO with an explicit reference model (a second, frozen llama-tiny); without it DPO
with PEFT takes its reference from the policy with the adapters disabled (no second model). Rank 0
writes ``<out>/log_history.json`` (the Trainer's ``state.log_history``) and ``<out>/lora.json`` (the
LoRA target modules' shapes, from the model itself).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import transformers

from memprof.models import preset_config

LORA_R = 4
LORA_TARGETS = ["q_proj", "v_proj"]


def tiny_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocab_size`` ids: ``<pad>`` 0, ``</s>`` 1, ``w2`` ... ``w<V-1>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def words(rng: torch.Generator, n: int, vocab_size: int) -> str:
    return " ".join(f"w{int(i)}" for i in torch.randint(2, vocab_size, (n,), generator=rng))


def build_llama(vocab_size: int) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = {k: v for k, v in preset_config("llama-tiny").items() if k != "model_type"}
    cfg.update(pad_token_id=0, eos_token_id=1, bos_token_id=1, vocab_size=vocab_size)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))


def sft_dataset(n: int, seq_len: int, vocab_size: int):
    import datasets

    rng = torch.Generator().manual_seed(0)
    # SFTTrainer appends EOS: seq_len - 1 words make every sample exactly seq_len tokens
    return datasets.Dataset.from_dict({"text": [words(rng, seq_len - 1, vocab_size) for _ in range(n)]})


def dpo_dataset(n: int, seq_len: int, vocab_size: int):
    import datasets

    rng = torch.Generator().manual_seed(0)
    prompt_len = seq_len // 2
    completion = seq_len - prompt_len - 1  # DPOTrainer appends EOS to chosen and rejected
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        rows["prompt"].append(words(rng, prompt_len, vocab_size) + " ")
        rows["chosen"].append(words(rng, completion, vocab_size))
        rows["rejected"].append(words(rng, completion, vocab_size))
    return datasets.Dataset.from_dict(rows)


def lora_shapes(model: torch.nn.Module) -> list[dict[str, int]]:
    """(in, out) of every LoRA target module, from the base model's own Linear layers."""
    return [{"name": name, "in": m.in_features, "out": m.out_features}
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--trainer", choices=["sft", "dpo"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--deepspeed", default=None)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--ref-model", action="store_true", help="DPO: pass an explicit reference model")
    p.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher adds it
    args = p.parse_args()

    import peft
    import trl

    from memprof.integrations.transformers import MemprofCallback

    vocab_size = preset_config("llama-tiny")["vocab_size"]
    tokenizer = tiny_tokenizer(vocab_size)
    model = build_llama(vocab_size)
    shapes = lora_shapes(model)
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    n = args.steps * args.gas * args.micro_batch * world
    common = dict(
        output_dir=os.path.join(args.out, "trainer"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.gas, max_steps=args.steps, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, deepspeed=args.deepspeed, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    lora = peft.LoraConfig(r=LORA_R, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    callback = MemprofCallback(out_dir=args.out)
    if args.trainer == "sft":
        config = trl.SFTConfig(**common, max_length=args.seq_len)
        trainer = trl.SFTTrainer(model=model, args=config, train_dataset=sft_dataset(n, args.seq_len, vocab_size),
                                 processing_class=tokenizer, peft_config=lora, callbacks=[callback])
    else:
        config = trl.DPOConfig(**common, max_length=args.seq_len)
        ref = build_llama(vocab_size).eval().requires_grad_(False) if args.ref_model else None
        trainer = trl.DPOTrainer(model=model, ref_model=ref, args=config,
                                 train_dataset=dpo_dataset(n, args.seq_len, vocab_size),
                                 processing_class=tokenizer, peft_config=lora, callbacks=[callback])
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out, "log_history.json").write_text(json.dumps(trainer.state.log_history))
        Path(args.out, "lora.json").write_text(json.dumps({"r": LORA_R, "targets": shapes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
