"""The launcher's settings: command-line flags plus the DeepSpeed JSON, validated before training.

Everything here is plain Python (no torch, no deepspeed import) so bad input fails in well under a
second, before any rank pays for the heavy imports or joins a process group. Every problem raises
:class:`memprof.errors.MemprofError` with one line that names it and says how to fix it.

The DeepSpeed JSON is the single source of the run's training settings (ZeRO stage, optimizer,
precision, batch size, offload, activation checkpointing); the flags only choose the model, the
data, the length of the run and where its files go.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from memprof.errors import MemprofError
from memprof.estimate.inputs import optimizer_name_from_block, precision_from_config
from memprof.jsonfile import read_json_object
from memprof.models import PRESETS, load_model_config, max_positions, preset_config, validate_launchable
from memprof.units import parse_size

# Optimizer "zoo" names, the vocabulary the estimator reads from run metadata.
OPTIMIZER_ZOO: tuple[str, ...] = ("sgd", "momentum", "nesterov", "rmsprop", "adagrad", "adam", "adamw", "amsgrad")

# DeepSpeed lower-cases these optimizer types before matching them (runtime/config.py,
# DEEPSPEED_OPTIMIZERS), so any spelling works.
_CASE_FREE_TYPES = ("adam", "adamw", "adagrad")
# DeepSpeed hands any other type to getattr(torch.optim, type), which is case-sensitive.
_TORCH_TYPES = ("SGD", "RMSprop")
# torch.optim / FusedAdam classes DeepSpeed's ZeRO treats as tested (runtime/zero/utils.py,
# ZERO_SUPPORTED_OPTIMIZERS); anything else needs "zero_allow_untested_optimizer": true.
_ZERO_TESTED_TYPES = ("adam", "adamw", "adagrad")

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
OFFLOAD_DEVICES: tuple[str, ...] = ("none", "cpu")


@dataclass(frozen=True)
class ModelSettings:
    """Which GPT-2 to build."""

    name: str
    """Preset name (``gpt2-tiny`` ... ``gpt2-xl``) or the path of the HF config.json it came from."""
    config: dict[str, Any]
    """The HF GPT-2 config dict as used to build the model."""


@dataclass(frozen=True)
class DataSettings:
    """What the model reads: byte-level tokens of a text, cut into ``seq_len`` windows."""

    seq_len: int
    """Tokens per sample (bytes); at most the model's ``n_positions``."""
    seed: int
    """Seeds the model's random init and each rank's batch sampler (with the rank mixed in)."""
    text_path: Path | None = None
    """A UTF-8 text file to train on; None means the text shipped in ``memprof/data``."""


