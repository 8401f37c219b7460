"""Never a "fits" that was not computed: an estimate without activations (a bare parameter count, a
model_type without an activation model, the ZeRO paper's layout) says fits is unknown, first; the
planner refuses such a model unless asked for model states only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memprof.errors import MemprofError
from memprof.estimate import EstimateInputs, estimate, plan
from memprof.models import load_model_config, preset_config

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

# small configs in the published format (HF config.json); OPT has no activation model in memprof
OPT = {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 128, "num_attention_heads": 2,
       "vocab_size": 1000, "max_position_embeddings": 128, "word_embed_proj_dim": 64}
# TinyLlama-1.1B's shape family at a test size: GQA (4 query, 2 key/value heads), untied embeddings
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 256,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    out = {}
    for name, cfg in (("opt", OPT), ("llama", LLAMA)):
        (d / name).mkdir()
        out[name] = d / name / "config.json"
        out[name].write_text(json.dumps(cfg))
    return out


def memprof(*args: str, width: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memprof", *args], capture_output=True, text=True, timeout=180,
                          cwd=REPO, env={**os.environ, "COLUMNS": str(width)})


def test_gpt2_fits_is_computed_from_the_peak():
    inp = EstimateInputs(model_config=preset_config("gpt2"), precision="bf16", micro_batch=4, seq_len=1024)
    for gpu, headroom in ((80 * GIB, 0.1), (2 * GIB, 0.0)):
        est = estimate(EstimateInputs(**{**inp.__dict__, "gpu_memory_bytes": gpu, "headroom": headroom}))
        js = est.to_json()
        assert js["activations_not_estimated"] is None
        # the activations are in the peak: it exceeds the model states at rest
        assert max(p["peak"]["device"]["activations"] for p in js["ranks"][0]["phases"].values()) > 0
        assert js["fits"] is (js["peak_device_bytes"] <= int(gpu * (1 - headroom)))
    # both answers occur: 80 GiB holds GPT-2 at batch 4 x 1024; 2 GiB does not (its bf16 logits
    # alone, 4 x 1024 x 50257 x 2 bytes, are 393 MiB, and the fp32 upcast for the loss doubles them)
    big = estimate(EstimateInputs(**{**inp.__dict__, "gpu_memory_bytes": 80 * GIB}))
    small = estimate(EstimateInputs(**{**inp.__dict__, "gpu_memory_bytes": 2 * GIB, "headroom": 0.0}))
    assert big.fits is True and small.fits is False


def test_bare_parameter_count_fits_is_unknown():
    est = estimate(EstimateInputs(n_params=10**6, gpu_memory_bytes=80 * GIB))
    js = est.to_json()
    assert js["fits"] is None
    assert js["activations_not_estimated"] == "activations not estimated for a bare parameter count (--params)"
    # a GPU 1000x larger than the model states would have said "yes" before: still unknown
    assert js["peak_device_bytes"] < 80 * GIB // 1000


def test_zero_paper_layout_fits_is_unknown():
    est = estimate(EstimateInputs(model_config=preset_config("gpt2"), layout="zero-paper", gpu_memory_bytes=80 * GIB))
    assert est.fits is None and "zero-paper" in est.activations_not_estimated


def test_other_family_fits_is_unknown_in_json_and_first_in_the_table(configs):
    out = memprof("estimate", "--model-config", str(configs["opt"]), "--gpu-memory", "80GiB", "--json")
    assert out.returncode == 0, out.stderr
    js = json.loads(out.stdout)
    assert js["fits"] is None and js["activations_not_estimated"] == "activations not estimated for model_type opt"
    assert all(p["peak"]["device"]["activations"] == 0 for r in js["ranks"] for p in r["phases"].values())

    out = memprof("estimate", "--model-config", str(configs["opt"]), "--gpu-memory", "80GiB", width=80)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # the line wraps at 80 columns
    verdict = "fits 80.0 GiB with 10% headroom (usable 72.0 GiB): unknown (activations not estimated for model_type opt"
    assert verdict in text
    assert text.index(verdict) < text.index("category")  # shown before the category table
    assert ": yes" not in text and ": no" not in text


def test_llama_fits_is_never_a_guess(configs):
    """A Llama-family config: before memprof models Llama activations, fits is unknown with the reason
    naming llama; once it does, fits is the computed comparison and the activations are in the peak."""
    cfg = load_model_config(str(configs["llama"]))
    est = estimate(EstimateInputs(model_config=cfg, micro_batch=4, seq_len=256, gpu_memory_bytes=80 * GIB))
    js = est.to_json()
    if js["activations_not_estimated"] is not None:
        assert js["fits"] is None
        assert js["activations_not_estimated"] == "activations not estimated for model_type llama"
    else:
        # the untied lm_head's logits alone are 4 x 256 x 1000 elements in every forward peak
        assert js["ranks"][0]["phases"]["forward"]["peak"]["device"]["activations"] >= 4 * 256 * 1000 * 4
        assert js["fits"] is (js["peak_device_bytes"] <= js["usable_gpu_bytes"])


def test_plan_refuses_a_model_without_activations(configs):
    for model in (["--model-config", str(configs["opt"])], ["--params", "7e9"]):
        out = memprof("plan", *model, "--gpus", "8", "--gpu-memory", "80GiB")
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
        assert "activations not estimated" in lines[0] and "--model-states-only" in lines[0]
        assert out.stdout == ""
    with pytest.raises(MemprofError, match="model_type opt"):
        plan(EstimateInputs(model_config=load_model_config(str(configs["opt"])), gpu_memory_bytes=80 * GIB), gpus=8)


def test_plan_model_states_only_says_so():
    args = ["plan", "--params", "1e6", "--gpus", "8", "--gpu-memory", "80GiB", "--model-states-only"]
    out = memprof(*args)
    assert out.returncode == 0, out.stderr
    title = out.stdout.splitlines()[0]
    assert title.startswith("memprof plan (model states only: activations not estimated for a bare parameter count")
    js = json.loads(memprof(*args, "--json").stdout)
    assert js["model_states_only"] is True and "bare parameter count" in js["activations_not_estimated"]
    # 1e6 fp32 AdamW parameters hold 16 MB of model states: stage 0 fits 72 GiB
    assert js["cheapest"]["zero_stage"] == 0
    # the planner refuses the flag where activations are estimated (it would plan without them)
    out = memprof("plan", "--model", "gpt2", "--gpus", "8", "--gpu-memory", "80GiB", "--model-states-only")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "drop --model-states-only" in out.stderr
    out = memprof("plan", "--model", "gpt2", "--gpus", "8", "--gpu-memory", "80GiB", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["model_states_only"] is False
