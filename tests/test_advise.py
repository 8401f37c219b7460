"""``memprof advise``: the changes it offers, their costs, and no advice that a real run contradicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import launch_deepspeed, side_by_side

from memprof.estimate import EstimateInputs, estimate
from memprof.estimate.advise import advise, step_costs
from memprof.models import preset_config

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def memprof(*args: str, width: int = 80) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memprof", *args], capture_output=True, text=True, timeout=180,
                          cwd=REPO, env={**os.environ, "COLUMNS": str(width)})


def _one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout == ""
    for w in words:
        assert w in lines[0], lines[0]


def test_json_names_every_change_and_the_best():
    out = memprof("advise", "--model", "gpt2-xl", "--deepspeed-config", "configs/stage2_adamw_bf16.json",
                  "--gpus-per-node", "8", "--seq-len", "1024", "--micro-batch", "8", "--gpu-memory", "24GiB", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["setup"]["fits"] is False and doc["setup"]["margin_bytes"] < 0
    kinds = {c["change"].split("=")[0] for c in doc["changes"]}
    # stage, optimizer offload, checkpointing, micro-batch/accumulation and the ZeRO-2 buckets; bf16 is already on
    assert {"zero_stage", "offload_optimizer", "activation_checkpointing", "micro_batch", "reduce_bucket_size"} <= kinds
    assert "precision" not in kinds
    for c in doc["changes"]:
        assert {"change", "peak_bytes", "saved_bytes", "fits", "cost"} <= c.keys()
        assert c["saved_bytes"] == doc["setup"]["peak_bytes"] - c["peak_bytes"]
        assert c["fits"] is (c["peak_bytes"] <= doc["usable_gpu_bytes"])
    best = doc["best"]
    assert best["fits"] and best["peak_bytes"] <= doc["usable_gpu_bytes"]
    # the global batch is kept: micro-batch x accumulation = 8
    mb, gas = (int(x.split("=")[1]) for x in best["change"].split(",") if x.startswith(("micro_batch", "gas")))
    assert mb * gas == 8


def test_the_advised_peak_is_the_estimate_of_that_setup():
    base = EstimateInputs(model_config=preset_config("gpt2"), model_name="gpt2", world_size=4, zero_stage=1,
                          micro_batch=8, seq_len=1024, gpu_memory_bytes=12 * GIB)
    a = advise(base)
    assert a.best is not None and a.best.inputs is not None
    assert a.best.peak.bytes == estimate(a.best.inputs).peak_device_bytes
    assert a.base_peak.bytes == estimate(base).peak_device_bytes


def test_zero3_communication_is_one_and_a_half_times_zero2():
    """The ZeRO paper (sec. 7): 2 psi per step for data parallelism / ZeRO-2, 3 psi for ZeRO-3."""
    n = 10**9
    base = EstimateInputs(n_params=n, world_size=8, zero_stage=2, precision="bf16")
    assert step_costs(base, n).comm_bytes == 2 * n * 2
    assert step_costs(base.with_(zero_stage=3), n).comm_bytes == 3 * n * 2
    # offload moves the 1/8 gradient partition down and the updated parameters up: 2 x n/8 x 2 bytes
    off = base.with_(zero=base.zero.__class__(offload_optimizer="cpu"))
    assert step_costs(off, n).pcie_bytes == 2 * (n // 8) * 2


def test_a_setup_that_fits_gets_its_margin_and_the_roomiest_changes():
    out = memprof("advise", "--model", "gpt2", "--gpus-per-node", "2", "--seq-len", "256", "--gpu-memory", "80GiB")
    assert out.returncode == 0, out.stderr
    assert "fits, margin" in out.stdout and "no change needed" in out.stdout
    assert max(len(line) for line in out.stdout.splitlines() if "│" in line) <= 80
    doc = json.loads(memprof("advise", "--model", "gpt2", "--gpus-per-node", "2", "--seq-len", "256",
                             "--gpu-memory", "80GiB", "--json").stdout)
    assert doc["best"]["change"] == "as_given" and doc["setup"]["margin_bytes"] > 0


def test_nothing_fits_names_the_closest():
    base = EstimateInputs(model_config=preset_config("gpt2-xl"), model_name="gpt2-xl", world_size=2, micro_batch=1,
                          seq_len=1024, gpu_memory_bytes=2 * GIB, headroom=0.0)
    a = advise(base)
    assert a.best is None and a.closest is not None and a.closest.peak.bytes > a.usable_bytes


def test_zero3_that_holds_more_says_why():
    # GPT-2 on 2 ranks at micro-batch 1: at ZeRO-3's peak the gathered parameters and the gradients
    # outweigh what partitioning saves
    a = advise(EstimateInputs(model_config=preset_config("gpt2"), model_name="gpt2", world_size=2, zero_stage=2,
                              precision="bf16", micro_batch=1, seq_len=128, gpu_memory_bytes=80 * GIB))
    z3 = next(c for c in a.changes if c.change == "zero_stage=3")
    assert z3.saved_bytes < 0 and z3.why_not is not None and "raises the peak" in z3.why_not
    grew = [c for c in z3.inputs and z3.peak.categories if z3.peak.categories[c] > a.base_peak.categories[c]]
    assert grew and all(c in z3.why_not for c in grew[:2])


def test_bad_input_is_one_line(tmp_path):
    _one_line_error(memprof("advise", "--model", "gpt2"), "--gpu-memory")
    # GPT-2 XL's 1.56e9 fp32 parameters are 6.2 GB: 1 GiB cannot hold a quarter of them on 4 GPUs
    _one_line_error(memprof("advise", "--model", "gpt2-xl", "--gpu-memory", "1GiB", "--max-gpus", "4"),
                    "below the model's own parameters")
    _one_line_error(memprof("advise", "--params", "1e9", "--gpu-memory", "80GiB"), "activations")
    bad = tmp_path / "bad.json"  # 2 x 1 x 2 ranks is 4, not 6
    bad.write_text(json.dumps({"train_batch_size": 6, "train_micro_batch_size_per_gpu": 2,
                               "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 1}}))
    _one_line_error(memprof("advise", "--model", "gpt2", "--deepspeed-config", str(bad), "--gpus-per-node", "2",
                            "--gpu-memory", "80GiB"), "train_batch_size")


def test_write_config_keeps_autos_and_names_training_arguments(tmp_path):
    path = tmp_path / "best.json"
    out = memprof("advise", "--model", "gpt2-large", "--deepspeed-config", "tests/user_configs/hf_zero2_auto.json",
                  "--micro-batch", "8", "--gradient-accumulation-steps", "1", "--gpus-per-node", "4", "--seq-len", "1024",
                  "--precision", "bf16",
                  "--gpu-memory", "24GiB", "--write-config", str(path), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    written = json.loads(path.read_text())
    source = json.loads((REPO / "tests/user_configs/hf_zero2_auto.json").read_text())
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if source.get(key) == "auto":
            assert written[key] == "auto"
    assert any(a.startswith("per_device_train_batch_size=") for a in doc["written_config"]["training_arguments"])
    assert written["zero_optimization"]["stage"] == int(doc["best"]["change"].split(",")[0].split("=")[1])
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]  # atomic: no temporary left behind


# -- no advice that a run contradicts: launch what advise recommends under the budget it advised for

ADVISE_CASES = {
    # name: (model, DeepSpeed config, fraction of the setup's own peak used as the budget)
    "gpt2-z0-adamw-mb4": ("gpt2-tiny", {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                        "steps_per_print": 10**6, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                                        "zero_optimization": {"stage": 0}}, 0.8),
    "llama-z2-adamw-gas2": ("llama-tiny", {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                                           "steps_per_print": 10**6, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                                           "zero_optimization": {"stage": 2}}, 0.75),
    # ZeRO-2, micro-batch 1, checkpointing on, 4096-element buckets (smaller than every weight matrix):
    # nothing left but the stage and offload; at 80% of its peak only optimizer offload (or bf16) fits,
    # and offload is the cheaper by the stated order. Its run peaks in the last block's GELU backward
    # with mlp.c_proj's cloned weight gradient waiting outside the bucket (stage_1_and_2.py :1446)
    "gpt2-z2-ckpt-offload": ("gpt2-tiny", {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                                           "steps_per_print": 10**6, "activation_checkpointing": {},
                                           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                                           "zero_optimization": {"stage": 2, "reduce_bucket_size": 4096,
                                                                 "allgather_bucket_size": 4096}}, 0.8),
    # ZeRO-3 with HF-sized buckets (reduce/prefetch 4096, persistence 64), micro-batch 4: at 80% of
    # its peak the advisor leaves ZeRO-3 (on 2 ranks its gathered parameters and gradients outweigh
    # what partitioning saves) for ZeRO-0 with micro-batch 2 x 2 accumulation steps
    "gpt2-z3-mb4-small-buckets": ("gpt2-tiny", {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                                "steps_per_print": 10**6,
                                                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                                                "zero_optimization": {"stage": 3, "reduce_bucket_size": 4096,
                                                                      "stage3_prefetch_bucket_size": 4096,
                                                                      "stage3_param_persistence_threshold": 64}},
                                  0.8),
    # the same ZeRO-3 buckets on Llama with checkpointing, micro-batch 1: at 85% the advice was ZeRO-1,
    # whose run stopped out of memory (issue 17: ZeRO-1's backward block by block), then ZeRO-2
    # (predicted 2,229,060), whose run did too (issue 18): its backward peaks inside a block's
    # recomputed MLP with grads_in_partition already allocated (a 4096-element bucket flush reached
    # the rank's partition: rank 1 at model.norm's hook, rank 0 at layers.1.input_layernorm's) and
    # down_proj's oversized gradient waiting, 2,426,784 / 2,432,088 measured on ranks 0 / 1. Both
    # modelled now (estimated 2,426,772 / 2,432,084 with the launcher's text), ZeRO-2 is rejected
    # and the advice is ZeRO-1 + optimizer offload + checkpointing
    "llama-z3-ckpt-small-buckets": ("llama-tiny", {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                                                   "steps_per_print": 10**6, "activation_checkpointing": {},
                                                   "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                                                   "zero_optimization": {"stage": 3, "reduce_bucket_size": 4096,
                                                                         "stage3_prefetch_bucket_size": 4096,
                                                                         "stage3_param_persistence_threshold": 64}},
                                    0.85),
}
# Recommendations a run contradicts today: the advice expected, and what was measured. The test
# checks the contradiction itself (the recommended run stops out of memory) and then xfails; a fix
# of the estimate makes that check fail, and the case moves out of here.
KNOWN_GAPS: dict[str, tuple[str, str]] = {
    # (none today) "name": ("the advice's change, as it starts", "what its run measured")
}
SEQ = 64
# The launcher keeps its text as a bytearray outside tensor memory (memprof/train/data.py), so no
# data set sits in these peaks (a setup given by flags holds none); a short text keeps start-up short.
TEXT_BYTES = 256


def _measured_peak(run: Path) -> int:
    doc = json.loads((run / "memprof.json").read_text())
    return max(s["phases"][ph]["peak_total"] for r in doc["ranks"] for s in r["steps"] for ph in s["phases"])


@pytest.mark.parametrize("name", list(ADVISE_CASES))
def test_recommended_setup_runs_within_the_budget_where_the_original_does_not(tmp_path, name):
    model, ds, fraction = ADVISE_CASES[name]
    cfg = tmp_path / "given.json"
    cfg.write_text(json.dumps(ds))
    setup = ["--model", model, "--deepspeed-config", str(cfg), "--gpus-per-node", "2", "--seq-len", str(SEQ),
             "--device-type", "cpu", "--headroom", "0"]
    given = json.loads(memprof("advise", *setup, "--gpu-memory", "100GiB", "--json").stdout)["setup"]["peak_bytes"]
    budget = int(given * fraction)
    out = memprof("advise", *setup, "--gpu-memory", str(budget), "--json", "--write-config", str(tmp_path / "best.json"))
    assert out.returncode == 0, out.stderr
    best = json.loads(out.stdout)["best"]
    assert best is not None and best["fits"] and best["peak_bytes"] <= budget
    recommended = json.loads((tmp_path / "best.json").read_text())
    text = tmp_path / "text.txt"
    text.write_text(("We hold these truths to be self-evident, that all men are created equal. " * 4)[:TEXT_BYTES])
    extra = ["--memory-budget", str(budget), "--data", str(text)]
    steps = 2 * recommended["gradient_accumulation_steps"] + 1
    # the two launches are independent (the budget is the profiler's, not the machine's memory):
    # side by side, as the shared launches go
    launched = side_by_side({
        "given": lambda: launch_deepspeed(2, ds, tmp_path / "given", steps=2, seq_len=SEQ, model=model, extra=extra),
        "best": lambda: launch_deepspeed(2, recommended, tmp_path / "best", steps=steps, seq_len=SEQ, model=model,
                                         extra=extra),
    })
    for result in launched.values():
        if isinstance(result, BaseException):
            raise result
    orig, res = launched["given"], launched["best"]
    # the original stops out of memory under the budget (exit 3, the breakdown written) ...
    assert orig.returncode != 0 and "out of memory" in (orig.stdout + orig.stderr).lower(), orig.stdout[-2000:]
    # ... the recommended setup finishes, and peaks within 3% of what advise predicted
    if name in KNOWN_GAPS:
        change, why = KNOWN_GAPS[name]
        assert best["change"].startswith(change), best["change"]
        assert res.returncode != 0 and "out of memory" in (res.stdout + res.stderr).lower(), (
            f"{name} now runs within its budget: take it out of KNOWN_GAPS")
        pytest.xfail(why)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    measured = _measured_peak(tmp_path / "best")
    assert abs(measured - best["peak_bytes"]) <= 0.03 * measured, (measured, best["peak_bytes"], best["change"])


def test_a_written_optimizer_block_reads_back_as_the_same_optimizer():
    from memprof.optimizers import ZOO, deepspeed_optimizer_block, zoo_name_of_deepspeed_type

    for name in ZOO:
        block = deepspeed_optimizer_block(name, lr=1e-4)
        assert zoo_name_of_deepspeed_type(block["type"], block["params"], "written config") == name


def test_lora_rank_and_targets_are_offered_and_priced_by_trainable_parameters():
    from memprof.peft_config import LoraSetup

    cfg = preset_config("llama-2-7b")
    base = EstimateInputs(model_config=cfg, model_name="llama-2-7b", world_size=2, zero_stage=2, precision="bf16",
                          micro_batch=1, seq_len=512, gpu_memory_bytes=80 * GIB,
                          peft=LoraSetup(r=16, target_modules="all-linear"))
    changes = {c.change: c for c in advise(base).changes}
    assert "lora_r=8" in changes and "lora_target_modules=q_proj,v_proj" in changes
    # PEFT's LoRA on q_proj and v_proj: r x (in + out) per target; Llama-2-7B's are 4096 x 4096, 32 layers
    trainable = 32 * 2 * 16 * (4096 + 4096)
    qv = changes["lora_target_modules=q_proj,v_proj"].costs
    # ZeRO-2 moves gradients and updated partitions of trainable parameters only: 2 x bf16 x trainable
    assert qv.comm_bytes == 2 * 2 * trainable
    assert "a modelling choice" in changes["lora_r=8"].cost
