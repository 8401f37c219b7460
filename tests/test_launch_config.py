"""The launcher's validation, config zoo, data and model, without launching anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memprof.errors import MemprofError
from memprof.models import PRESETS
from memprof.run.facts import count_nodes
from memprof.train.config import load_deepspeed_config, optimizer_zoo_name, parse_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# What each shipped config must mean, written down from its JSON by hand (type + params per
# DeepSpeed's rules: "Adam" is AdamW unless adam_w_mode is false; SGD momentum/nesterov).
EXPECTED = {
    # name: (stage, optimizer, precision, offload_optimizer, offload_param)
    "stage0_sgd": (0, "sgd", "fp32", "none", "none"),
    "stage0_momentum": (0, "momentum", "fp32", "none", "none"),
    "stage0_nesterov": (0, "nesterov", "fp32", "none", "none"),
    "stage0_rmsprop": (0, "rmsprop", "fp32", "none", "none"),
    "stage0_adagrad": (0, "adagrad", "fp32", "none", "none"),
    "stage0_adam": (0, "adam", "fp32", "none", "none"),
    "stage0_adamw": (0, "adamw", "fp32", "none", "none"),
    "stage0_amsgrad": (0, "amsgrad", "fp32", "none", "none"),
    "stage1_adam": (1, "adam", "fp32", "none", "none"),
    "stage2_adam": (2, "adam", "fp32", "none", "none"),
    "stage3_adam": (3, "adam", "fp32", "none", "none"),
    "stage1_adamw": (1, "adamw", "fp32", "none", "none"),
    "stage2_adamw": (2, "adamw", "fp32", "none", "none"),
    "stage3_adamw": (3, "adamw", "fp32", "none", "none"),
    "stage0_adamw_bf16": (0, "adamw", "bf16", "none", "none"),
    "stage1_adamw_bf16": (1, "adamw", "bf16", "none", "none"),
    "stage2_adamw_bf16": (2, "adamw", "bf16", "none", "none"),
    "stage3_adamw_bf16": (3, "adamw", "bf16", "none", "none"),
    "stage2_adamw_offload_optimizer": (2, "adamw", "fp32", "cpu", "none"),
    "stage3_adamw_offload_param": (3, "adamw", "fp32", "cpu", "cpu"),
    "demo": (2, "adamw", "fp32", "none", "none"),
    "stage0_sgd_gas2_checkpointing": (0, "sgd", "fp32", "none", "none"),
    "stage1_adamw_gas3": (1, "adamw", "fp32", "none", "none"),
    "stage2_adamw_gas2": (2, "adamw", "fp32", "none", "none"),
    "stage2_adamw_bf16_offload_optimizer_gas2": (2, "adamw", "bf16", "cpu", "none"),
    "stage3_adamw_bf16_gas2_checkpointing": (3, "adamw", "bf16", "none", "none"),
}
# gradient_accumulation_steps (1 where not listed) and the activation_checkpointing block, by name
GAS = {"stage0_sgd_gas2_checkpointing": 2, "stage1_adamw_gas3": 3, "stage2_adamw_gas2": 2,
       "stage2_adamw_bf16_offload_optimizer_gas2": 2, "stage3_adamw_bf16_gas2_checkpointing": 2}
CHECKPOINTING = {"stage0_sgd_gas2_checkpointing", "stage3_adamw_bf16_gas2_checkpointing"}


def test_every_shipped_config_is_listed_and_means_what_its_name_says() -> None:
    assert {p.stem for p in CONFIGS.glob("*.json")} == set(EXPECTED)
    for name, (stage, optimizer, precision, off_opt, off_par) in EXPECTED.items():
        ds = load_deepspeed_config(CONFIGS / f"{name}.json", world_size=2)
        assert (ds.zero_stage, ds.optimizer, ds.precision, ds.offload_optimizer, ds.offload_param) == (
            stage, optimizer, precision, off_opt, off_par,
        ), name
        assert ds.micro_batch == 2 and ds.gradient_accumulation_steps == GAS.get(name, 1)
        assert ds.activation_checkpointing == (name in CHECKPOINTING), name
        # the dict handed to deepspeed.initialize is the file, unchanged
        assert ds.config == json.loads((CONFIGS / f"{name}.json").read_text())


@pytest.mark.parametrize(
    "block, stage, expected",
    [
        ({"type": "Adam", "params": {}}, 0, "adamw"),  # DeepSpeed's default adam_w_mode=True
        ({"type": "adam", "params": {"adam_w_mode": False}}, 0, "adam"),
        ({"type": "AdamW", "params": {"adam_w_mode": False}}, 0, "adamw"),  # AdamW forces it
        ({"type": "AdamW", "params": {"amsgrad": True, "torch_adam": True}}, 2, "amsgrad"),
        ({"type": "SGD", "params": {"momentum": 0.0}}, 0, "sgd"),
        ({"type": "SGD", "params": {"momentum": 0.5, "nesterov": True}}, 0, "nesterov"),
        ({"type": "Adagrad"}, 3, "adagrad"),  # ZeRO-tested: no opt-in needed
    ],
)
def test_optimizer_zoo_names(block: dict, stage: int, expected: str) -> None:
    assert optimizer_zoo_name(block, stage, {}) == expected


@pytest.mark.parametrize(
    "block, stage, config, fragment",
    [
        ({"type": "sgd"}, 0, {}, "case-sensitive"),  # getattr(torch.optim, "sgd") fails in DeepSpeed
        ({"type": "Lamb"}, 0, {}, "unknown optimizer type 'Lamb'"),
        ({"type": "SGD"}, 1, {}, "zero_allow_untested_optimizer"),
        ({"type": "Adam", "params": {"amsgrad": True}}, 0, {}, "torch_adam"),
        ({"type": "SGD", "params": {"nesterov": True}}, 0, {}, "momentum > 0"),
        ({"type": "RMSprop", "params": {"centered": True}}, 0, {}, "centered"),
        (None, 0, {}, "no \"optimizer\" block"),
    ],
)
def test_optimizer_blocks_deepspeed_would_reject_fail_early(block, stage, config, fragment) -> None:
    with pytest.raises(MemprofError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        optimizer_zoo_name(block, stage, config)
    assert optimizer_zoo_name({"type": "SGD"}, 1, {"zero_allow_untested_optimizer": True}) == "sgd"


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


def test_micro_batch_is_derived_from_train_batch_size_and_world_size(tmp_path: Path) -> None:
    base = {"optimizer": {"type": "AdamW"}, "gradient_accumulation_steps": 2}
    # 24 = micro x 2 (accumulation) x 3 (ranks) -> micro 4
    assert load_deepspeed_config(_write(tmp_path, {**base, "train_batch_size": 24}), world_size=3).micro_batch == 4
    with pytest.raises(MemprofError, match="not divisible"):
        load_deepspeed_config(_write(tmp_path, {**base, "train_batch_size": 10}), world_size=3)
    with pytest.raises(MemprofError, match="train_batch_size 10 != micro-batch 1"):
        load_deepspeed_config(_write(tmp_path, {**base, "train_batch_size": 10, "train_micro_batch_size_per_gpu": 1}), 3)


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer needs ZeRO"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "'nvme' is not supported"),
        ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "both bf16 and fp16"),
        ({"zero_optimization": {"stage": "2"}}, "stage is '2'"),
    ],
)
def test_settings_memprof_cannot_honour_are_refused(tmp_path: Path, config: dict, fragment: str) -> None:
    full = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW"}, **config}
    with pytest.raises(MemprofError, match=fragment):
        load_deepspeed_config(_write(tmp_path, full))


def test_activation_checkpointing_sub_keys_are_named_inert_for_hf_models(tmp_path: Path) -> None:
    """transformers' models never read the block's sub-keys (issue 16): named, checkpointing on, no refusal."""
    full = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW"},
            "activation_checkpointing": {"partition_activations": True, "cpu_checkpointing": True,
                                         "contiguous_memory_optimization": False}}
    ds = load_deepspeed_config(_write(tmp_path, full))
    assert ds.activation_checkpointing
    assert any("partition_activations, .cpu_checkpointing: inert for HF models" in note for note in ds.notes())


def test_offload_param_below_stage_3_is_ignored_as_deepspeed_ignores_it(tmp_path: Path) -> None:
    full = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW"},
            "zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}
    ds = load_deepspeed_config(_write(tmp_path, full))
    assert ds.offload_param == "none"
    assert any("offload_param ignored" in note and "stage 3" in note for note in ds.notes())


def test_activation_checkpointing_follows_the_json_block(tmp_path: Path) -> None:
    base = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW"}}
    assert load_deepspeed_config(_write(tmp_path, base)).activation_checkpointing is False
    on = {**base, "activation_checkpointing": {"number_checkpoints": 2}}
    assert load_deepspeed_config(_write(tmp_path, on)).activation_checkpointing is True


def test_flags_and_model_config_file(tmp_path: Path) -> None:
    model_json = tmp_path / "config.json"
    model_json.write_text(json.dumps({**PRESETS["gpt2-tiny"], "n_layer": 3}))
    cfg = parse_args(
        ["--deepspeed_config", str(CONFIGS / "demo.json"), "--model-config", str(model_json), "--out", str(tmp_path / "o"),
         "--steps", "5", "--seq-len", "64", "--seed", "7", "--memory-budget", "2GiB", "--local_rank=1"],
        environ={},
    )
    assert cfg.model.name == str(model_json) and cfg.model.config["n_layer"] == 3
    assert (cfg.run.steps, cfg.data.seq_len, cfg.data.seed, cfg.local_rank_flag) == (5, 64, 7, 1)
    assert cfg.run.memory_budget_bytes == 2 * 2**30
    with pytest.raises(MemprofError, match="exceeds the model's n_positions"):
        parse_args(["--deepspeed_config", str(CONFIGS / "demo.json"), "--out", str(tmp_path / "o"), "--seq-len", "257"], environ={})
    with pytest.raises(MemprofError, match="not allowed with argument"):
        parse_args(["--deepspeed_config", str(CONFIGS / "demo.json"), "--out", str(tmp_path), "--model", "gpt2",
                    "--model-config", str(model_json)], environ={})


def test_node_count_from_each_launcher_environment() -> None:
    assert count_nodes({"GROUP_WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}, 3) == 2  # torchrun, uneven nodes
    assert count_nodes({"CROSS_SIZE": "4", "LOCAL_SIZE": "8"}, 32) == 4  # deepspeed launcher
    assert count_nodes({"LOCAL_WORLD_SIZE": "2"}, 4) == 2
    assert count_nodes({}, 1) == 1  # plain python


def test_byte_batches_are_deterministic_sharded_and_in_vocab() -> None:
    torch = pytest.importorskip("torch")
    from memprof.train.data import ByteBatches, load_text, tokenize

    text = load_text()
    tokens = tokenize(text)
    assert tokens.numel() == len(text) > 10_000 and int(tokens.max()) < 256
    # resident for the whole run, so one byte a token; batches are the int64 ids the embedding takes
    assert tokens.dtype == torch.uint8 and tokens.untyped_storage().nbytes() == len(text)
    assert bytes(tokens[:40].tolist()).decode() == text[:40].decode()

    def draws(seed: int, rank: int) -> list:
        b = ByteBatches(tokens, seq_len=16, micro_batch=4, seed=seed, rank=rank, world_size=3)
        return [b.next_batch() for _ in range(3)]

    a, again, other_rank = draws(5, 1), draws(5, 1), draws(5, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    assert not all(torch.equal(x, y) for x, y in zip(a, other_rank))
    # every window of rank 1 starts at an offset = 1 (mod 3) and is a contiguous slice of the text
    for batch in a:
        assert batch.shape == (4, 16) and batch.dtype == torch.int64
        for row in batch:
            starts = [s for s in range(1, tokens.numel() - 15, 3) if torch.equal(tokens[s : s + 16].long(), row)]
            assert starts, "a window that is not a rank-1 slice of the text"


def test_byte_batches_are_the_batches_of_the_int64_stream_and_offsets_tensor() -> None:
    """The sampler once kept the stream as int64 and this rank's start offsets as a tensor; it now
    keeps uint8 and computes offset ``rank + world_size * pick``. The same flags must give the same
    batches as before, so that runs stay comparable: the old sampler, written out here, against it."""
    torch = pytest.importorskip("torch")
    from memprof.train.data import ByteBatches, load_text, tokenize

    text = load_text()
    old_tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.int64)

    def old_batches(seq_len: int, micro_batch: int, seed: int, rank: int, world_size: int, n: int) -> list:
        starts = torch.arange(rank, old_tokens.numel() - seq_len + 1, world_size)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        out = []
        for _ in range(n):
            picks = torch.randint(0, starts.numel(), (micro_batch,), generator=gen)
            out.append(old_tokens[starts[picks].unsqueeze(1) + torch.arange(seq_len).unsqueeze(0)])
        return out

    tokens = tokenize(text)
    # first, middle and last ranks; a world of one; windows of one token
    for seq_len, micro_batch, seed, rank, world_size in [(16, 4, 5, 1, 3), (64, 2, 0, 0, 2), (64, 2, 0, 1, 2),
                                                         (128, 3, 1234, 6, 7), (1, 8, 9, 0, 1)]:
        new = ByteBatches(tokens, seq_len, micro_batch, seed, rank, world_size)
        for old, batch in zip(old_batches(seq_len, micro_batch, seed, rank, world_size, 5), (new.next_batch() for _ in range(5))):
            assert batch.dtype == old.dtype and torch.equal(batch, old), (seq_len, micro_batch, seed, rank, world_size)
    # the last window of the last rank's shard ends at the text's end (a pick of the shard's top index)
    last = ByteBatches(tokens[:10].clone(), seq_len=4, micro_batch=64, seed=3, rank=2, world_size=3)
    assert {tuple(r) for r in last.next_batch().tolist()} == {tuple(tokens[s : s + 4].tolist()) for s in (2, 5)}
    # and no tensor holds the stream: its bytes are not tensor memory (nothing the trackers count)
    assert last.resident_bytes() == 0 and not any(isinstance(v, torch.Tensor) for v in vars(last).values())


def test_tiny_model_parameter_count_matches_the_gpt2_formula() -> None:
    pytest.importorskip("transformers")
    from memprof.run.facts import count_parameters
    from memprof.train.model import build_model

    c = PRESETS["gpt2-tiny"]
    v, p, h, layers = c["vocab_size"], c["n_positions"], c["n_embd"], c["n_layer"]
    # wte + wpe + per block (2 layer norms, qkv, attn proj, mlp up, mlp down) + final norm;
    # lm_head is tied to wte so it adds nothing.
    per_block = 2 * 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h)
    expected = v * h + p * h + layers * per_block + 2 * h
    model = build_model(c, seed=0)
    assert count_parameters(model) == expected == 149_248
    same = build_model(c, seed=0)
    assert all((a == b).all() for a, b in zip(model.parameters(), same.parameters()))


def test_estimator_reads_the_run_metadata_of_every_shipped_config(tmp_path: Path) -> None:
    """The run dict is the contract with memprof.estimate.inputs_from_run: each config's metadata
    must come back as the same stage, optimizer and precision."""
    from memprof.estimate import estimate, inputs_from_run
    from memprof.train.launched_run import DistributedFacts, describe_launched_run

    for name, (stage, optimizer, precision, _, _) in EXPECTED.items():
        cfg = parse_args(["--deepspeed_config", str(CONFIGS / f"{name}.json"), "--out", str(tmp_path)], environ={})
        meta = describe_launched_run(cfg, DistributedFacts(world_size=2, nodes=1, device_type="cpu", backend="gloo"), n_params=149_248)
        assert (meta["zero_stage"], meta["optimizer"], meta["precision"]) == (stage, optimizer, precision)
        inputs = inputs_from_run(meta)
        assert estimate(inputs).to_json()["n_params"] == 149_248, name


# ---- the launcher and the estimator read a DeepSpeed config the same way ----------------------

_AGREE_BLOCKS = [
    {"type": "SGD", "params": {"lr": 0.1}},
    {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
    {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}},
    {"type": "RMSprop", "params": {"lr": 0.1}},
    {"type": "RMSprop", "params": {"lr": 0.1, "momentum": 0}},
]
# torch.optim.SGD refuses nesterov without momentum or with dampening ("Nesterov momentum requires a
# momentum and zero dampening") and any negative momentum; RMSprop's momentum/centered buffers are
# not modelled: both readers refuse all of these.
_REFUSED_BLOCKS = [
    ({"type": "SGD", "params": {"nesterov": True}}, "momentum > 0 and dampening 0"),
    ({"type": "SGD", "params": {"momentum": 0, "nesterov": True}}, "momentum > 0 and dampening 0"),
    ({"type": "SGD", "params": {"momentum": 0.9, "dampening": 0.1, "nesterov": True}}, "dampening 0"),
    ({"type": "SGD", "params": {"momentum": -0.5}}, "must be 0 or more"),
    ({"type": "RMSprop", "params": {"momentum": 0.9}}, "RMSprop with momentum"),
    ({"type": "RMSprop", "params": {"centered": True}}, "centered"),
    ({"type": "SGD", "params": {"momentum": "abc"}}, "optimizer.params.momentum is 'abc': it must be a number"),
    ({"type": "SGD", "params": {"momentum": [1]}}, r"optimizer.params.momentum is \[1\]: it must be a number"),
    ({"type": "SGD", "params": {"momentum": None}}, "optimizer.params.momentum is None"),
    ({"type": "RMSprop", "params": {"momentum": "0.9"}}, "optimizer.params.momentum is '0.9'"),
    ({"type": "SGD", "params": {"momentum": 0.9, "nesterov": True, "dampening": "x"}}, "optimizer.params.dampening is 'x'"),
]


def _estimator_settings(config: dict) -> dict:
    from memprof.estimate.inputs import settings_from_deepspeed_config

    return settings_from_deepspeed_config(config, "ds.json")


@pytest.mark.parametrize("block", _AGREE_BLOCKS, ids=lambda b: json.dumps(b["params"]))
def test_launcher_and_estimator_name_torch_optimizers_alike(block: dict) -> None:
    expected = {"sgd": "sgd", "momentum": "momentum", "nesterov": "nesterov", "rmsprop": "rmsprop"}
    launcher = optimizer_zoo_name(block, 0, {})
    assert launcher in expected
    assert _estimator_settings({"optimizer": block})["optimizer"] == launcher


@pytest.mark.parametrize("block,fragment", _REFUSED_BLOCKS, ids=lambda x: json.dumps(x) if isinstance(x, dict) else "")
def test_launcher_and_estimator_refuse_the_same_torch_optimizer_settings(block: dict, fragment: str) -> None:
    with pytest.raises(MemprofError, match=fragment):
        optimizer_zoo_name(block, 0, {})
    with pytest.raises(MemprofError, match=fragment):
        _estimator_settings({"optimizer": block})


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("enabled,precision", [(True, None), (False, "fp32")])
def test_precision_enabled_booleans_agree(tmp_path: Path, key: str, enabled: bool, precision: str | None) -> None:
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW"}, key: {"enabled": enabled}}
    want = precision or key
    assert load_deepspeed_config(_write(tmp_path, config)).precision == want
    assert _estimator_settings(config)["precision"] == want


@pytest.mark.parametrize("key", ["bf16", "fp16"])
@pytest.mark.parametrize("value", ["false", "true", 1, 0, None, [True]], ids=repr)
def test_precision_enabled_non_booleans_are_refused_by_both(tmp_path: Path, key: str, value) -> None:
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW"}, key: {"enabled": value}}
    fragment = rf"{key}\.enabled is .*use true or false"
    with pytest.raises(MemprofError, match=fragment):
        load_deepspeed_config(_write(tmp_path, config))
    with pytest.raises(MemprofError, match=fragment):
        _estimator_settings(config)


@pytest.mark.parametrize("value", ["lots", 0, -3, 1.5, None, True], ids=repr)
def test_model_config_n_positions_must_be_a_positive_int(tmp_path: Path, value) -> None:
    model_cfg = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 256, "n_positions": value}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model_cfg))
    with pytest.raises(MemprofError, match="positive integer 'n_positions'"):
        parse_args(["--deepspeed_config", str(CONFIGS / "demo.json"), "--model-config", str(path), "--out", str(tmp_path / "o")],
                   environ={})


def test_model_config_without_n_positions_defaults_to_1024(tmp_path: Path) -> None:
    model_cfg = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 256}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(model_cfg))
    argv = ["--deepspeed_config", str(CONFIGS / "demo.json"), "--model-config", str(path), "--out", str(tmp_path / "o")]
    assert parse_args([*argv, "--seq-len", "1024"], environ={}).data.seq_len == 1024
    with pytest.raises(MemprofError, match=r"exceeds the model's n_positions \(1024\)"):
        parse_args([*argv, "--seq-len", "1025"], environ={})


@pytest.mark.parametrize(
    "blocks,want",
    [
        ({"bfloat16": {"enabled": True}}, "bf16"),  # DeepSpeed's older spelling
        ({"bf16": None, "bfloat16": {"enabled": True}}, "bf16"),  # a null bf16 falls back to it
        ({"bf16": {"enabled": False}, "bfloat16": {"enabled": True}}, "fp32"),  # bf16 wins when present
    ],
)
def test_bfloat16_alias_is_read_as_deepspeed_reads_it(tmp_path: Path, blocks: dict, want: str) -> None:
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW"}, **blocks}
    assert load_deepspeed_config(_write(tmp_path, config)).precision == want
    assert _estimator_settings(config)["precision"] == want
