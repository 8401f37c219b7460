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

from memprof.dsconfig import (
    OFFLOAD_DEVICES,
    OPTIMIZERS,
    PRECISIONS,
    DeepSpeedSettings,
    ZeroKnobs,
    load_config_file,
    read_deepspeed_config,
)
from memprof.engines import Engine, check_engine
from memprof.errors import MemprofError
from memprof.units import is_positive_int

__all__ = [
    "OFFLOAD_DEVICES",
    "OPTIMIZERS",
    "PRECISIONS",
    "EstimateInputs",
    "ZeroKnobs",
    "hidden_size_of",
    "inputs_from_run",
    "load_deepspeed_config",
    "settings_from_deepspeed_config",
    "settings_from_ds",
    "settings_from_setup_files",
]

LAYOUTS: tuple[str, ...] = ("deepspeed", "zero-paper")
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager")


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
    config_notes: tuple[str, ...] = ()
    """What reading the DeepSpeed config decided that the numbers above do not show: each "auto"
    and what it became, keys ignored at this stage, checkpointing from the config's block. The
    estimate lists them among its assumptions."""
    auto_values: dict[str, Any] = field(default_factory=dict)
    """``{dotted config key: value}`` for every "auto" the config had, as resolved."""

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
    check_engine(inp.engine, inp.zero_stage)
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
    if not is_positive_int(value):
        raise MemprofError(f"{what} {value!r} must be a positive whole number, e.g. {example}")


# ---------------------------------------------------------------------------------------------
# DeepSpeed config reading: memprof.dsconfig reads; this turns its settings into EstimateInputs fields


