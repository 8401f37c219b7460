"""The model and setup flags ``memprof estimate`` and ``memprof plan`` share, parsed into
EstimateInputs. This module only turns flag strings into values; laying the setup flags over the
DeepSpeed config over DeepSpeed's defaults happens once, in memprof.estimate.settings.

Not a subcommand (no ``main``); the dispatcher only maps ``estimate`` and ``plan`` to their modules.
"""

from __future__ import annotations

import argparse
from typing import Any

from memprof.argparsing import positive_int, positive_size
from memprof.dsconfig import OFFLOAD_DEVICES, PRECISIONS
from memprof.errors import MemprofError
from memprof.estimate.inputs import ATTN_IMPLEMENTATIONS, LAYOUTS, EstimateInputs
from memprof.estimate.settings import SetupFlags, settings_from_setup
from memprof.models import PRESETS, load_model_config, preset_config
from memprof.optimizers import OPTIMIZERS
from memprof.units import parse_count


def add_setup_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_mutually_exclusive_group()
    m.add_argument("--model", help="model preset: " + ", ".join(PRESETS))
    m.add_argument("--model-config", help="path to an HF config.json")
    m.add_argument("--params", help="parameter count only, e.g. 7.5e9 (no activations)")
    p.add_argument("--optimizer", help=f"one of {', '.join(OPTIMIZERS)} (default: DeepSpeed config, else adamw)")
    p.add_argument("--torch-adam", action="store_true",
                   help="Adam/AdamW as torch.optim (DeepSpeed's \"torch_adam\": true) instead of FusedAdam/CPUAdam")
    p.add_argument("--precision", help="fp32, bf16 or fp16 (default: DeepSpeed config, else fp32)")
    p.add_argument("--zero-stage", help="0, 1, 2 or 3 (default: DeepSpeed config, else 0)")
    p.add_argument("--nodes", type=positive_int("--nodes"), help="number of nodes (world size = nodes x gpus-per-node)")
    p.add_argument("--gpus-per-node", type=positive_int("--gpus-per-node"), help="GPUs per node")
    p.add_argument("--micro-batch", type=positive_int("--micro-batch"),
                   help="micro-batch per GPU (default: train_micro_batch_size_per_gpu, else 1)")
    p.add_argument("--seq-len", type=positive_int("--seq-len"), help="sequence length (default: the model's n_positions)")
    p.add_argument("--activation-checkpointing", "--gradient-checkpointing", dest="activation_checkpointing", action="store_true",
                   help="recompute each block in backward (HF gradient checkpointing; TrainingArguments' name is an alias)")
    p.add_argument("--peft-config", help="PEFT adapter_config.json (LoraConfig.save_pretrained's file, or its folder): "
                   "LoRA adapters train, the model is frozen")
    p.add_argument("--lora-r", type=positive_int("--lora-r"), help="LoRA rank (over --peft-config's r)")
    p.add_argument("--lora-target-modules", help="LoRA target modules, e.g. q_proj,v_proj or all-linear (over --peft-config's)")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="QLoRA: the model's Linear layers loaded in 4 bits by bitsandbytes (BitsAndBytesConfig(load_in_4bit=True); "
                   "a config.json's quantization_config is read without it); needs LoRA adapters")
    p.add_argument("--bnb-4bit-quant-type", help="nf4 or fp4 (BitsAndBytesConfig's default fp4; same bytes)")
    p.add_argument("--bnb-4bit-double-quant", action="store_true", help="bnb_4bit_use_double_quant: quantize the absmax too")
    p.add_argument("--bnb-4bit-quant-storage", help="bnb_4bit_quant_storage: uint8 (default), bfloat16, float16, float32, ... "
                   "(ZeRO-3 needs the compute precision's dtype)")
    p.add_argument("--bnb-4bit-compute-dtype", help="bnb_4bit_compute_dtype: float32 (default), bfloat16 or float16")
    p.add_argument("--loss", choices=("hf", "trl-fused-head", "trl-dpo"), default=None,
                   help="hf (the ForCausalLM loss over B*S*V logits; default), trl-fused-head (TRL's trainers: "
                   "chunked log-probs, no logits) or trl-dpo (TRL's DPOTrainer: --micro-batch preference pairs, "
                   "2 rows each, and the reference forward)")
    p.add_argument("--trl", dest="loss", action="store_const", const="trl-fused-head", help="--loss trl-fused-head")
    p.add_argument("--precompute-ref-log-probs", action="store_true",
                   help="--loss trl-dpo: TRL's precompute_ref_log_probs (no reference forward in a training step)")
    p.add_argument("--reference-model", nargs="?", const="policy", default=None, metavar="CONFIG",
                   help="add DPO's frozen reference model: a preset or HF config.json (default: the policy's config)")
    p.add_argument("--attn-implementation", help="sdpa (transformers' default) or eager")
    p.add_argument("--offload-optimizer", help="none or cpu")
    p.add_argument("--offload-params", "--offload-param", dest="offload_param", help="none or cpu (stage 3 only)")
    p.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config", help="DeepSpeed JSON config")
    p.add_argument("--accelerate-config", help="accelerate config YAML (its DeepSpeed settings, num_processes, num_machines)")
    p.add_argument("--gradient-accumulation-steps", type=positive_int("--gradient-accumulation-steps"),
                   help="micro-steps per optimizer step (default: the DeepSpeed config, else 1)")
    p.add_argument("--gpu-memory", type=positive_size("--gpu-memory"),
                   help="GPU memory per device, e.g. 80GiB (2**30) or 80GB (10**9)")
    p.add_argument("--host-memory", type=positive_size("--host-memory"),
                   help="host RAM per node, e.g. 512GiB: offloaded states of the node's ranks must fit")
    p.add_argument("--headroom", help="fraction of GPU memory kept free (default 0.1)")
    p.add_argument("--device-type", default="cuda", help="cuda (default) or cpu: which kernels' activations to model")
    p.add_argument("--cuda-capability",
                   help="GPU compute capability MAJOR.MINOR, e.g. 9.0 (H100, the default assumed), 8.0 (A100): sizes cuBLAS workspaces")
    p.add_argument("--layout", default="deepspeed", help=f"{' or '.join(LAYOUTS)}")
    # --engine and FSDP2's knobs (torch fully_shard); --offload-params cpu is its CPUOffloadPolicy
    p.add_argument("--engine", help="deepspeed (default) or fsdp2 (torch fully_shard on each block and the root)")
    p.add_argument("--reshard-after-forward", help="FSDP2: true (default) or false (blocks stay gathered from forward to backward)")
    p.add_argument("--param-dtype", help="FSDP2 MixedPrecisionPolicy param_dtype: bf16, fp16 (fp32 shards, gathered copies cast)")
    p.add_argument("--reduce-dtype", help="FSDP2 MixedPrecisionPolicy reduce_dtype: fp32, bf16 or fp16 (default: param dtype)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _choice(text: str | None, choices: tuple[str, ...], what: str) -> str | None:
    if text is None:
        return None
    if text.lower() not in choices:
        raise MemprofError(f"unknown {what} {text!r}: choose one of {', '.join(choices)}")
    return text.lower()


def inputs_from_args(args: argparse.Namespace, world_size: int | None) -> EstimateInputs:
    """EstimateInputs from the parsed flags: the model, the setup flags over the setup files over
    DeepSpeed's defaults (memprof.estimate.settings), and the flags no config states."""
    kw: dict[str, Any] = _model(args)
    flags = _setup_flags(args, world_size)
    kw.update(settings_from_setup(flags, deepspeed_config=args.deepspeed_config, accelerate_config=args.accelerate_config,
                                  model_config=kw.get("model_config")))
    if args.seq_len is not None:
        kw["seq_len"] = args.seq_len
    if args.attn_implementation is not None:
        kw["attn_implementation"] = _choice(args.attn_implementation, ATTN_IMPLEMENTATIONS, "attention implementation")
    if args.gpu_memory is not None:
        kw["gpu_memory_bytes"] = args.gpu_memory
    if args.host_memory is not None:
        kw["host_memory_bytes"] = args.host_memory
    if args.headroom is not None:
        try:
            kw["headroom"] = float(args.headroom)
        except ValueError:
            raise MemprofError(f"--headroom {args.headroom!r} is not a number: use a fraction such as 0.1") from None
    kw["device_type"] = _choice(args.device_type, ("cuda", "cpu"), "device type")
    if args.cuda_capability is not None:
        if kw["device_type"] != "cuda":
            raise MemprofError("--cuda-capability applies to --device-type cuda only: drop it or use --device-type cuda")
        kw["cuda_capability"] = str(args.cuda_capability).strip()
    kw["layout"] = _choice(args.layout, LAYOUTS, "layout")
    reference = getattr(args, "reference_model", None)
    if reference is not None:
        kw["reference_model"] = _reference_model(reference, kw)
    if getattr(args, "precompute_ref_log_probs", False):
        kw["precompute_ref_log_probs"] = True
    return EstimateInputs(**kw)


def _reference_model(reference: str, kw: dict[str, Any]) -> dict[str, Any]:
    """--reference-model's config: the policy's ("policy", the flag alone), a preset or a config.json."""
    if reference == "policy":
        if kw.get("model_config") is not None:
            return kw["model_config"]
        return {"n_params": kw["n_params"]}
    if reference in PRESETS:
        return preset_config(reference)
    return load_model_config(reference)


def _model(args: argparse.Namespace) -> dict[str, Any]:
    if args.model:
        return {"model_config": preset_config(args.model), "model_name": args.model}
    if args.model_config:
        return {"model_config": load_model_config(args.model_config), "model_name": args.model_config}
    if args.params:
        return {"n_params": parse_count(args.params, "--params")}
    raise MemprofError("no model: pass --model PRESET, --model-config PATH or --params N")


def _setup_flags(args: argparse.Namespace, world_size: int | None) -> SetupFlags:
    """The setup flags as values (None where not given); MemprofError on a bad one."""
    zero_stage = None
    if args.zero_stage is not None:
        try:
            zero_stage = int(args.zero_stage)
        except ValueError:
            raise MemprofError(f"ZeRO stage {args.zero_stage!r} is not a number: use 0, 1, 2 or 3") from None
    nodes, per_node = args.nodes, args.gpus_per_node
    if world_size is None and (nodes or per_node):
        world_size = (nodes or 1) * (per_node or 1)
    elif world_size is not None and per_node and world_size != (nodes or 1) * per_node:
        raise MemprofError(f"world size {world_size} disagrees with --nodes x --gpus-per-node = {(nodes or 1) * per_node}")
    return SetupFlags(
        world_size=world_size, nodes=nodes or None, zero_stage=zero_stage,
        optimizer=_choice(args.optimizer, OPTIMIZERS, "optimizer"), torch_adam=bool(args.torch_adam),
        precision=_choice(args.precision, PRECISIONS, "precision"), micro_batch=args.micro_batch,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        activation_checkpointing=bool(args.activation_checkpointing),
        offload_optimizer=_choice(args.offload_optimizer, OFFLOAD_DEVICES, "--offload-optimizer device"),
        offload_param=_choice(args.offload_param, OFFLOAD_DEVICES, "--offload-params device"),
        peft_config=getattr(args, "peft_config", None), lora_r=getattr(args, "lora_r", None),
        lora_target_modules=getattr(args, "lora_target_modules", None),
        loss_implementation=(getattr(args, "loss", None) or "hf").replace("-", "_"), **_fsdp2_flags(args),
        **_bnb_4bit_flags(args))


def _bnb_4bit_flags(args: argparse.Namespace) -> dict[str, Any]:
    """--load-in-4bit and --bnb-4bit-* as SetupFlags fields (checked by memprof.quant_config)."""
    quant_type = getattr(args, "bnb_4bit_quant_type", None)
    return {"load_in_4bit": bool(getattr(args, "load_in_4bit", False)),
            "bnb_4bit_quant_type": None if quant_type is None else quant_type.lower(),
            "bnb_4bit_double_quant": bool(getattr(args, "bnb_4bit_double_quant", False)),
            "bnb_4bit_quant_storage": getattr(args, "bnb_4bit_quant_storage", None),
            "bnb_4bit_compute_dtype": getattr(args, "bnb_4bit_compute_dtype", None)}


def _fsdp2_flags(args: argparse.Namespace) -> dict[str, Any]:
    """--engine and FSDP2's knobs as SetupFlags fields (None where not given)."""
    reshard = _choice(args.reshard_after_forward, ("true", "false"), "--reshard-after-forward value")
    return {"engine": _choice(args.engine, ("deepspeed", "fsdp2"), "engine"),
            "reshard_after_forward": None if reshard is None else reshard == "true",
            "param_dtype": _choice(args.param_dtype, PRECISIONS, "--param-dtype"),
            "reduce_dtype": _choice(args.reduce_dtype, PRECISIONS, "--reduce-dtype")}
