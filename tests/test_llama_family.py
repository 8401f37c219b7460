"""The Llama family (llama, mistral, qwen2) in the launcher and the estimator, without launching:
closed-form parameter shapes against the meta-device count (and a real model's forward order for
ZeRO-3's fetch trace), the published sizes of the real presets, the launcher's family checks
(other families refused in one line, exit 2) and real shapes estimated fast."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memprof.errors import MemprofError
from memprof.estimate.model_shapes import _meta_param_numels, model_shape
from memprof.families.llama import llama_fetch_modules, llama_param_numels
from memprof.models import PRESETS, preset_config, validate_launchable
from memprof.train.model import build_model, count_parameters

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
DEMO = REPO / "configs" / "demo.json"

_SMALL = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 8, "max_position_embeddings": 128}
VARIANTS = {
    "llama gqa untied": {"model_type": "llama", **_SMALL, "num_key_value_heads": 2},
    "llama kv equal": {"model_type": "llama", **_SMALL, "num_key_value_heads": 8},
    "llama kv absent, tied, biases, head_dim": {"model_type": "llama", **_SMALL, "tie_word_embeddings": True,
                                                "attention_bias": True, "mlp_bias": True, "head_dim": 16},
    "mistral kv absent (MistralConfig: 8)": {"model_type": "mistral", **_SMALL},
    "mistral gqa tied": {"model_type": "mistral", **_SMALL, "num_key_value_heads": 4, "tie_word_embeddings": True},
    "qwen2 kv None (= heads)": {"model_type": "qwen2", **_SMALL, "num_key_value_heads": None},
    "qwen2 gqa tied": {"model_type": "qwen2", **_SMALL, "num_key_value_heads": 2, "tie_word_embeddings": True},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_closed_form_shapes_equal_the_meta_device_count(name: str) -> None:
    cfg = VARIANTS[name]
    assert llama_param_numels(cfg) == _meta_param_numels(cfg)


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny", "tinyllama-1.1b", "llama-2-7b", "qwen2-0.5b"])
def test_presets_closed_form_equals_meta_count(preset: str) -> None:
    cfg = preset_config(preset)
    assert llama_param_numels(cfg) == _meta_param_numels(cfg)


def test_real_presets_have_their_published_sizes() -> None:
    # the parameter counts the model cards give (tied embeddings once)
    assert sum(llama_param_numels(PRESETS["tinyllama-1.1b"])) == 1_100_048_384
    assert sum(llama_param_numels(PRESETS["llama-2-7b"])) == 6_738_415_616
    assert sum(llama_param_numels(PRESETS["llama-2-70b"])) == 68_976_648_192
    assert sum(llama_param_numels(PRESETS["qwen2-0.5b"])) == 494_032_768


def test_tiny_presets_by_hand() -> None:
    # llama-tiny: V 512, H 64, I 176, 2 layers, 4 heads of 16, 2 kv heads, untied
    h, i, v, kv = 64, 176, 512, 2 * 16
    layer = h * h + 2 * kv * h + h * h + 3 * h * i + 2 * h
    assert sum(llama_param_numels(PRESETS["llama-tiny"])) == v * h + 2 * layer + h + v * h
    # qwen2-tiny: I 160, q/k/v biases, tied
    i = 160
    layer = (h * h + h) + 2 * (kv * h + kv) + h * h + 3 * h * i + 2 * h
    assert sum(llama_param_numels(PRESETS["qwen2-tiny"])) == v * h + 2 * layer + h


@pytest.mark.parametrize("name", ["llama gqa untied", "llama kv absent, tied, biases, head_dim", "qwen2 gqa tied"])
def test_fetch_order_is_the_forward_call_order(name: str) -> None:
    """ZeRO-3's coordinator fetches every module in forward order (DeepSpeed hooks each one; a
    module without parameters still prefetches): record it with forward pre-hooks on a real model
    and compare with llama_fetch_modules (empty tuples for modules without parameters)."""
    cfg = VARIANTS[name]
    model = build_model(cfg, seed=0)
    index = {id(p): k for k, p in enumerate(model.parameters())}
    order: list[tuple[int, ...]] = []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False)]
        module.register_forward_pre_hook(lambda m, a, own=own: order.append(tuple(index[id(p)] for p in own)))
    ids = torch.randint(0, 256, (1, 8))
    model(input_ids=ids, labels=ids)
    assert tuple(order) == llama_fetch_modules(cfg)
    assert count_parameters(model) == sum(llama_param_numels(cfg))


def test_launcher_checks() -> None:
    validate_launchable(preset_config("llama-tiny"), "llama-tiny")
    with pytest.raises(MemprofError, match="builds gpt2, llama, mistral, qwen2 models only"):
        validate_launchable({"model_type": "opt", "hidden_size": 64}, "opt.json")
    with pytest.raises(MemprofError, match="not a multiple of num_key_value_heads 3"):
        validate_launchable({"model_type": "llama", **_SMALL, "num_key_value_heads": 3}, "x.json")
    with pytest.raises(MemprofError, match="byte-level tokens need vocab_size >= 256"):
        validate_launchable({"model_type": "qwen2", **_SMALL, "vocab_size": 100, "num_key_value_heads": 8}, "x.json")
    with pytest.raises(MemprofError, match="positive integer 'hidden_size'"):
        validate_launchable({"model_type": "mistral", **_SMALL, "hidden_size": 0}, "x.json")


@pytest.mark.parametrize("model_type", ["opt", "phi", "gpt_neox"])
def test_launcher_refuses_other_families_in_one_line(tmp_path: Path, model_type: str) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(TRAIN), "--deepspeed_config", str(DEMO), "--model-config", str(cfg),
                           "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "gpt2, llama, mistral, qwen2" in lines[0] and model_type in lines[0], proc.stderr
    assert not out.exists()


def test_launcher_refuses_a_sequence_beyond_max_position_embeddings(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(TRAIN), "--deepspeed_config", str(DEMO), "--model", "llama-tiny",
                           "--seq-len", "300", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "max_position_embeddings (256)" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("preset", ["tinyllama-1.1b", "llama-2-7b", "qwen2-0.5b", "llama-2-70b"])
def test_real_shapes_estimate_without_allocating(preset: str) -> None:
    """`memprof estimate` for a real shape: activations modelled (fits computed), in a process that
    never imports torch (nothing can be allocated). How fast is benchmarks/bench_estimate.py's to
    say (BENCHMARKS.md), not a timed test's: a loaded machine once made this one fail."""
    code = (
        "import sys\n"
        "from memprof.estimate import EstimateInputs, estimate\n"
        "from memprof.models import preset_config\n"
        f"est = estimate(EstimateInputs(model_config=preset_config({preset!r}), optimizer='adamw', precision='bf16', "
        "zero_stage=3, world_size=8, micro_batch=4, seq_len=2048, gpu_memory_bytes=80 * 2**30))\n"
        "assert est.activations is not None and est.fits is not None\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False"], proc.stdout


