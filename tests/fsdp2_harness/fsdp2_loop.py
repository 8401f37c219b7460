"""A user's own 2-rank FSDP2 loop under MemoryProfiler (tests/test_fsdp2.py launches it once with
torchrun, gloo, CPU): ``fully_shard`` on each GPT-2 block and the root, torch AdamW, one profiled
run per setup named on the command line, each in its own folder under OUT.

Setups: ``reshard`` (reshard_after_forward True), ``keep`` (False), ``bf16``
(MixedPrecisionPolicy(param_dtype=bf16)), ``offload`` (CPUOffloadPolicy(pin_memory=False): pinning
needs an accelerator), ``dim1`` (shard_placement_fn Shard(1): memprof must refuse it in one line,
which the worker writes to OUT/dim1/refused.txt), ``accelerate`` (the
``reshard`` model in an accelerate loop under ``profile_accelerate``: accelerate turns its FSDP
plugin on only for accelerator devices, so the script applies ``fully_shard`` itself and prepares
the optimizer only), ``lora`` (PEFT LoRA on a tiny Llama: ``get_peft_model`` first, then
``fully_shard`` on each decoder layer and on the PeftModel root; AdamW over the adapters only),
``ckpt`` (``reshard`` with 4 blocks and non-reentrant gradient checkpointing: activations shrink
slowly through backward while the finished blocks' sharded gradients pile up, so backward's peak
is inside an earlier block than the last).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard
from transformers import GPT2Config, GPT2LMHeadModel

from memprof.errors import MemprofError
from memprof.measure.profiler import MemoryProfiler

# odd vocab and positions: their dim-0 chunks on 2 ranks carry padding
CONFIG = dict(n_layer=2, n_embd=256, n_head=4, vocab_size=1001, n_positions=65, bos_token_id=0, eos_token_id=0)
# the lora setup: a Llama with an odd vocabulary and MLP width, and an odd LoRA rank, so that
# embedding, gate/up_proj and every lora_A (dim 0 = r) carry padding on 2 ranks
LLAMA_CONFIG = dict(model_type="llama", vocab_size=1001, hidden_size=128, intermediate_size=343, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, hidden_act="silu",
                    rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                    attention_dropout=0.0, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
LORA = dict(r=5, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0, bias="none")
BATCH, SEQ, STEPS = 2, 64, 3
CKPT_LAYERS = 4  # the ckpt setup's blocks


def build(setup: str) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**{**CONFIG, "n_layer": CKPT_LAYERS} if setup == "ckpt" else CONFIG))
    if setup == "ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kw: dict = {}
    if setup == "keep":
        kw["reshard_after_forward"] = False
    if setup == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    if setup == "offload":  # no pinned memory on a CPU-only build (pin_memory needs an accelerator)
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    if setup == "dim1":
        kw["shard_placement_fn"] = lambda p: Shard(1) if p.ndim == 2 else Shard(0)
    for block in model.transformer.h:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def build_lora() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIG)), LoraConfig(**LORA))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def run(setup: str, out: Path) -> None:
    from memprof.run.facts import peft_facts

    model = build_lora() if setup == "lora" else build(setup)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    vocab = model.config.vocab_size
    try:
        prof = MemoryProfiler(model=model, optimizer=opt, out_dir=out / setup,
                              run={"model_config": model.config.to_dict(), "micro_batch": BATCH, "seq_len": SEQ,
                                   "optimizer": "adamw", **peft_facts(model),
                                   **({"activation_checkpointing": True} if setup == "ckpt" else {})})
    except MemprofError as e:
        if dist.get_rank() == 0:
            (out / setup).mkdir(parents=True, exist_ok=True)
            (out / setup / "refused.txt").write_text(str(e))
        return
    x = torch.randint(0, vocab, (BATCH, SEQ))
    with prof:
        for step in range(STEPS):
            with prof.step(step) as st:
                with st.phase("forward"):
                    loss = model(input_ids=x, labels=x).loss
                with st.phase("backward"):
                    loss.backward()
                with st.phase("step"):
                    opt.step()
                    opt.zero_grad()
                st.loss = loss
    prof.finish()


def run_accelerate(out: Path) -> None:
    from accelerate import Accelerator

    from memprof.integrations.accelerate import profile_accelerate

    accelerator = Accelerator(cpu=True)
    model = build("reshard")
    opt = accelerator.prepare(torch.optim.AdamW(model.parameters(), lr=1e-3))
    prof = profile_accelerate(accelerator, model, opt, out_dir=out / "accelerate")
    x = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ))
    for _ in range(STEPS):
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    prof.finish(report=False)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    for setup in sys.argv[2:]:
        run_accelerate(out) if setup == "accelerate" else run(setup, out)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