def load_deepspeed_config(path: str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed config file as a dict; MemprofError when missing, unreadable or malformed."""
    return load_config_file(path, "check the path")


def settings_from_ds(settings: DeepSpeedSettings) -> dict[str, Any]:
    """The ``EstimateInputs`` fields a read DeepSpeed config fixes (flags may override them after).

    An "auto" that changes memory and that nothing settled is a MemprofError naming the flag."""
    missing = settings.unresolved()
    if missing:
        by_fix: dict[str, list[str]] = {}
        for a in missing:
            by_fix.setdefault(a.how, []).append(a.key)
        what = "; ".join(f"{' and '.join(keys)}: {fix}" for fix, keys in by_fix.items())
        raise MemprofError(f'{settings.source} leaves "auto" values that change memory and that nothing settles: {what}')
    out: dict[str, Any] = {"zero_stage": settings.zero_stage, "zero": settings.zero,
                           "gradient_accumulation_steps": settings.gradient_accumulation_steps,
                           "config_notes": tuple(settings.notes()), "auto_values": settings.auto_values()}
    if settings.precision is not None:
        out["precision"] = settings.precision
    if settings.optimizer is not None:
        out["optimizer"] = settings.optimizer
        # engine.get_optimizer_configuration: torch.optim Adam/AdamW only with "torch_adam": true
        if settings.torch_adam:
            out["torch_adam"] = True
    if settings.micro_batch is not None:
        out["micro_batch"] = settings.micro_batch
    if settings.grad_accum_dtype is not None:
        out["grad_accum_dtype"] = settings.grad_accum_dtype
    if settings.activation_checkpointing:
        out["activation_checkpointing"] = True
    return out


def settings_from_deepspeed_config(ds: dict[str, Any], source: str = "DeepSpeed config", **resolve: Any) -> dict[str, Any]:
    """The estimate settings a DeepSpeed config dict fixes, as ``EstimateInputs`` field names.

    ``resolve`` (world_size, hidden_size, micro_batch, gradient_accumulation_steps, precision) goes
    to :func:`memprof.dsconfig.read_deepspeed_config` to settle "auto" values. Bad values raise
    MemprofError naming the key.
    """
    if not isinstance(ds, dict):
        raise MemprofError(f"{source} must be a JSON object")
    return settings_from_ds(read_deepspeed_config(ds, source=source, **resolve))


def hidden_size_of(model_config: dict[str, Any] | None) -> int | None:
    """The hidden size HF's Trainer reads (``model.config.hidden_size``; GPT-2's maps to ``n_embd``)."""
    if not isinstance(model_config, dict):
        return None
    for key in ("hidden_size", "n_embd", "d_model"):
        value = model_config.get(key)
        if is_positive_int(value):
            return value
    return None


def settings_from_setup_files(
    *,
    deepspeed_config: str | os.PathLike | None = None,
    accelerate_config: str | os.PathLike | None = None,
    model_config: dict[str, Any] | None = None,
    world_size: int | None = None,
    micro_batch: int | None = None,
    gradient_accumulation_steps: int | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """``EstimateInputs`` fields from the user's setup files, for ``memprof estimate`` / ``plan``.

    The accelerate YAML gives the world size, the nodes and (unless ``deepspeed_config`` is also
    given, which wins) the DeepSpeed config; the flags' values (``world_size``, ``micro_batch``,
    ``gradient_accumulation_steps``, ``precision``) and the model's hidden size settle "auto"
    values as HF's Trainer would. The caller lets its flags override what is returned.
    """
    out: dict[str, Any] = {}
    notes: list[str] = []
    ds: dict[str, Any] | None = None
    source = "DeepSpeed config"
    if accelerate_config is not None:
        from memprof.accelerate_config import read_accelerate_config

        acc = read_accelerate_config(accelerate_config)
        if acc.num_processes is not None:
            out["world_size"] = acc.num_processes
        if acc.num_machines is not None:
            out["nodes"] = acc.num_machines
        if deepspeed_config is None:
            ds, source = acc.deepspeed_config, acc.deepspeed_source
            notes += acc.notes
        else:
            notes.append(f"--deepspeed-config {deepspeed_config} used instead of {accelerate_config}'s deepspeed_config")
    if deepspeed_config is not None:
        ds, source = load_deepspeed_config(deepspeed_config), f"DeepSpeed config {deepspeed_config}"
    world = world_size or out.get("world_size") or 1
    if ds is not None:
        settings = read_deepspeed_config(ds, source=source, world_size=world, hidden_size=hidden_size_of(model_config),
                                         micro_batch=micro_batch, gradient_accumulation_steps=gradient_accumulation_steps,
                                         precision=precision)
        fields = settings_from_ds(settings)
        if settings.optimizer is None:
            notes.append("the DeepSpeed config has no optimizer block (the training script brings its own, e.g. HF "
                         "Trainer's torch.optim.AdamW): estimated with --optimizer's choice, default adamw (add "
                         "--torch-adam for torch's AdamW)")
        fields["config_notes"] = tuple(notes) + fields["config_notes"]
        out.update(fields)
    elif notes:
        out["config_notes"] = tuple(notes)
    if gradient_accumulation_steps is not None:
        out["gradient_accumulation_steps"] = gradient_accumulation_steps
    return out


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
    world = run.get("world_size")
    world = world if is_positive_int(world) else 1
    settings = settings_from_deepspeed_config(ds, "the run's deepspeed_config", world_size=world) if ds else {}
    model_config = run.get("model_config")
    kw: dict[str, Any] = dict(settings)
    for key in ("world_size", "nodes", "zero_stage", "micro_batch", "seq_len"):
        if run.get(key) is not None:
            kw[key] = _run_int(run[key], key)
    for key in ("optimizer", "precision"):
        if run.get(key) is not None:
            kw[key] = str(run[key])
    if run.get("gradient_accumulation_steps") is not None:
        kw["gradient_accumulation_steps"] = _run_int(run["gradient_accumulation_steps"], "gradient_accumulation_steps", positive=True)
    if run.get("activation_checkpointing") is not None:
        kw["activation_checkpointing"] = bool(run["activation_checkpointing"])
    if isinstance(run.get("ddp"), dict) and not ds:  # recorded by memprof.integrations for a DDP wrapper
        kw.update(engine=Engine.DDP, ddp_gradient_as_bucket_view=bool(run["ddp"].get("gradient_as_bucket_view", False)))
    # a torch.optim Adam the framework built itself (HF Trainer, accelerate: memprof.integrations)
    # keeps a step tensor per parameter, which its DeepSpeed config cannot say
    if run.get("torch_adam") is True:
        kw["torch_adam"] = True
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
