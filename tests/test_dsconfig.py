"""The one DeepSpeed-config reader (memprof.dsconfig): the launcher's path and the estimator's path
resolve every shipped config alike; HF "auto" values, DeepSpeed's aliases and derived batch sizes,
keys ignored at a stage, the features memprof refuses, accelerate YAML.

Expected values are written down from the JSON files and the rules of transformers'
HfTrainerDeepSpeedConfig / DeepSpeed 0.19.8 (runtime/config.py, runtime/zero/config.py), not
from memprof's output: e.g. GPT-2's hidden size is 768, so reduce_bucket_size "auto" is 768**2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from memprof.cli.cli_args import inputs_from_args
from memprof.cli.estimate import build_parser
from memprof.estimate import estimate, inputs_from_run
from memprof.train.config import load_deepspeed_config, parse_args
from memprof.train.launched_run import DistributedFacts, describe_launched_run

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
USER = Path(__file__).resolve().parent / "user_configs"
MEMPROF = [sys.executable, "-m", "memprof"]
H = 768  # GPT-2 (124M) hidden size, n_embd


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MEMPROF, *args], capture_output=True, text=True, timeout=120, cwd=REPO, check=False)


def estimate_inputs(*args: str) -> dict[str, Any]:
    out = run("estimate", *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["inputs"]


def one_line_error(*args: str) -> str:
    out = run(*args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in out.stderr and out.stdout == "", out.stderr[-2000:]
    return lines[0]


# ---- every shipped config: launcher and estimator resolve the same settings ---------------------


def _settings_tuple(stage, optimizer, precision, micro, gas, off_opt, off_par, ckpt, zero, torch_adam, acc_dtype):
    return {"zero_stage": stage, "optimizer": optimizer, "precision": precision, "micro_batch": micro,
            "gradient_accumulation_steps": gas, "offload_optimizer": off_opt, "offload_param": off_par,
            "activation_checkpointing": ckpt, "zero": zero, "torch_adam": torch_adam, "grad_accum_dtype": acc_dtype}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_launcher_and_estimator_resolve_every_shipped_config_alike(path: Path, tmp_path: Path) -> None:
    world = 2
    launcher = load_deepspeed_config(path, world_size=world)
    from_launcher = _settings_tuple(launcher.zero_stage, launcher.optimizer, launcher.precision, launcher.micro_batch,
                                    launcher.gradient_accumulation_steps, launcher.offload_optimizer, launcher.offload_param,
                                    launcher.activation_checkpointing, launcher.zero, launcher.torch_adam, launcher.grad_accum_dtype)

    # the estimator's path: `memprof estimate --deepspeed-config PATH --world-size 2` as parsed by the CLI
    args = build_parser().parse_args(["--model", "gpt2-tiny", "--deepspeed-config", str(path), "--world-size", str(world)])
    inp = inputs_from_args(args, world)
    from_estimator = _settings_tuple(inp.zero_stage, inp.optimizer, inp.precision, inp.micro_batch, inp.gradient_accumulation_steps,
                                     inp.zero.offload_optimizer, inp.zero.offload_param, inp.activation_checkpointing, inp.zero,
                                     inp.torch_adam, inp.grad_accum_dtype)
    assert from_estimator == from_launcher

    # and the run's own estimate (the launcher's metadata read back by the estimator)
    cfg = parse_args(["--deepspeed_config", str(path), "--out", str(tmp_path)], environ={"WORLD_SIZE": str(world)})
    meta = describe_launched_run(cfg, DistributedFacts(world_size=world, nodes=1, device_type="cpu", backend="gloo"), n_params=149_248)
    rin = inputs_from_run(meta)
    from_run = _settings_tuple(rin.zero_stage, rin.optimizer, rin.precision, rin.micro_batch, rin.gradient_accumulation_steps,
                               rin.zero.offload_optimizer, rin.zero.offload_param, rin.activation_checkpointing, rin.zero,
                               rin.torch_adam, rin.grad_accum_dtype)
    assert from_run == from_launcher


def test_vocabularies_and_element_sizes_are_defined_once() -> None:
    import memprof.dsconfig as ds
    import memprof.estimate.zero_layout as layout
    import memprof.optimizers as zoo
    import memprof.train.config as train
    from memprof.cli import cli_args
    from memprof.estimate import inputs

    assert inputs.OPTIMIZERS is ds.OPTIMIZERS is zoo.OPTIMIZERS
    assert inputs.PRECISIONS is ds.PRECISIONS and inputs.OFFLOAD_DEVICES is ds.OFFLOAD_DEVICES
    assert cli_args.OPTIMIZERS is zoo.OPTIMIZERS and cli_args.PRECISIONS is ds.PRECISIONS
    assert layout.ELEMENT_SIZE is ds.ELEMENT_SIZE and ds.ELEMENT_SIZE == {"fp32": 4, "bf16": 2, "fp16": 2}
    assert inputs.ZeroKnobs is ds.ZeroKnobs
    for gone in ("OPTIMIZER_ZOO", "PRECISIONS", "OFFLOAD_DEVICES", "_CASE_FREE_TYPES", "_TORCH_TYPES", "_ZERO_TESTED_TYPES"):
        assert not hasattr(train, gone)
    from memprof.train import data

    assert not hasattr(data, "BYTE_VOCAB")


def _reads_of(key: str, path: Path) -> list[int]:
    """Lines of ``path`` that read ``key`` out of a mapping (``x[key]`` or ``x.get(key)``)."""
    import ast

    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == key:
            lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args
              and isinstance(node.args[0], ast.Constant) and node.args[0].value == key):
            lines.append(node.lineno)
    return lines


# every module but memprof.dsconfig reads the zero_optimization block through the reader
# (another engineer's file; the lead switches it)
_NOT_YET_THROUGH_THE_READER: set[str] = set()


def test_only_the_reader_reads_the_zero_optimization_block() -> None:
    root = REPO / "memprof"
    readers = {str(p.relative_to(root)) for p in root.rglob("*.py") if _reads_of("zero_optimization", p)}
    assert {r for r in readers if not r.startswith("dsconfig/")} <= _NOT_YET_THROUGH_THE_READER


def test_offload_devices_of_a_config_deepspeed_ran() -> None:
    from memprof.dsconfig import offload_devices

    assert offload_devices({}) == ("none", "none")
    assert offload_devices({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                  "offload_param": {"device": "nvme"}}}) == ("cpu", "nvme")
    # offload_param only at stage 3 (DeepSpeed's stage 0-2 engines ignore it); the deprecated boolean
    assert offload_devices({"zero_optimization": {"stage": 2, "cpu_offload": True, "offload_param": {"device": "cpu"}}}) == (
        "cpu", "none")


# ---- configs as projects ship them ---------------------------------------------------------------

FLAGS = ("--model", "gpt2", "--world-size", "2")


def test_hf_zero2_auto_resolves_as_the_trainer_would() -> None:
    inp = estimate_inputs(*FLAGS, "--deepspeed-config", str(USER / "hf_zero2_auto.json"),
                          "--precision", "bf16", "--micro-batch", "2", "--gradient-accumulation-steps", "3")
    assert (inp["precision"], inp["micro_batch"], inp["gradient_accumulation_steps"], inp["zero_stage"]) == ("bf16", 2, 3, 2)
    assert inp["zero"]["reduce_bucket_size"] == H * H == 589_824
    assert inp["zero"]["allgather_bucket_size"] == 200_000_000  # 2e8, a float in the JSON
    assert inp["zero"]["overlap_comm"] is True and inp["zero"]["offload_optimizer"] == "cpu"
    assert inp["auto_values"] == {"zero_optimization.reduce_bucket_size": H * H, "fp16.enabled": False, "bf16.enabled": True,
                                  "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3,
                                  "train_batch_size": 2 * 3 * 2}
    notes = "\n".join(inp["config_notes"])
    assert 'zero_optimization.reduce_bucket_size "auto" -> 589824' in notes
    assert "optimizer.params.lr" in notes and "no effect on memory" in notes


def test_hf_zero3_auto_fills_the_hidden_size_keys() -> None:
    out = run("estimate", *FLAGS, "--deepspeed-config", str(USER / "hf_zero3_auto.json"), "--precision", "fp32",
              "--micro-batch", "1", "--gradient-accumulation-steps", "1", "--json")
    assert out.returncode == 0, out.stderr
    js = json.loads(out.stdout)
    z = js["inputs"]["zero"]
    assert (z["reduce_bucket_size"], z["prefetch_bucket_size"], z["param_persistence_threshold"]) == (H * H, 530_841, 10 * H)
    assert int(0.9 * H * H) == 530_841
    assert (z["offload_optimizer"], z["offload_param"], z["sub_group_size"], z["max_live_parameters"]) == ("cpu", "cpu", 10**9, 10**9)
    # the assumptions of the estimate itself say what each "auto" became
    assert any('stage3_param_persistence_threshold "auto" -> 7680' in a for a in js["assumptions"])


def test_llava_zero3_without_an_optimizer_block() -> None:
    inp = estimate_inputs(*FLAGS, "--deepspeed-config", str(USER / "llava_zero3.json"), "--precision", "bf16",
                          "--micro-batch", "4", "--gradient-accumulation-steps", "2")
    assert (inp["zero_stage"], inp["optimizer"], inp["precision"]) == (3, "adamw", "bf16")
    assert inp["zero"]["prefetch_bucket_size"] == int(0.9 * H * H) and inp["zero"]["offload_param"] == "none"
    assert any("no optimizer block" in n for n in inp["config_notes"])


def test_llamafactory_z2_offload_float_sizes() -> None:
    inp = estimate_inputs(*FLAGS, "--deepspeed-config", str(USER / "llamafactory_z2_offload.json"), "--precision", "bf16",
                          "--micro-batch", "1", "--gradient-accumulation-steps", "8")
    assert inp["zero"]["reduce_bucket_size"] == 500_000_000 and inp["zero"]["overlap_comm"] is False
    assert inp["gradient_accumulation_steps"] == 8 and inp["zero"]["offload_optimizer"] == "cpu"
    assert inp["auto_values"]["train_batch_size"] == 1 * 8 * 2


def test_dsexamples_legacy_bfloat16_train_batch_and_checkpointing() -> None:
    inp = estimate_inputs(*FLAGS, "--deepspeed-config", str(USER / "dsexamples_zero1_bfloat16_ckpt.json"))
    # train_batch_size 32 = micro x 4 (accumulation) x 2 (ranks) -> micro 4
    assert (inp["precision"], inp["micro_batch"], inp["gradient_accumulation_steps"], inp["zero_stage"]) == ("bf16", 4, 4, 1)
    assert inp["optimizer"] == "adamw" and inp["activation_checkpointing"] is True
    notes = "\n".join(inp["config_notes"])
    for key in ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_gather_fp16_weights_on_model_save"):
        assert f"zero_optimization.{key} ignored: DeepSpeed does not read it at ZeRO stage 1" in notes
    assert "activation_checkpointing block" in notes


def test_stage3_knobs_at_stage0_are_accepted_and_named_as_ignored() -> None:
    inp = estimate_inputs(*FLAGS, "--deepspeed-config", str(USER / "fastchat_stage0_with_stage3_knobs.json"))
    assert (inp["zero_stage"], inp["optimizer"], inp["micro_batch"], inp["gradient_accumulation_steps"]) == (0, "momentum", 4, 2)
    notes = "\n".join(inp["config_notes"])
    for key in ("reduce_bucket_size", "overlap_comm", "stage3_max_live_parameters", "stage3_max_reuse_distance",
                "stage3_gather_fp16_weights_on_model_save"):
        assert f"zero_optimization.{key} ignored: DeepSpeed does not read it at ZeRO stage 0" in notes


def test_legacy_cpu_offload_and_accumulation_derived_from_train_batch_size() -> None:
    inp = estimate_inputs(*FLAGS, "--deepspeed-config", str(USER / "legacy_cpu_offload_stage2.json"))
    assert inp["zero"]["offload_optimizer"] == "cpu"
    # DeepSpeed: train_batch_size 16 and micro 2 on 2 ranks -> 16 // 2 // 2 = 4 accumulation steps
    assert (inp["micro_batch"], inp["gradient_accumulation_steps"]) == (2, 4)
    # the launcher reads the same (it would hand the file to DeepSpeed unchanged)
    ds = load_deepspeed_config(USER / "legacy_cpu_offload_stage2.json", world_size=2)
    assert (ds.micro_batch, ds.gradient_accumulation_steps, ds.offload_optimizer) == (2, 4, "cpu")


def test_flags_win_over_the_config() -> None:
    inp = estimate_inputs(*FLAGS, "--deepspeed-config", str(USER / "dsexamples_zero1_bfloat16_ckpt.json"),
                          "--precision", "fp32", "--gradient-accumulation-steps", "2", "--micro-batch", "1")
    assert (inp["precision"], inp["gradient_accumulation_steps"], inp["micro_batch"]) == ("fp32", 2, 1)


def test_an_unsettled_auto_names_the_flags_to_pass() -> None:
    line = one_line_error("estimate", *FLAGS, "--deepspeed-config", str(USER / "hf_zero2_auto.json"))
    assert "fp16.enabled and bf16.enabled: pass --precision" in line
    assert "train_micro_batch_size_per_gpu: pass --micro-batch" in line
    assert "gradient_accumulation_steps: pass --gradient-accumulation-steps" in line
    # a parameter count alone has no hidden size for the hidden-size "auto" keys
    line = one_line_error("estimate", "--params", "1e8", "--deepspeed-config", str(USER / "hf_zero3_auto.json"),
                          "--precision", "bf16", "--micro-batch", "1", "--gradient-accumulation-steps", "1")
    assert "zero_optimization.reduce_bucket_size" in line and "--model" in line


def test_the_launcher_refuses_auto_which_deepspeed_alone_does_not_fill(tmp_path: Path) -> None:
    from memprof.errors import MemprofError

    with pytest.raises(MemprofError, match=r'is "auto": launch/train.py hands the JSON to DeepSpeed as is'):
        load_deepspeed_config(USER / "hf_zero2_auto.json")


# ---- accelerate YAML ---------------------------------------------------------------------------------


def test_accelerate_inline_deepspeed_config() -> None:
    inp = estimate_inputs("--model", "gpt2", "--accelerate-config", str(USER / "accelerate_inline_zero2.yaml"), "--micro-batch", "2")
    got = (inp["world_size"], inp["nodes"], inp["zero_stage"], inp["precision"], inp["gradient_accumulation_steps"])
    assert got == (8, 2, 2, "bf16", 4)
    assert inp["zero"]["offload_optimizer"] == "cpu" and inp["zero"]["offload_param"] == "none"
    assert inp["auto_values"]["train_batch_size"] == 2 * 4 * 8
    # flags still win
    inp = estimate_inputs("--model", "gpt2", "--accelerate-config", str(USER / "accelerate_inline_zero2.yaml"), "--micro-batch", "2",
                          "--world-size", "4", "--nodes", "1", "--precision", "fp32", "--gradient-accumulation-steps", "1")
    assert (inp["world_size"], inp["nodes"], inp["precision"], inp["gradient_accumulation_steps"]) == (4, 1, "fp32", 1)


def test_accelerate_config_file_relative_to_the_yaml(tmp_path: Path) -> None:
    inp = estimate_inputs("--model", "gpt2", "--accelerate-config", str(USER / "accelerate_file_zero3.yaml"),
                          "--micro-batch", "1", "--gradient-accumulation-steps", "2")
    # mixed_precision fp16 fills the JSON's "auto" fp16/bf16 switches (DeepSpeedPlugin.set_mixed_precision)
    assert (inp["world_size"], inp["nodes"], inp["zero_stage"], inp["precision"]) == (4, 1, 3, "fp16")
    assert inp["zero"]["param_persistence_threshold"] == 10 * H
    assert any("zero3_init_flag True" in n for n in inp["config_notes"])


def test_plan_reads_the_accelerate_config() -> None:
    out = run("plan", "--model", "gpt2", "--accelerate-config", str(USER / "accelerate_inline_zero2.yaml"), "--micro-batch", "2",
              "--gpu-memory", "24GiB", "--gpus", "8", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rows"]


@pytest.mark.parametrize("yaml_text, fragment", [
    ("distributed_type: FSDP\nfsdp_config: {}\n", "(FSDP1) is not modelled"),
    ("distributed_type: MULTI_GPU\n", "FSDP2 (FSDP with fsdp_version: 2) only"),
    ("distributed_type: DEEPSPEED\nnum_processes: 2\n", "no deepspeed_config section"),
    ("deepspeed_config:\n  zero_stage: 5\n", "zero_stage is 5"),
    ("deepspeed_config:\n  zero_stage: 2\nmixed_precision: fp8\n", "fp8 is not modelled"),
    ("deepspeed_config:\n  zero_stage: 2\nnum_processes: 0\n", "num_processes is 0"),
    ("deepspeed_config:\n  deepspeed_config_file: missing.json\n", "does not exist"),
    ("deepspeed_config: [\n", "not valid YAML"),
], ids=["fsdp1", "multi-gpu", "no-deepspeed", "stage5", "fp8", "zero-processes", "missing-json", "bad-yaml"])
def test_bad_accelerate_configs_are_one_line(tmp_path: Path, yaml_text: str, fragment: str) -> None:
    path = tmp_path / "acc.yaml"
    path.write_text(yaml_text)
    assert fragment in one_line_error("estimate", "--model", "gpt2", "--accelerate-config", str(path), "--micro-batch", "1")


# ---- what memprof does not model, and files that are not JSON -----------------------------------

BASE = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
UNMODELLED = [
    ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, "ZeRO++ quantized weights"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_gradients": True}}, "ZeRO++ quantized gradients"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}, "ZeRO++ hierarchical partitioning"),
    ({"zero_optimization": {"stage": 3, "mics_shard_size": 8}}, "MiCS"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}}}, "NVMe offload"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}}, "partial offload"),
    ({"pipeline": {"stages": 4}}, "pipeline parallelism"),
    ({"tensor_parallel": {"autotp_size": 2}}, "tensor parallelism"),
    ({"sequence_parallel_size": 2}, "sequence parallelism"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": 1e-3}}}, "(Lamb) is not modelled"),
    ({"optimizer": {"type": "OneBitAdam", "params": {"lr": 1e-3}}}, "(1-bit Adam) is not modelled"),
    ({"zero_optimization": {"stage": "auto"}}, 'stage is "auto"'),
]


@pytest.mark.parametrize("extra, fragment", UNMODELLED, ids=[f for _, f in UNMODELLED])
def test_unmodelled_features_are_refused_in_one_line(tmp_path: Path, extra: dict, fragment: str) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**BASE, **extra}))
    line = one_line_error("estimate", *FLAGS, "--deepspeed-config", str(path))
    assert fragment in line and str(path) in line
    # the launcher reads the config through the same reader, so refuses it too
    from memprof.errors import MemprofError

    with pytest.raises(MemprofError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        load_deepspeed_config(path)


def test_files_that_are_not_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "ds.yaml"
    yaml_file.write_text("zero_optimization:\n  stage: 2\n")
    assert "pass it with --accelerate-config" in one_line_error("estimate", *FLAGS, "--deepspeed-config", str(yaml_file))
    template = tmp_path / "ds.json"
    template.write_text('{"zero_optimization": {"stage": {{ zero_stage }}}, "train_micro_batch_size_per_gpu": ${MICRO}}')
    assert "fill in its placeholders" in one_line_error("estimate", *FLAGS, "--deepspeed-config", str(template))
    bare = tmp_path / "bare.json"
    bare.write_text("zero_optimization:\n  stage: 2\n")
    assert "is not valid JSON" in one_line_error("estimate", *FLAGS, "--deepspeed-config", str(bare))


def test_hjson_comments_are_read_as_deepspeed_reads_them(tmp_path: Path) -> None:
    # DeepSpeedConfig loads files with hjson: comments and trailing commas are fine there
    path = tmp_path / "ds.json"
    path.write_text('{\n  // ZeRO-2\n  "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000,},\n'
                    '  "train_micro_batch_size_per_gpu": 3,\n}\n')
    inp = estimate_inputs(*FLAGS, "--deepspeed-config", str(path))
    assert (inp["zero_stage"], inp["micro_batch"], inp["zero"]["reduce_bucket_size"]) == (2, 3, 1000)


# ---- activation checkpointing read the same way everywhere ---------------------------------------


def test_activation_checkpointing_block_turns_checkpointing_on_in_the_estimate(tmp_path: Path) -> None:
    cfg = {**BASE, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    plain, ckpt = tmp_path / "plain.json", tmp_path / "ckpt.json"
    plain.write_text(json.dumps(cfg))
    ckpt.write_text(json.dumps({**cfg, "activation_checkpointing": {"number_checkpoints": 2}}))
    common = ("estimate", "--model", "gpt2-tiny", "--device-type", "cpu", "--seq-len", "128", "--json")
    by_block = json.loads(run(*common, "--deepspeed-config", str(ckpt)).stdout)
    by_flag = json.loads(run(*common, "--deepspeed-config", str(plain), "--activation-checkpointing").stdout)
    without = json.loads(run(*common, "--deepspeed-config", str(plain)).stdout)
    assert by_block["inputs"]["activation_checkpointing"] is True
    assert by_block["peak_device_bytes"] == by_flag["peak_device_bytes"] < without["peak_device_bytes"]
    assert any("activation_checkpointing block" in a for a in by_block["assumptions"])
    # the launcher reads the same block the same way
    assert load_deepspeed_config(ckpt).activation_checkpointing is True
    assert load_deepspeed_config(plain).activation_checkpointing is False


def test_estimate_uses_the_resolved_settings() -> None:
    """The resolved inputs feed the estimate (a smoke check that "auto" configs estimate at all)."""
    args = build_parser().parse_args(["--model", "gpt2-tiny", "--deepspeed-config", str(USER / "hf_zero3_auto.json"),
                                      "--precision", "bf16", "--micro-batch", "2", "--gradient-accumulation-steps", "2",
                                      "--world-size", "2", "--device-type", "cpu"])
    inp = inputs_from_args(args, 2)
    assert inp.zero.reduce_bucket_size == 64 * 64 and inp.zero.param_persistence_threshold == 640  # gpt2-tiny: n_embd 64
    assert estimate(inp).peak_device_bytes > 0


# ---- flags over the config, applied once; messages name the values that apply -------------------


def _inputs(tmp_path: Path, config: dict, *flags: str):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW"}, **config}))
    args = build_parser().parse_args(["--model", "gpt2-tiny", "--deepspeed-config", str(path), *flags])
    return inputs_from_args(args, args.world_size)


def test_a_batch_flag_replaces_the_config_value_and_messages_name_what_applies(tmp_path: Path) -> None:
    from memprof.errors import MemprofError

    inconsistent = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1}
    # the config alone: DeepSpeed's assertion, naming the config's values (they are the ones that apply)
    with pytest.raises(MemprofError, match=r"train_batch_size 8 != micro-batch 4 x gradient_accumulation_steps 1 x world size 1"):
        _inputs(tmp_path, inconsistent)
    # --micro-batch replaces the config's 4: nothing names 4 any more, and train_batch_size follows the flags
    inp = _inputs(tmp_path, inconsistent, "--micro-batch", "2")
    assert (inp.micro_batch, inp.gradient_accumulation_steps) == (2, 1)
    assert ("train_batch_size 8 not used: the flags give micro-batch 2 x gradient_accumulation_steps 1 x world size 1 = 2"
            in inp.config_notes)
    assert not any("micro-batch 4" in n for n in inp.config_notes)
    assert _inputs(tmp_path, inconsistent, "--micro-batch", "8").config_notes == ()  # 8 = 8 x 1 x 1: nothing to say
    # a world size the config does not fit is named as given
    consistent = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4}
    with pytest.raises(MemprofError, match=r"train_batch_size 8 is not divisible by micro-batch 4 x world size 3"):
        _inputs(tmp_path, consistent, "--world-size", "3")
    # a value derived from the config's own numbers says so when a flag replaces the other one
    with pytest.raises(MemprofError, match=r"not divisible by the config's gradient_accumulation_steps 4 x world size 2"):
        _inputs(tmp_path, {"train_batch_size": 30, "gradient_accumulation_steps": 4}, "--world-size", "2",
                "--gradient-accumulation-steps", "3")


def test_the_cli_names_the_micro_batch_that_applies(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}))
    common = ("estimate", "--model", "gpt2-tiny", "--deepspeed-config", str(path), "--world-size", "4")
    # written for 2 ranks, estimated for 4: DeepSpeed's assertion, naming the values that apply
    line = one_line_error(*common)
    assert "train_batch_size 16 != micro-batch 4 x gradient_accumulation_steps 2 x world size 4" in line
    # --micro-batch 2 replaces the config's 4 (memprof used to refuse this naming micro-batch 4)
    out = run(*common, "--micro-batch", "2", "--json")
    assert out.returncode == 0, out.stderr
    inp = json.loads(out.stdout)["inputs"]
    assert (inp["micro_batch"], inp["gradient_accumulation_steps"], inp["world_size"]) == (2, 2, 4)


def test_flags_apply_through_the_reader_once(tmp_path: Path) -> None:
    from memprof.dsconfig import read_deepspeed_config
    from memprof.estimate.settings import SetupFlags, settings_from_setup

    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "bf16": {"enabled": True}}
    read = read_deepspeed_config(config, micro_batch=1, gradient_accumulation_steps=3, precision="fp16")
    assert (read.micro_batch, read.gradient_accumulation_steps, read.precision, read.train_batch_size) == (1, 3, "fp16", 3)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    fields = settings_from_setup(SetupFlags(micro_batch=1, zero_stage=3, offload_param="cpu", world_size=2),
                                 deepspeed_config=path)
    assert (fields["micro_batch"], fields["gradient_accumulation_steps"], fields["precision"]) == (1, 2, "bf16")
    assert (fields["zero_stage"], fields["zero"].offload_param, fields["world_size"]) == (3, "cpu", 2)
    # without a config: DeepSpeed's defaults, as the reader reads an empty config
    assert settings_from_setup(SetupFlags())["zero"] == read_deepspeed_config({}).zero


def test_offload_param_flag_has_deepspeeds_spelling_too() -> None:
    for flag in ("--offload-params", "--offload-param"):
        args = build_parser().parse_args(["--model", "gpt2-tiny", "--zero-stage", "3", flag, "cpu"])
        assert inputs_from_args(args, None).zero.offload_param == "cpu"


def test_strict_mode_is_what_deepspeed_refuses_at_launch(tmp_path: Path) -> None:
    from memprof.dsconfig import read_deepspeed_config
    from memprof.errors import MemprofError

    relaxed = read_deepspeed_config(USER / "hf_zero2_auto.json")
    assert relaxed.unresolved()  # the estimator lists them, the flags settle them
    with pytest.raises(MemprofError, match=r'is "auto": launch/train.py hands the JSON to DeepSpeed as is'):
        read_deepspeed_config(USER / "hf_zero2_auto.json", strict=True)
    no_optimizer = {"train_micro_batch_size_per_gpu": 1}
    assert read_deepspeed_config(no_optimizer).optimizer is None
    with pytest.raises(MemprofError, match='no "optimizer" block'):
        read_deepspeed_config(no_optimizer, strict=True)
    lower_sgd = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "sgd"}}
    assert read_deepspeed_config(lower_sgd).optimizer == "sgd"
    with pytest.raises(MemprofError, match="case-sensitive: write 'SGD'"):
        read_deepspeed_config(lower_sgd, strict=True)
    untested = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "RMSprop"}, "zero_optimization": {"stage": 2}}
    with pytest.raises(MemprofError, match="zero_allow_untested_optimizer"):
        read_deepspeed_config(untested, strict=True)
    assert read_deepspeed_config({**untested, "zero_allow_untested_optimizer": True}, strict=True).optimizer == "rmsprop"
