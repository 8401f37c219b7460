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
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memprof.argparsing import MemprofArgumentParser, positive_int, positive_size
from memprof.dsconfig import DeepSpeedSettings, launchable_optimizer_name, read_deepspeed_config
from memprof.errors import MemprofError
from memprof.models import PRESETS, load_model_config, max_positions, preset_config, validate_launchable
from memprof.peft_config import LoraSetup, read_peft_config

# Reading the config, DeepSpeed's own launch-time refusals (strict=True) and the vocabularies live in
# memprof.dsconfig; the optimizer zoo in memprof.optimizers. Here: the launcher's flags.
optimizer_zoo_name = launchable_optimizer_name  # the launcher's name for it (tests, older callers)


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


@dataclass(frozen=True)
class TrainConfig:
    """Everything one launch needs, validated."""

    model: ModelSettings
    data: DataSettings
    run: RunSettings
    deepspeed: DeepSpeedSettings
    """The DeepSpeed JSON as read by memprof.dsconfig (``.config`` is the object as loaded)."""
    local_rank_flag: int | None = field(default=None)
    """``--local_rank`` as passed by the deepspeed launcher (the env LOCAL_RANK wins when set)."""
    peft: LoraSetup | None = None
    """``--peft-config``: the LoRA adapters PEFT wraps the model with before ``deepspeed.initialize``
    (read and checked against the model by memprof.peft_config / memprof.estimate.lora_shape)."""
    peft_config_raw: dict[str, Any] | None = None
    """The adapter_config.json object as loaded (what ``peft.LoraConfig`` is built from)."""


def build_arg_parser() -> argparse.ArgumentParser:
    # every bad flag reaches the user as one ``train.py: error: ...`` line, exit code 2
    p = MemprofArgumentParser(
        prog="train.py",
        description="Train a randomly initialised GPT-2 under DeepSpeed and profile its memory. "
        "All training settings come from the DeepSpeed JSON named by --deepspeed_config.",
    )
    p.add_argument("--deepspeed_config", required=True, metavar="PATH",
                   help="DeepSpeed JSON config (the single source of training settings)")
    # deepspeed.add_config_arguments() adds --deepspeed; accept it so command lines written for it work.
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--model", default=None, metavar="PRESET", help=f"model preset: {', '.join(PRESETS)} (default gpt2-tiny)")
    model.add_argument("--model-config", default=None, metavar="PATH",
                       help="an HF config.json (model_type gpt2, llama, mistral or qwen2) instead of a preset")
    p.add_argument("--steps", type=positive_int("--steps"), default=3, help="training iterations (default 3)")
    p.add_argument("--seq-len", type=positive_int("--seq-len"), default=128, help="tokens (bytes) per sample (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for model init and data sampling (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for rank<R>.jsonl, memprof.json, report.html")
    p.add_argument("--memory-budget", type=positive_size("--memory-budget"), default=None, metavar="SIZE",
                   help="simulated device capacity, e.g. 2GiB (default: none)")
    p.add_argument("--peft-config", default=None, metavar="PATH",
                   help="PEFT adapter_config.json (LoRA): wrap the model with get_peft_model before deepspeed.initialize")
    p.add_argument("--data", default=None, metavar="PATH", help="UTF-8 text file to train on (default: the text shipped with memprof)")
    # The deepspeed launcher appends --local_rank=N to the script's arguments.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(
    argv: list[str],
    environ: Mapping[str, str] | None = None,
    check_precision: Callable[[str], None] | None = None,
) -> TrainConfig:
    """Parse and validate the launcher's flags and DeepSpeed JSON; MemprofError on any problem.

    ``environ`` (default ``os.environ``) supplies WORLD_SIZE, needed only when the JSON gives
    ``train_batch_size`` instead of ``train_micro_batch_size_per_gpu``. ``check_precision`` (the
    launcher passes :func:`check_precision_supported`) vets the config's precision on this
    machine before the --out folder is created.
    """
    environ = os.environ if environ is None else environ
    args = build_arg_parser().parse_args(argv)

    model = _model_settings(args.model, args.model_config)
    field, n_positions = max_positions(model.config)
    if args.seq_len > n_positions:
        raise MemprofError(
            f"--seq-len {args.seq_len} exceeds the model's {field} ({n_positions}): use --seq-len {n_positions} or less"
        )
    if args.seed < 0:
        raise MemprofError(f"--seed {args.seed} must be 0 or more")
    budget = args.memory_budget
    text_path = Path(args.data) if args.data is not None else None
    if text_path is not None and not text_path.is_file():
        raise MemprofError(f"--data {text_path} is not a file: pass a UTF-8 text file or leave --data out")

    peft, peft_raw = _peft_settings(args.peft_config, model.config)
    world_size = _int_env(environ, "WORLD_SIZE", default=1)
    ds = load_deepspeed_config(args.deepspeed_config, world_size=world_size)
    if check_precision is not None:
        check_precision(ds.precision)
    out_dir = Path(args.out)
    check_writable_dir(out_dir)

    return TrainConfig(
        model=model,
        data=DataSettings(seq_len=args.seq_len, seed=args.seed, text_path=text_path),
        run=RunSettings(steps=args.steps, out_dir=out_dir, memory_budget_bytes=budget),
        deepspeed=ds,
        local_rank_flag=args.local_rank,
        peft=peft,
        peft_config_raw=peft_raw,
    )


