"""What an estimate is asked about: :class:`EstimateInputs`, every setting resolved, and the checks
that make it usable.

Where the settings come from lives beside it: :mod:`memprof.estimate.settings` (flags over the
DeepSpeed config over DeepSpeed's defaults, for ``memprof estimate`` / ``plan``) and
:mod:`memprof.estimate.from_run` (a recorded run's own setup).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from memprof.dsconfig import OFFLOAD_DEVICES, PRECISIONS, ZeroKnobs
from memprof.engines import Engine, Fsdp2Settings, check_engine
from memprof.errors import MemprofError
from memprof.estimate.settings import (
    hidden_size_of,
    settings_from_deepspeed_config,
    settings_from_ds,
    settings_from_setup_files,
)
from memprof.optimizers import OPTIMIZERS
from memprof.peft_config import LoraSetup
from memprof.quant_config import bnb_4bit_from_quantization_config, check_4bit_training
from memprof.units import is_positive_int

__all__ = [
    "OFFLOAD_DEVICES",
    "OPTIMIZERS",
    "PRECISIONS",
    "EstimateInputs",
    "ZeroKnobs",
    "hidden_size_of",
    "settings_from_deepspeed_config",
    "settings_from_ds",
    "settings_from_setup_files",
]

LAYOUTS: tuple[str, ...] = ("deepspeed", "zero-paper")
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager")


LOSS_IMPLEMENTATIONS = ("hf", "trl_fused_head", "trl_dpo")

@dataclass(frozen=True)
class EstimateInputs:
    """Everything an estimate depends on, resolved (no None left where a number is needed except
    ``model_config``/``seq_len``, which are absent when only a parameter count is known)."""

    model_config: dict[str, Any] | None = None
    n_params: int | None = None
    model_name: str | None = None
    world_size: int = 1
    nodes: int = 1
    zero_stage: int = 0
    optimizer: str = "adamw"
    precision: str = "fp32"
    micro_batch: int = 1
    seq_len: int | None = None
    activation_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    zero: ZeroKnobs = field(default_factory=ZeroKnobs)
    gpu_memory_bytes: int | None = None
    host_memory_bytes: int | None = None
    """Host RAM per node (``--host-memory``): the node's ranks share it for their offloaded states
    and DeepSpeed's host buffers. None: not checked."""
    headroom: float = 0.10
    layout: str = "deepspeed"
    device_type: str = "cuda"
    torch_adam: bool = False
    """Adam/AdamW: False is DeepSpeed's default (FusedAdam, or DeepSpeedCPUAdam under optimizer
    offload: a Python-int step, no temporaries); True is ``"torch_adam": true`` (torch.optim
    Adam/AdamW: a 4-byte step tensor per optimized tensor). AMSGrad is always torch's."""
    grad_accum_dtype: str | None = None
    """DeepSpeed ``data_types.grad_accum_dtype`` (None: the model dtype). ZeRO-1 + bf16 + fp32
    switches to BF16_Optimizer; ZeRO-3 keeps its gradient partitions in this dtype."""
    script_resident_bytes: int = 0
    """Bytes the training script itself keeps alive for the whole run besides the model and
    DeepSpeed (e.g. its tokenised data set); counted as ``other`` at rest and in every phase on a
    CPU run (on CUDA the launcher keeps its data set in host memory: not device bytes)."""
    cuda_capability: str | None = None
    """CUDA compute capability ``MAJOR.MINOR`` of the GPU (device_type cuda only): sizes the
    cuBLAS workspaces (cuda_runtime.py). None: assume an H100 (9.0), said in the assumptions."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step (DeepSpeed ``gradient_accumulation_steps``, or the flag)."""
    engine: Engine = Engine.DEEPSPEED
    """Which engine lays the model states out (memprof.engines): DeepSpeed ZeRO, or torch DDP
    without DeepSpeed (HF Trainer / accelerate under torchrun), which keeps flat gradient buckets
    instead of DeepSpeed's stage-0 all-reduce copy and has no ZeRO stage."""
    ddp_gradient_as_bucket_view: bool = False
    """DDP's ``gradient_as_bucket_view`` (meaningful only when ``engine`` is DDP)."""
    fsdp2: Fsdp2Settings = field(default_factory=Fsdp2Settings)
    """FSDP2's reshard_after_forward, MixedPrecisionPolicy and CPUOffloadPolicy (engine FSDP2 only)."""
    config_notes: tuple[str, ...] = ()
    """What reading the DeepSpeed config decided that the numbers above do not show: each "auto"
    and what it became, keys ignored at this stage, checkpointing from the config's block. The
    estimate lists them among its assumptions."""
    auto_values: dict[str, Any] = field(default_factory=dict)
    """``{dotted config key: value}`` for every "auto" the config had, as resolved."""
    peft: LoraSetup | None = None
    """PEFT LoRA adapters (``--peft-config`` / ``--lora-r`` / ``--lora-target-modules``, or the
    run's recorded adapter config): the backbone frozen, the adapters trained. None: every
    parameter trains."""
    loss_implementation: str = "hf"
    """How the loss reads the last hidden state: ``hf`` (the ForCausalLM loss over B*S*V logits),
    ``trl_fused_head`` (TRL's trainers: ``add_fused_lm_head``'s chunked log-probs, no logits;
    memprof.estimate.trainer_terms) or ``trl_dpo`` (TRL's DPOTrainer: the same head over the
    concatenated chosen/rejected batch, ``micro_batch`` pairs being 2x rows, and the reference
    model's no-grad forward). ``--loss``, or a run's recorded TRL trainer class."""
    reference_model: dict[str, Any] | None = None
    """A frozen reference model beside the policy (DPO: ``memprof estimate --reference-model
    [CONFIG]``, or a run's recorded ``reference_model``): its HF config (the policy's when none is
    given), or ``{"n_params": N}``. None: no reference model."""
    reference_persistence_threshold: int | None = None
    """ZeRO-3 ``stage3_param_persistence_threshold`` of the reference model's own DeepSpeed engine, as
    a run recorded it (memprof.integrations.transformers.describe_reference_model). None: derived
    from the config (core.reference_persistence_threshold)."""
    precompute_ref_log_probs: bool = False
    """DPO (``trl_dpo``): TRL's ``precompute_ref_log_probs`` (the reference log-probs computed before
    training, so no reference forward in a training step)."""
    checkpoint_reentrant: bool | None = None
    """Gradient checkpointing with ``use_reentrant=True`` (torch.utils.checkpoint's
    CheckpointFunction) rather than the non-reentrant checkpoint memprof's launcher uses. None:
    what the trainer picks (TRL's DPOTrainer forces it with PEFT + ZeRO-3 + checkpointing; else
    False); a run records it in ``trainer.gradient_checkpointing_kwargs``."""

    def __post_init__(self) -> None:
        validate_inputs(self)

    def with_(self, **changes: Any) -> EstimateInputs:
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["model_config"] is not None:
            out["model_config"] = {k: v for k, v in out["model_config"].items() if not k.startswith("_")}
        out["engine"] = Engine(self.engine).value  # a plain str in JSON
        if self.loss_implementation == "hf":  # the default stays out of the record (older runs' keys)
            del out["loss_implementation"]
        if self.reference_model is None:
            del out["reference_model"]
        for key in ("reference_persistence_threshold", "precompute_ref_log_probs", "checkpoint_reentrant"):
            if out[key] in (None, False):  # defaults stay out of the record (older runs' keys)
                del out[key]
        return out