@dataclass(frozen=True)
class RunSettings:
    """How long to run, where files go, and what the profiler is told."""

    steps: int
    """Training iterations; each is one micro-batch forward, backward and ``engine.step()``."""
    out_dir: Path
    """Folder for ``rank<R>.jsonl``, ``memprof.json`` and ``report.html``."""
    memory_budget_bytes: int | None = None
    """Simulated device capacity handed to the profiler (None: no budget)."""
    profile: bool = True
    """False runs the bare training loop without the profiler (a hidden developer flag)."""


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The DeepSpeed JSON as loaded, plus the facts memprof reads out of it."""

    path: Path
    config: dict[str, Any]
    """The whole JSON object, exactly as loaded; handed unchanged to ``deepspeed.initialize``."""
    zero_stage: int
    optimizer: str
    """One of :data:`OPTIMIZER_ZOO`, derived from the "optimizer" block."""
    precision: str
    """``fp32``, ``bf16`` or ``fp16``, from the ``bf16`` / ``fp16`` blocks."""
    micro_batch: int
    """Samples per rank per micro-step (``train_micro_batch_size_per_gpu``, or derived)."""
    gradient_accumulation_steps: int
    offload_optimizer: str
    """``none`` or ``cpu`` (zero_optimization.offload_optimizer.device)."""
    offload_params: str
    """``none`` or ``cpu`` (zero_optimization.offload_param.device, ZeRO-3 only)."""
    activation_checkpointing: bool
    """True when the JSON has an ``activation_checkpointing`` block: the launcher then turns on
    the HF model's gradient checkpointing (one checkpoint per transformer block)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything one launch needs, validated."""

    model: ModelSettings
    data: DataSettings
    run: RunSettings
    deepspeed: DeepSpeedSettings
    local_rank_flag: int | None = field(default=None)
    """``--local_rank`` as passed by the deepspeed launcher (the env LOCAL_RANK wins when set)."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises MemprofError instead of printing usage and exiting, so every bad flag
    reaches the user as the same single ``train.py: error: ...`` line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise MemprofError(f"{message} (see --help)")


def build_arg_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(
        prog="train.py",
        description="Train a randomly initialised GPT-2 under DeepSpeed and profile its memory. "
        "All training settings come from the DeepSpeed JSON named by --deepspeed_config.",
    )
    p.add_argument("--deepspeed_config", required=True, metavar="PATH", help="DeepSpeed JSON config (the single source of training settings)")
    # deepspeed.add_config_arguments() adds --deepspeed; accept it so command lines written for it work.
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, metavar="PRESET", help=f"model preset: {', '.join(PRESETS)} (default gpt2-tiny)")
    model.add_argument("--model-config", default=None, metavar="PATH", help="an HF config.json (model_type gpt2, llama, mistral or qwen2) instead of a preset")
    p.add_argument("--steps", type=int, default=3, help="training iterations (default 3)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per sample (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for model init and data sampling (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for rank<R>.jsonl, memprof.json, report.html")
    p.add_argument("--memory-budget", default=None, metavar="SIZE", help="simulated device capacity, e.g. 2GiB (default: none)")
    p.add_argument("--data", default=None, metavar="PATH", help="UTF-8 text file to train on (default: the text shipped with memprof)")
    # The deepspeed launcher appends --local_rank=N to the script's arguments.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # Developer switch: run the bare loop without the profiler (nothing is written to --out).
    p.add_argument("--no-profile", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str], environ: Mapping[str, str] | None = None) -> TrainConfig:
    """Parse and validate the launcher's flags and DeepSpeed JSON; MemprofError on any problem.

    ``environ`` (default ``os.environ``) supplies WORLD_SIZE, needed only when the JSON gives
    ``train_batch_size`` instead of ``train_micro_batch_size_per_gpu``.
    """
    environ = os.environ if environ is None else environ
    args = build_arg_parser().parse_args(argv)

    model = _model_settings(args.model, args.model_config)
    if args.steps < 1:
        raise MemprofError(f"--steps {args.steps} must be at least 1")
    if args.seq_len < 1:
        raise MemprofError(f"--seq-len {args.seq_len} must be at least 1")
    field, n_positions = max_positions(model.config)
    if args.seq_len > n_positions:
        raise MemprofError(
            f"--seq-len {args.seq_len} exceeds the model's {field} ({n_positions}): use --seq-len {n_positions} or less"
        )
    if args.seed < 0:
        raise MemprofError(f"--seed {args.seed} must be 0 or more")
    budget = parse_size(args.memory_budget, "--memory-budget") if args.memory_budget is not None else None
    text_path = Path(args.data) if args.data is not None else None
    if text_path is not None and not text_path.is_file():
        raise MemprofError(f"--data {text_path} is not a file: pass a UTF-8 text file or leave --data out")

    world_size = _int_env(environ, "WORLD_SIZE", default=1)
    ds = load_deepspeed_config(args.deepspeed_config, world_size=world_size)
    out_dir = Path(args.out)
    check_writable_dir(out_dir)

    return TrainConfig(
        model=model,
        data=DataSettings(seq_len=args.seq_len, seed=args.seed, text_path=text_path),
        run=RunSettings(steps=args.steps, out_dir=out_dir, memory_budget_bytes=budget, profile=not args.no_profile),
        deepspeed=ds,
        local_rank_flag=args.local_rank,
    )


def _model_settings(preset: str | None, config_path: str | None) -> ModelSettings:
    if config_path is not None:
        config = load_model_config(config_path)
        name = config_path
    else:
        name = preset or "gpt2-tiny"
        config = preset_config(name)
    validate_launchable(config, name)  # models.py: family, shape, vocabulary
    return ModelSettings(name=name, config=config)


def load_deepspeed_config(path: str | os.PathLike, world_size: int = 1) -> DeepSpeedSettings:
    """Read and validate a DeepSpeed JSON; MemprofError naming the file and field on any problem."""
    path = Path(path)
    config = read_json_object(path, "DeepSpeed config", "pass --deepspeed_config configs/<name>.json")
    where = str(path)

    zero = _section(config, "zero_optimization", where)
    stage = zero.get("stage", 0)
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= 3:
        raise MemprofError(f"{where}: zero_optimization.stage is {stage!r}: ZeRO stages are 0, 1, 2 or 3")

    grad_accum = _positive_int(config.get("gradient_accumulation_steps", 1), "gradient_accumulation_steps", where)
    micro_batch = _micro_batch(config, grad_accum, world_size, where)
    precision = _precision(config, where)
    optimizer = optimizer_zoo_name(config.get("optimizer"), stage, config, where)
    offload_optimizer = _offload_device(zero, "offload_optimizer", where)
    offload_params = _offload_device(zero, "offload_param", where)
    if offload_optimizer != "none" and stage == 0:
        raise MemprofError(f"{where}: offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0)")
    if offload_params != "none" and stage != 3:
        raise MemprofError(f"{where}: offload_param needs ZeRO stage 3 (stage is {stage})")
    activation_checkpointing = _activation_checkpointing(config, where)

    return DeepSpeedSettings(
        path=path,
        config=config,
        zero_stage=stage,
        optimizer=optimizer,
        precision=precision,
        micro_batch=micro_batch,
        gradient_accumulation_steps=grad_accum,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        activation_checkpointing=activation_checkpointing,
    )


def optimizer_zoo_name(block: Any, stage: int, config: Mapping[str, Any], where: str = "DeepSpeed config") -> str:
    """The zoo name (:data:`OPTIMIZER_ZOO`) of a DeepSpeed "optimizer" block, checking that
    DeepSpeed will accept it at this ZeRO stage on any accelerator."""
    supported = "SGD, RMSprop, Adagrad, Adam, AdamW"
    if block is None:
        raise MemprofError(f'{where} has no "optimizer" block: add one, e.g. {{"type": "AdamW", "params": {{"lr": 1e-4}}}}')
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise MemprofError(f'{where}: "optimizer" must be an object with a string "type" ({supported})')
    opt_type: str = block["type"]
    params = block.get("params", {})
    if not isinstance(params, dict):
        raise MemprofError(f'{where}: optimizer.params must be an object')
    lower = opt_type.lower()

    if lower in _CASE_FREE_TYPES or opt_type in _TORCH_TYPES:
        if lower in ("adam", "adamw") and params.get("amsgrad") and not params.get("torch_adam", False):
            # DeepSpeed's FusedAdam (used unless torch_adam is set) raises on amsgrad.
            raise MemprofError(f'{where}: amsgrad needs "torch_adam": true in optimizer.params (FusedAdam has no AMSGrad)')
        # the estimator's reader: launcher and estimate name every block the same way
        name = optimizer_name_from_block(block, where)
    else:
        hint = next((t for t in _TORCH_TYPES if t.lower() == lower), None)
        did_you_mean = f" (DeepSpeed passes it to torch.optim, which is case-sensitive: write {hint!r})" if hint else ""
        raise MemprofError(f"{where}: unknown optimizer type {opt_type!r}{did_you_mean}: use one of {supported}")

    tested = lower in _ZERO_TESTED_TYPES
    if stage > 0 and not tested and not config.get("zero_allow_untested_optimizer", False):
        raise MemprofError(
            f'{where}: DeepSpeed refuses {opt_type} under ZeRO stage {stage} unless the config sets "zero_allow_untested_optimizer": true'
        )
    return name


def check_writable_dir(out_dir: Path) -> None:
    """Create ``out_dir`` if needed and prove a file can be written there, so a bad --out fails
    before training instead of after it."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".memprof-write-check-"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise MemprofError(f"--out {out_dir} is not a writable folder ({reason}): choose another path") from None


