"""What an estimate is asked about: the resolved settings, and reading them from a DeepSpeed config.

Settings have three sources, strongest first: command-line flags, the DeepSpeed config, defaults.
Defaults are DeepSpeed 0.19.8's own (``deepspeed/runtime/zero/config.py``,
``DeepSpeedZeroConfig``), so an estimate without a config describes what DeepSpeed would do with
an empty ``zero_optimization`` block.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from memprof.errors import MemprofError
from memprof.jsonfile import read_json_object

OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "nesterov", "rmsprop", "adagrad", "adam", "adamw", "amsgrad")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
OFFLOAD_DEVICES: tuple[str, ...] = ("none", "cpu")
LAYOUTS: tuple[str, ...] = ("deepspeed", "zero-paper")
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager")


@dataclass(frozen=True)
class ZeroKnobs:
    """The DeepSpeed ``zero_optimization`` knobs that change memory, with DeepSpeed's defaults."""

    reduce_bucket_size: int = 500_000_000  # elements, DeepSpeedZeroConfig.reduce_bucket_size
    allgather_bucket_size: int = 500_000_000  # elements
    overlap_comm: bool | None = None  # None: DeepSpeed's dynamic default, True only at stage 3
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000  # stage3_prefetch_bucket_size, elements
    max_live_parameters: int = 1_000_000_000  # stage3_max_live_parameters, elements
    # stage3_max_reuse_distance, elements: a gathered parameter whose next use comes within this
    # many traversed elements is not released (partitioned_param_coordinator.py __params_to_release)
    max_reuse_distance: int = 1_000_000_000
    param_persistence_threshold: int = 100_000  # stage3_param_persistence_threshold, elements
    model_persistence_threshold: int = 2**63 - 1  # stage3_model_persistence_threshold (sys.maxsize)
    sub_group_size: int = 1_000_000_000  # elements per stage-3 optimizer sub-group
    offload_optimizer: str = "none"
    offload_param: str = "none"
    # offload_optimizer.pin_memory / offload_param.pin_memory (offload_config.py: default true):
    # DeepSpeed page-locks its host buffers (zero_layout._host_bytes)
    offload_optimizer_pin_memory: bool = True
    offload_param_pin_memory: bool = True

    def overlap_comm_for(self, stage: int) -> bool:
        # DeepSpeedZeroConfig.overlap_comm_valid: None becomes (stage == 3)
        return (stage == 3) if self.overlap_comm is None else bool(self.overlap_comm)


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
    gradient_accumulation_steps: int = 1
    """DeepSpeed ``gradient_accumulation_steps``: micro-steps per optimizer step. Above 1 the
    gradients of the earlier micro-steps stay alive into the next (zero_layout.py); the phase
    peaks are those of the worst micro-step of a steady cycle."""
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

    def __post_init__(self) -> None:
        validate_inputs(self)

    def with_(self, **changes: Any) -> "EstimateInputs":
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["model_config"] is not None:
            out["model_config"] = {k: v for k, v in out["model_config"].items() if not k.startswith("_")}
        return out