def validate_inputs(inp: EstimateInputs) -> None:
    """MemprofError, one line naming the bad setting, for anything an estimate cannot use."""
    if inp.model_config is None and inp.n_params is None:
        raise MemprofError("no model: pass --model PRESET, --model-config PATH or --params N")
    if inp.peft is not None and not isinstance(inp.peft, LoraSetup):
        raise MemprofError(f"peft {inp.peft!r} must be a LoraSetup (memprof.peft_config)")
    if inp.reference_model is not None and not isinstance(inp.reference_model, dict):
        raise MemprofError(f"reference model {inp.reference_model!r} must be a model config (a JSON object)")
    if inp.loss_implementation not in LOSS_IMPLEMENTATIONS:
        raise MemprofError(f"unknown loss {inp.loss_implementation!r}: choose one of {', '.join(LOSS_IMPLEMENTATIONS)}")
    if inp.precompute_ref_log_probs and inp.loss_implementation != "trl_dpo":
        raise MemprofError("precompute_ref_log_probs is a DPO setting: use it with --loss trl-dpo")
    if inp.reference_persistence_threshold is not None and (
            not isinstance(inp.reference_persistence_threshold, int) or isinstance(inp.reference_persistence_threshold, bool)
            or inp.reference_persistence_threshold < 0):
        raise MemprofError(f"reference persistence threshold {inp.reference_persistence_threshold!r} must be a "
                           "non-negative whole number of elements")
    if inp.n_params is not None and (not isinstance(inp.n_params, int) or inp.n_params <= 0):
        raise MemprofError(f"parameter count {inp.n_params!r} must be a positive number, e.g. --params 7.5e9")
    _positive_int(inp.world_size, "world size", "--world-size 8 (or --nodes and --gpus-per-node)")
    _positive_int(inp.nodes, "node count", "--nodes 1")
    if inp.world_size % inp.nodes:
        raise MemprofError(f"world size {inp.world_size} is not a multiple of the node count {inp.nodes}")
    if inp.zero_stage not in (0, 1, 2, 3) or isinstance(inp.zero_stage, bool):
        raise MemprofError(f"ZeRO stage {inp.zero_stage!r} does not exist: use --zero-stage 0, 1, 2 or 3")
    check_engine(inp.engine, inp.zero_stage)
    if inp.optimizer not in OPTIMIZERS:
        raise MemprofError(f"unknown optimizer {inp.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if inp.precision not in PRECISIONS:
        raise MemprofError(f"unknown precision {inp.precision!r}: choose one of {', '.join(PRECISIONS)}")
    _check_quantization(inp)
    _positive_int(inp.micro_batch, "micro-batch", "--micro-batch 1")
    _positive_int(inp.gradient_accumulation_steps, "gradient accumulation steps", "--gradient-accumulation-steps 1")
    if inp.seq_len is not None:
        _positive_int(inp.seq_len, "sequence length", "--seq-len 1024")
    if inp.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise MemprofError(
            f"unknown attention implementation {inp.attn_implementation!r}: choose one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if inp.layout not in LAYOUTS:
        raise MemprofError(f"unknown layout {inp.layout!r}: choose one of {', '.join(LAYOUTS)}")
    if inp.grad_accum_dtype not in (None, *PRECISIONS):
        raise MemprofError(f"gradient accumulation dtype {inp.grad_accum_dtype!r} is not one of {', '.join(PRECISIONS)}")
    if not isinstance(inp.script_resident_bytes, int) or isinstance(inp.script_resident_bytes, bool) or inp.script_resident_bytes < 0:
        raise MemprofError(f"script resident bytes {inp.script_resident_bytes!r} must be a non-negative whole number")
    if inp.cuda_capability is not None:
        from memprof.estimate.cuda_runtime import parse_capability

        parse_capability(inp.cuda_capability)
    if inp.gpu_memory_bytes is not None and inp.gpu_memory_bytes <= 0:
        raise MemprofError("GPU memory must be a positive size, e.g. --gpu-memory 80GiB")
    if inp.host_memory_bytes is not None and inp.host_memory_bytes <= 0:
        raise MemprofError("host memory must be a positive size per node, e.g. --host-memory 512GiB")
    if not 0 <= inp.headroom < 1:
        raise MemprofError(f"headroom {inp.headroom!r} must be a fraction in [0, 1), e.g. 0.1")
    z = inp.zero
    for name in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size", "max_live_parameters", "max_reuse_distance",
                 "param_persistence_threshold", "sub_group_size"):
        value = getattr(z, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (name == "reduce_bucket_size" and value == 0):
            raise MemprofError(f"zero_optimization.{name} = {value!r} must be a non-negative whole number of elements")
    for name in ("offload_optimizer", "offload_param"):
        if getattr(z, name) not in OFFLOAD_DEVICES:
            raise MemprofError(
                f"{name} device {getattr(z, name)!r} is not supported: use none or cpu (nvme is not modelled)"
            )
    if z.offload_param != "none" and inp.zero_stage != 3:
        raise MemprofError("parameter offload needs ZeRO stage 3: use --zero-stage 3 or --offload-params none")
    if z.offload_optimizer != "none" and inp.zero_stage == 0:
        raise MemprofError("optimizer offload needs ZeRO stage 1, 2 or 3: raise --zero-stage or use --offload-optimizer none")


def _check_quantization(inp: EstimateInputs) -> None:
    """A 4-bit base (the model config's quantization_config) only where memprof models it
    (memprof.quant_config.check_4bit_training); a 4-bit reference model is not modelled."""
    ref = inp.reference_model
    if isinstance(ref, dict) and bnb_4bit_from_quantization_config(ref.get("quantization_config")) is not None:
        raise MemprofError("a 4-bit reference model is not modelled: give --reference-model a config without "
                           "quantization_config")
    cfg = inp.model_config
    setup = bnb_4bit_from_quantization_config(cfg.get("quantization_config"), "model config quantization_config") \
        if isinstance(cfg, dict) else None
    if setup is not None:
        check_4bit_training(setup, inp.precision, inp.zero_stage, Engine(inp.engine).value, setup.source)


def _positive_int(value: Any, what: str, example: str) -> None:
    if not is_positive_int(value):
        raise MemprofError(f"{what} {value!r} must be a positive whole number, e.g. {example}")