def _peft_settings(path: str | None, model_config: dict[str, Any]) -> tuple[LoraSetup | None, dict[str, Any] | None]:
    """``--peft-config``: the LoRA setup, refused in one line where memprof does not model it or the
    model lacks a target (checked on the model's shape, before anything is built)."""
    if path is None:
        return None, None
    from memprof.estimate.model_shapes import model_shape

    lora = read_peft_config(path)
    model_shape(model_config, None, lora)  # a target the model does not have: MemprofError
    file = os.path.join(path, "adapter_config.json") if os.path.isdir(path) else path
    with open(file, encoding="utf-8") as f:
        return lora, json.load(f)


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
    """Read a DeepSpeed JSON as DeepSpeed would be handed it (memprof.dsconfig, strict mode: what
    the launcher needs to run it); MemprofError naming the file and field on any problem."""
    return read_deepspeed_config(Path(path), world_size=world_size, fix_missing="pass --deepspeed_config configs/<name>.json",
                                 strict=True)


def check_precision_supported(precision: str, accelerator: Any = None) -> None:
    """MemprofError, before anything is trained, when DeepSpeed's accelerator lacks ``precision``.

    DeepSpeed's engine refuses it only inside ``deepspeed.initialize`` (``engine._do_sanity_check``:
    "Type fp16 is not supported on your device", a traceback). On the CPU accelerator
    ``is_fp16_supported()`` is ``torch.ops.mkldnn._is_mkldnn_fp16_supported()`` (oneDNN fp16
    kernels: AVX512-FP16 or AMX-FP16) and ``is_bf16_supported()`` is always true. ``accelerator``
    defaults to ``deepspeed.accelerator.get_accelerator()`` (imports torch)."""
    if precision not in ("fp16", "bf16"):
        return
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    supported = accelerator.is_fp16_supported() if precision == "fp16" else accelerator.is_bf16_supported()
    if supported:
        return
    device = accelerator.device_name()
    other = "bf16" if precision == "fp16" else "fp16"
    on_cpu = device == "cpu"
    why = " (torch's oneDNN has no fp16 kernels for this CPU: it needs AVX512-FP16 or AMX-FP16)" if on_cpu and precision == "fp16" else ""
    raise MemprofError(
        f"{precision} is not supported by DeepSpeed's {device} accelerator on this machine{why}: "
        f"use {other} or fp32 on this {'CPU' if on_cpu else 'device'} (enable the {other} block instead, or drop the {precision} block)"
    )


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


def _int_env(environ: Mapping[str, str], key: str, default: int) -> int:
    value = environ.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise MemprofError(f"environment variable {key}={value!r} is not an integer") from None