def test_activations_not_modelled_outside_the_traced_code_paths() -> None:
    from memprof.estimate.activations import ActivationQuery, model_activations

    def query(seq: int) -> ActivationQuery:
        return ActivationQuery(micro_batch=1, seq_len=seq, element_size=2, device_type="cpu")

    mistral = {**VARIANTS["mistral gqa tied"], "max_position_embeddings": 8192}
    assert model_activations(model_shape(mistral), query(4096)) is not None
    # beyond MistralConfig's default sliding_window (4096) the mask materialises: not traced
    assert model_activations(model_shape(mistral), query(4097)) is None
    assert model_activations(model_shape({**mistral, "sliding_window": None}), query(4097)) is not None
    gelu = {**VARIANTS["llama gqa untied"], "hidden_act": "gelu"}
    assert model_activations(model_shape(gelu), query(32)) is None
    # other families: no activation model (the estimate's fits is then unknown)
    assert model_activations(model_shape(n_params=10**9), query(32)) is None


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny"])
def test_build_under_zero_init(preset: str) -> None:
    """deepspeed.zero.Init partitions every parameter at construction; the class was imported
    before entering it (importing inside fails on torch 2.13), and one ZeRO-3 step trains."""
    from launch_helpers import free_port

    env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ds_harness" / "zero_init_build.py"), str(free_port()), preset],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "partitioned: True True" in proc.stdout and "step ok" in proc.stdout, proc.stdout[-2000:]
