"""FSDP2 on a GPU for benchmarks/gpu_validate.sh: one profiled run of a preset model per call, its
run folder then read by ``memprof compare`` (allocator counters, categories, estimate).

    python -m torch.distributed.run --nproc_per_node 1 benchmarks/fsdp2_gpu_loop.py OUT SETUP [MODEL] [SEQ]
    accelerate launch --config_file FSDP2.yaml benchmarks/fsdp2_gpu_loop.py OUT accelerate [MODEL] [SEQ]

SETUP: ``reshard`` (reshard_after_forward True), ``keep`` (False), ``bf16``
(MixedPrecisionPolicy(param_dtype=bf16)), ``offload`` (CPUOffloadPolicy: pinned host shards on
CUDA), ``lora`` (PEFT LoRA r=8 on every Linear but the head, ``get_peft_model`` before
``fully_shard``; AdamW over the adapters): ``fully_shard`` on each block and the root, torch AdamW,
``MemoryProfiler(model=...)`` (nccl on CUDA; gloo on a machine without one, for a dry run);
``accelerate``: accelerate's FSDP plugin (the YAML's ``fsdp_version: 2``) wraps the model in
``accelerator.prepare``, the loop runs under ``profile_accelerate``. Writes OUT/SETUP/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

from memprof.models import preset_config

BATCH, STEPS = 2, 4


def _model(name: str) -> torch.nn.Module:
    cfg = dict(preset_config(name))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (GPT-2's transformer.h, the Llama family's model.layers)."""
    inner = getattr(model, "transformer", None) or model.model
    return list(getattr(inner, "h", None) or inner.layers)


def run_fully_shard(out: Path, setup: str, name: str, seq: int, device: torch.device) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from memprof.measure.profiler import MemoryProfiler
    from memprof.run.facts import peft_facts

    # CPUOffloadPolicy wants the parameters on the CPU when fully_shard runs (FSDPParamGroup._validate_cpu_offload_params)
    model = _model(name) if setup == "offload" else _model(name).to(device)
    blocks = _blocks(model)
    if setup == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    kw: dict = {"reshard_after_forward": setup != "keep"}
    if setup == "bf16":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    if setup == "offload":
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    prof = MemoryProfiler(model=model, optimizer=opt, out_dir=out / setup,
                          run={"model_config": model.config.to_dict(), "micro_batch": BATCH, "seq_len": seq,
                               "optimizer": "adamw", **peft_facts(model)})
    x = torch.randint(0, model.config.vocab_size, (BATCH, seq), device=device)
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


def run_accelerate(out: Path, name: str, seq: int) -> None:
    from accelerate import Accelerator

    from memprof.integrations.accelerate import profile_accelerate

    accelerator = Accelerator()
    model = _model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt = accelerator.prepare(model, opt)
    prof = profile_accelerate(accelerator, model, opt, out_dir=out / "accelerate")
    x = torch.randint(0, model.config.vocab_size, (BATCH, seq), device=accelerator.device)
    for _ in range(STEPS):
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
    prof.finish()


def main() -> None:
    out, setup = Path(sys.argv[1]), sys.argv[2]
    name = sys.argv[3] if len(sys.argv) > 3 else "gpt2"
    seq = int(sys.argv[4]) if len(sys.argv) > 4 else 512
    if setup == "accelerate":
        run_accelerate(out, name, seq)
        return
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    run_fully_shard(out, setup, name, seq, device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
