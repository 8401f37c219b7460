"""Which engine a run trained under and the settings of that engine that shape memory, as words the
page puts in labels, summary rows and the columns of the side-by-side sweep.

The engine is read from the run's record as :func:`memprof.estimate.from_run.inputs_from_run`
reads it: ``run["fsdp2"]`` (recorded by MemoryProfiler for ``fully_shard`` modules,
memprof.measure.ownership.fsdp2.fsdp2_record) or ``run["ddp"]`` (the integrations' DDP wrapper),
each only without a DeepSpeed config; anything else is DeepSpeed. A DeepSpeed run names its ZeRO
stage and the ``zero_optimization`` sizes of that stage (the config's value, or DeepSpeed's default,
said so: memprof.dsconfig.schema.ZeroKnobs); an FSDP2 run names reshard_after_forward, the
MixedPrecisionPolicy dtypes, the sharded dtype, CPU offload and its fully_shard groups.
"""

from __future__ import annotations

from typing import Any

from memprof.dsconfig.schema import ZeroKnobs
from memprof.dsconfig.zero_block import written_zero_block
from memprof.estimate.from_run import recorded_engine
from memprof.run.files import offload_param_of

DEEPSPEED, DDP, FSDP2 = "deepspeed", "ddp", "fsdp2"

# torch dtype names as fsdp2_record writes them -> the precision words of the rest of memprof
# (memprof.estimate.from_run._TORCH_DTYPES)
TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# (config key, the other spelling DeepSpeed accepts, ZeroKnobs field, the stages that use it);
# DeepSpeed 0.19.8 deepspeed/runtime/zero/config.py DeepSpeedZeroConfig: prefetch_bucket_size etc.
# are fields whose alias is the stage3_ spelling
_ZERO_SIZES = (
    ("reduce_bucket_size", None, "reduce_bucket_size", (1, 2, 3)),
    ("allgather_bucket_size", None, "allgather_bucket_size", (1, 2)),
    ("stage3_prefetch_bucket_size", "prefetch_bucket_size", "prefetch_bucket_size", (3,)),
    ("stage3_param_persistence_threshold", "param_persistence_threshold", "param_persistence_threshold", (3,)),
    ("stage3_max_live_parameters", "max_live_parameters", "max_live_parameters", (3,)),
)


def engine_of(run: dict[str, Any]) -> str:
    """``"fsdp2"``, ``"ddp"`` or ``"deepspeed"``: the estimate's own reading of the record
    (memprof.estimate.from_run.recorded_engine)."""
    return recorded_engine(run).value


def precision_of(run: dict[str, Any]) -> str | None:
    """The compute precision, as inputs_from_run takes it: for FSDP2 the record's param_dtype, else
    its sharded parameters' dtype; else (or when the record has neither) the run's ``precision``."""
    if engine_of(run) == FSDP2:
        rec = run["fsdp2"]
        dtype = rec.get("param_dtype") or rec.get("sharded_dtype")
        if dtype is not None:
            return TORCH_DTYPES.get(str(dtype), str(dtype))
    return None if run.get("precision") is None else str(run["precision"])


def model_name(run: dict[str, Any]) -> str:
    """The run's model: its name, else its config's name or model_type, else "?"."""
    if run.get("model") is not None:
        return str(run["model"])
    cfg = run.get("model_config") if isinstance(run.get("model_config"), dict) else {}
    return str(cfg.get("_name_or_path") or cfg.get("model_type") or "?")


def _dtype_words(dtype: Any) -> str:
    return TORCH_DTYPES.get(str(dtype), str(dtype))


def _fsdp2_short(rec: dict[str, Any]) -> str:
    reshard = rec.get("reshard_after_forward")
    parts = ["FSDP2 reshard_after_forward=" + ("mixed" if reshard is None else str(bool(reshard)))]
    if rec.get("param_dtype"):
        parts.append(f"param {_dtype_words(rec['param_dtype'])}")
    if rec.get("reduce_dtype"):
        parts.append(f"reduce {_dtype_words(rec['reduce_dtype'])}")
    return ", ".join(parts)