def validate_inputs(inp: EstimateInputs) -> None:
    """MemprofError, one line naming the bad setting, for anything an estimate cannot use."""
    if inp.model_config is None and inp.n_params is None:
        raise MemprofError("no model: pass --model PRESET, --model-config PATH or --params N")
    if inp.n_params is not None and (not isinstance(inp.n_params, int) or inp.n_params <= 0):
        raise MemprofError(f"parameter count {inp.n_params!r} must be a positive number, e.g. --params 7.5e9")
    _positive_int(inp.world_size, "world size", "--world-size 8 (or --nodes and --gpus-per-node)")
    _positive_int(inp.nodes, "node count", "--nodes 1")
    if inp.world_size % inp.nodes:
        raise MemprofError(f"world size {inp.world_size} is not a multiple of the node count {inp.nodes}")
    if inp.zero_stage not in (0, 1, 2, 3) or isinstance(inp.zero_stage, bool):
        raise MemprofError(f"ZeRO stage {inp.zero_stage!r} does not exist: use --zero-stage 0, 1, 2 or 3")
    if inp.optimizer not in OPTIMIZERS:
        raise MemprofError(f"unknown optimizer {inp.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if inp.precision not in PRECISIONS:
        raise MemprofError(f"unknown precision {inp.precision!r}: choose one of {', '.join(PRECISIONS)}")
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


def _positive_int(value: Any, what: str, example: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise MemprofError(f"{what} {value!r} must be a positive whole number, e.g. {example}")


# ---------------------------------------------------------------------------------------------
# DeepSpeed config reading


def load_deepspeed_config(path: str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed JSON config as a dict; MemprofError when missing, unreadable or malformed."""
    return read_json_object(path, "DeepSpeed config", "check the path")


def settings_from_deepspeed_config(ds: dict[str, Any], source: str = "DeepSpeed config") -> dict[str, Any]:
    """The estimate settings a DeepSpeed config fixes, as ``EstimateInputs`` field names.

    Only what the config states is returned, so flags can override it and defaults fill the rest.
    Bad values raise MemprofError naming the key.
    """
    if not isinstance(ds, dict):
        raise MemprofError(f"{source} must be a JSON object")
    out: dict[str, Any] = {}
    mb = ds.get("train_micro_batch_size_per_gpu")
    if mb is not None and mb != "auto":
        out["micro_batch"] = _cfg_int(mb, "train_micro_batch_size_per_gpu", source, positive=True)
    gas = ds.get("gradient_accumulation_steps")
    if gas is not None and gas != "auto":
        out["gradient_accumulation_steps"] = _cfg_int(gas, "gradient_accumulation_steps", source, positive=True)
    precision = precision_from_config(ds, source)
    if precision is not None:
        out["precision"] = precision
    opt = ds.get("optimizer")
    if opt is not None:
        out["optimizer"] = optimizer_name_from_block(opt, source)
        # engine.get_optimizer_configuration: torch.optim Adam/AdamW only with "torch_adam": true
        if isinstance(opt.get("params"), dict) and opt["params"].get("torch_adam") is True:
            out["torch_adam"] = True
    types = ds.get("data_types")
    if types is not None:
        if not isinstance(types, dict):
            raise MemprofError(f"{source}: data_types must be an object like {{\"grad_accum_dtype\": \"fp32\"}}")
        acc = types.get("grad_accum_dtype")
        if acc is not None:
            acc_name = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                        "fp16": "fp16", "float16": "fp16", "half": "fp16"}.get(str(acc).lower())
            if acc_name is None:
                raise MemprofError(f"{source}: data_types.grad_accum_dtype {acc!r} is not fp32, bf16 or fp16")
            out["grad_accum_dtype"] = acc_name
    zero = ds.get("zero_optimization")
    if zero is not None:
        if isinstance(zero, bool):  # deprecated form: true means stage 1 (read_zero_config_deprecated)
            out["zero_stage"] = 1 if zero else 0
        elif not isinstance(zero, dict):
            raise MemprofError(f"{source}: zero_optimization must be an object")
        else:
            if "stage" in zero:
                out["zero_stage"] = _cfg_int(zero["stage"], "zero_optimization.stage", source)
            out["zero"] = _zero_knobs_from_config(zero, source)
    return out


_KNOB_KEYS = {
    # DeepSpeed key (and alias) -> ZeroKnobs field
    "reduce_bucket_size": "reduce_bucket_size",
    "allgather_bucket_size": "allgather_bucket_size",
    "stage3_prefetch_bucket_size": "prefetch_bucket_size",
    "prefetch_bucket_size": "prefetch_bucket_size",
    "stage3_max_live_parameters": "max_live_parameters",
    "max_live_parameters": "max_live_parameters",
    "stage3_max_reuse_distance": "max_reuse_distance",
    "max_reuse_distance": "max_reuse_distance",
    "stage3_param_persistence_threshold": "param_persistence_threshold",
    "param_persistence_threshold": "param_persistence_threshold",
    "stage3_model_persistence_threshold": "model_persistence_threshold",
    "model_persistence_threshold": "model_persistence_threshold",
    "sub_group_size": "sub_group_size",
}


def _zero_knobs_from_config(zero: dict[str, Any], source: str) -> ZeroKnobs:
    kw: dict[str, Any] = {}
    for key, name in _KNOB_KEYS.items():
        if key in zero and zero[key] != "auto":
            kw[name] = _cfg_int(zero[key], f"zero_optimization.{key}", source)
    for key in ("overlap_comm", "contiguous_gradients"):
        if key in zero and zero[key] is not None:
            if not isinstance(zero[key], bool):
                raise MemprofError(f"{source}: zero_optimization.{key} must be true or false")
            kw[key] = zero[key]
    for key, name in (("offload_optimizer", "offload_optimizer"), ("offload_param", "offload_param")):
        block = zero.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise MemprofError(f"{source}: zero_optimization.{key} must be an object like {{\"device\": \"cpu\"}}")
        device = str(block.get("device", "none")).lower()
        if device not in OFFLOAD_DEVICES:
            raise MemprofError(f"{source}: zero_optimization.{key}.device {device!r} is not modelled: use none or cpu")
        kw[name] = device
        if isinstance(block.get("pin_memory"), bool):
            kw[f"{name}_pin_memory"] = block["pin_memory"]
    # deprecated booleans (DeepSpeedZeroConfig cpu_offload / cpu_offload_param)
    if zero.get("cpu_offload") is True:
        kw.setdefault("offload_optimizer", "cpu")
    if zero.get("cpu_offload_param") is True:
        kw.setdefault("offload_param", "cpu")
    return ZeroKnobs(**kw)


def config_enabled(config: dict[str, Any], key: str, source: str) -> bool:
    """DeepSpeed's ``<key>.enabled`` switch (``fp16``, ``bf16``, ...), read one way by the estimator
    and the launcher: a missing block or a missing ``enabled`` is off; ``enabled`` must be a JSON
    boolean (DeepSpeed's pydantic config would turn the string "false" into off but memprof would
    not know which reading the user meant), anything else is a MemprofError naming the field."""
    block = config.get(key)
    if block is None:
        return False
    if not isinstance(block, dict):
        raise MemprofError(f"{source}: {key} must be an object like {{\"enabled\": true}}")
    value = block.get("enabled", False)
    if not isinstance(value, bool):
        raise MemprofError(f"{source}: {key}.enabled is {value!r}: use true or false (a JSON boolean, not a string or number)")
    return value


def bf16_enabled(config: dict[str, Any], source: str) -> bool:
    """Whether DeepSpeed trains in bf16: its ``bf16`` block, else the older ``bfloat16`` spelling
    (DeepSpeed's get_bfloat16_config reads ``bfloat16`` only when ``bf16`` is absent or null)."""
    return config_enabled(config, "bf16" if config.get("bf16") is not None else "bfloat16", source)


def config_number(params: dict[str, Any], key: str, source: str, default: float = 0.0) -> float:
    """A numeric optimizer setting (``momentum``, ``dampening``, ...) of ``optimizer.params``;
    MemprofError naming the field when it is not a finite number."""
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
        raise MemprofError(f"{source}: optimizer.params.{key} is {value!r}: it must be a number, e.g. 0.9")
    return float(value)


def torch_optimizer_name(kind: str, params: dict[str, Any], source: str) -> str:
    """The zoo name of DeepSpeed's torch.optim ``SGD`` / ``RMSprop`` block (``kind`` lower-cased),
    refusing what torch refuses or what memprof does not model, for the estimator and launcher alike."""
    momentum = config_number(params, "momentum", source)
    if momentum < 0:
        raise MemprofError(f"{source}: optimizer.params.momentum is {params.get('momentum')!r}: it must be 0 or more")
    if kind == "sgd":
        nesterov = bool(params.get("nesterov", False))  # torch.optim.SGD tests its truth value
        if nesterov and (momentum <= 0 or config_number(params, "dampening", source) != 0):
            # torch.optim.SGD: "Nesterov momentum requires a momentum and zero dampening"
            raise MemprofError(f"{source}: SGD with nesterov needs momentum > 0 and dampening 0 in optimizer.params")
        return "nesterov" if nesterov else ("momentum" if momentum > 0 else "sgd")
    if kind == "rmsprop":
        # momentum and centered add buffers (momentum_buffer, grad_avg) the zoo does not model.
        if momentum > 0 or params.get("centered", False):
            raise MemprofError(f"{source}: RMSprop with momentum or centered=true is not supported by memprof: drop them")
        return "rmsprop"
    raise ValueError(f"not a torch.optim type memprof maps: {kind!r}")


def precision_from_config(ds: dict[str, Any], source: str) -> str | None:
    def enabled(key: str) -> bool:
        return config_enabled(ds, key, source)

    fp16, bf16 = enabled("fp16"), bf16_enabled(ds, source)
    if fp16 and bf16:
        raise MemprofError(f"{source} enables both bf16 and fp16: DeepSpeed accepts only one, enable one of them")
    if fp16:
        return "fp16"
    if bf16:
        return "bf16"
    if any(k in ds for k in ("fp16", "bf16", "bfloat16")):
        return "fp32"
    return None


def optimizer_name_from_block(opt: Any, source: str) -> str:
    """Map DeepSpeed's optimizer block to a zoo name (engine._configure_basic_optimizer)."""
    if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
        raise MemprofError(f"{source}: optimizer must be an object with a \"type\", e.g. {{\"type\": \"AdamW\"}}")
    kind = opt["type"].lower()
    params = opt.get("params") or {}
    if not isinstance(params, dict):
        raise MemprofError(f"{source}: optimizer.params must be an object")
    if kind in ("adam", "adamw"):
        # DeepSpeed's "Adam" means AdamW unless adam_w_mode is false (engine._configure_basic_optimizer)
        adam_w = kind == "adamw" or bool(params.get("adam_w_mode", True))
        return "amsgrad" if params.get("amsgrad") else ("adamw" if adam_w else "adam")
    if kind in ("sgd", "rmsprop"):
        return torch_optimizer_name(kind, params, source)
    if kind == "adagrad":
        return "adagrad"
    raise MemprofError(
        f"{source}: optimizer type {opt['type']!r} is not modelled: use Adam, AdamW, SGD, RMSprop or Adagrad"
    )


def _cfg_int(value: Any, key: str, source: str, positive: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise MemprofError(f"{source}: {key} = {value!r} must be a non-negative number")
    if positive and value <= 0:
        raise MemprofError(f"{source}: {key} = {value!r} must be positive")
    if float(value) != int(value):
        raise MemprofError(f"{source}: {key} = {value!r} must be a whole number")
    return int(value)


def _run_int(value: Any, key: str, positive: bool = False) -> int:
    """An integer field of a run's metadata (the launcher writes ints; a JSON writer may emit 2.0)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and float(value) == int(value) and (value > 0 if positive else value >= 0))
    if not ok:
        kind = "a positive whole number" if positive else "a whole number of at least 0"
        raise MemprofError(f"the run's {key} is {value!r}, not {kind}: the run file is corrupted; re-run or re-gather it")
    return int(value)


def inputs_from_run(run: dict[str, Any]) -> EstimateInputs:
    """EstimateInputs for a run's own setup, from the launcher's ``run`` metadata (runfile.py)."""
    if not isinstance(run, dict):
        raise MemprofError("run metadata must be an object")
    ds = run.get("deepspeed_config") or {}
    settings = settings_from_deepspeed_config(ds, "the run's deepspeed_config") if ds else {}
    model_config = run.get("model_config")
    kw: dict[str, Any] = dict(settings)
    for key in ("world_size", "nodes", "zero_stage", "micro_batch", "gradient_accumulation_steps", "seq_len"):
        if run.get(key) is not None:
            kw[key] = _run_int(run[key], key)
    for key in ("optimizer", "precision"):
        if run.get(key) is not None:
            kw[key] = str(run[key])
    if run.get("activation_checkpointing") is not None:
        kw["activation_checkpointing"] = bool(run["activation_checkpointing"])
    if isinstance(model_config, dict):
        kw["model_config"] = model_config
        attn = model_config.get("_attn_implementation") or model_config.get("attn_implementation")
        if attn in ATTN_IMPLEMENTATIONS:
            kw["attn_implementation"] = attn
    elif run.get("n_params") is not None:
        kw["n_params"] = _run_int(run["n_params"], "n_params", positive=True)
    else:
        raise MemprofError(
            "the run records neither model_config nor n_params, so it cannot be re-estimated: "
            "re-run it with a newer memprof launcher"
        )
    if run.get("model") is not None:
        kw["model_name"] = str(run["model"])
    if run.get("device_type") is not None:
        kw["device_type"] = str(run["device_type"])
    # recorded by the launcher on CUDA runs (run_meta.cuda_device_facts), e.g. "9.0"
    if kw.get("device_type") == "cuda" and isinstance(run.get("cuda_capability"), str):
        kw["cuda_capability"] = run["cuda_capability"]
    # what the launcher's own data set tensors hold for the whole run, when the run records it
    data_bytes = run.get("data_tensor_bytes")
    if isinstance(data_bytes, int) and not isinstance(data_bytes, bool) and data_bytes >= 0:
        kw["script_resident_bytes"] = data_bytes
    return EstimateInputs(**kw)