def _section(config: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise MemprofError(f"{where}: {key} must be an object")
    return value


def _positive_int(value: Any, what: str, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MemprofError(f"{where}: {what} is {value!r}: it must be an integer of at least 1")
    return value


def _micro_batch(config: Mapping[str, Any], grad_accum: int, world_size: int, where: str) -> int:
    if "train_micro_batch_size_per_gpu" in config:
        micro = _positive_int(config["train_micro_batch_size_per_gpu"], "train_micro_batch_size_per_gpu", where)
        if "train_batch_size" in config:
            total = _positive_int(config["train_batch_size"], "train_batch_size", where)
            if total != micro * grad_accum * world_size:
                raise MemprofError(
                    f"{where}: train_batch_size {total} != micro-batch {micro} x gradient_accumulation_steps {grad_accum} "
                    f"x world size {world_size}: drop train_batch_size and DeepSpeed derives it"
                )
        return micro
    if "train_batch_size" in config:
        total = _positive_int(config["train_batch_size"], "train_batch_size", where)
        if total % (grad_accum * world_size):
            raise MemprofError(
                f"{where}: train_batch_size {total} is not divisible by gradient_accumulation_steps {grad_accum} "
                f"x world size {world_size}: set train_micro_batch_size_per_gpu instead"
            )
        return total // (grad_accum * world_size)
    raise MemprofError(f"{where} sets neither train_micro_batch_size_per_gpu nor train_batch_size: add train_micro_batch_size_per_gpu")


def _precision(config: Mapping[str, Any], where: str) -> str:
    # the estimator's reader: "enabled" must be a JSON boolean, one of bf16/fp16 at most
    return precision_from_config(dict(config), where) or "fp32"


def _offload_device(zero: Mapping[str, Any], key: str, where: str) -> str:
    block = zero.get(key)
    if block is None:
        return "none"
    if not isinstance(block, dict):
        raise MemprofError(f"{where}: zero_optimization.{key} must be an object")
    device = str(block.get("device", "none")).lower()
    if device not in OFFLOAD_DEVICES:
        raise MemprofError(f"{where}: zero_optimization.{key}.device {device!r} is not supported by memprof: use 'cpu' or 'none'")
    return device


def _activation_checkpointing(config: Mapping[str, Any], where: str) -> bool:
    if "activation_checkpointing" not in config:
        return False
    block = _section(config, "activation_checkpointing", where)
    # The HF model checkpoints through torch.utils.checkpoint, which has no DeepSpeed extras.
    unsupported = [k for k in ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization") if block.get(k)]
    if unsupported:
        raise MemprofError(
            f"{where}: activation_checkpointing.{unsupported[0]} is not supported by the launcher "
            "(it checkpoints with torch.utils.checkpoint): remove it"
        )
    return True


def _int_env(environ: Mapping[str, str], key: str, default: int) -> int:
    value = environ.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise MemprofError(f"environment variable {key}={value!r} is not an integer") from None