def engine_short(run: dict[str, Any]) -> str:
    """The engine in a run's one-line label: ``ZeRO-3``, ``FSDP2 reshard_after_forward=True,
    param bf16``, ``DDP``."""
    engine = engine_of(run)
    if engine == FSDP2:
        return _fsdp2_short(run["fsdp2"])
    if engine == DDP:
        return "DDP"
    stage = run.get("zero_stage")
    return f"ZeRO-{stage}" if stage is not None else "ZeRO-?"


def engine_title(run: dict[str, Any]) -> str:
    engine = engine_of(run)
    if engine == FSDP2:
        return "FSDP2 (torch fully_shard)"
    if engine == DDP:
        return "torch DDP"
    stage = run.get("zero_stage")
    return f"DeepSpeed ZeRO stage {stage if stage is not None else '?'}"


def _zero_block(run: dict[str, Any]) -> dict[str, Any]:
    return written_zero_block(run.get("deepspeed_config"))


def _deepspeed_settings(run: dict[str, Any]) -> list[tuple[str, str]]:
    stage = run.get("zero_stage")
    rows = [("ZeRO stage", "?" if stage is None else str(stage)), ("precision", str(run.get("precision", "?")))]
    zero, defaults = _zero_block(run), ZeroKnobs()
    for key, alias, field, stages in _ZERO_SIZES:
        if stage not in stages:
            continue
        value = zero.get(key, zero.get(alias)) if alias else zero.get(key)
        if value is None:
            rows.append((key, f"{getattr(defaults, field):,} elements (DeepSpeed's default)"))
        else:
            rows.append((key, f"{value:,} elements" if isinstance(value, int) and not isinstance(value, bool) else str(value)))
    if stage in (1, 2, 3):
        overlap = zero.get("overlap_comm")
        rows.append(("overlap_comm", str(bool(overlap)) if overlap is not None
                     else f"{defaults.overlap_comm_for(int(stage))} (DeepSpeed's default at stage {stage})"))
    rows.append(("offload", f"optimizer {run.get('offload_optimizer', 'none')}, params {offload_param_of(run)}"))
    return rows


def _fsdp2_settings(run: dict[str, Any]) -> list[tuple[str, str]]:
    rec = run["fsdp2"]
    reshard = rec.get("reshard_after_forward")
    sharded = rec.get("sharded_dtype")
    groups = rec.get("param_groups")
    return [
        ("reshard_after_forward", "differs between groups" if reshard is None else str(bool(reshard))),
        ("param_dtype", _dtype_words(rec["param_dtype"]) if rec.get("param_dtype")
         else "none (computes in the sharded parameters' dtype)"),
        ("reduce_dtype", _dtype_words(rec["reduce_dtype"]) if rec.get("reduce_dtype")
         else "none (gradients reduced in the compute dtype)"),
        ("sharded parameters", f"{'?' if sharded is None else _dtype_words(sharded)}, dim-0 shards over "
                               f"{run.get('world_size', '?')} ranks"),
        ("offload", "params cpu (CPUOffloadPolicy)" if rec.get("offload_params") == "cpu" else "none"),
        ("communication", "?" if groups is None else
         f"{groups} fully_shard groups, each all-gathered and reduce-scattered whole (no bucket sizes)"),
    ]


def engine_settings(run: dict[str, Any]) -> list[dict[str, str]]:
    """The engine's memory-shaping settings as ``{"name", "value"}`` rows, in page order."""
    engine = engine_of(run)
    if engine == FSDP2:
        rows = _fsdp2_settings(run)
    elif engine == DDP:
        ddp = run["ddp"]
        rows = [("precision", str(run.get("precision", "?"))),
                ("gradient_as_bucket_view", str(bool(ddp.get("gradient_as_bucket_view", False))))]
    else:
        rows = _deepspeed_settings(run)
    return [{"name": k, "value": v} for k, v in rows]


def engine_data(run: dict[str, Any]) -> dict[str, Any]:
    """The page's engine block: name, title, short form, settings, and the record it came from
    (the DeepSpeed config, or the fsdp2 / ddp record)."""
    engine = engine_of(run)
    record = run.get("deepspeed_config") if engine == DEEPSPEED else run.get(engine)
    return {"name": engine, "title": engine_title(run), "short": engine_short(run),
            "settings": engine_settings(run), "record": record}
