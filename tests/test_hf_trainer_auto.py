"""memprof resolves an HF "auto" DeepSpeed config as HF's Trainer does: a real Trainer run
(`deepspeed --num_gpus 2`, CPU ranks, tiny GPT-2) dumps what its DeepSpeed engine ended up with,
and memprof's reading of the same file with the same flags must match it value for value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from launch_helpers import DEEPSPEED, REPO, free_port, leaked_shm_segments, run_group

from memprof.estimate.inputs import settings_from_setup_files
from memprof.models import preset_config

HARNESS = Path(__file__).resolve().parent / "hf_harness" / "trainer_auto.py"
CONFIG = Path(__file__).resolve().parent / "user_configs" / "llava_zero3.json"  # stage 3, every size "auto"
MICRO, GAS, WORLD = 2, 2, 2


@pytest.fixture(scope="module")
def engine_values(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("hf") / "engine.json"
    port = free_port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(DEEPSPEED), "--num_gpus", str(WORLD), "--master_port", str(port), str(HARNESS), "--ds-config", str(CONFIG),
           "--out", str(out), "--micro-batch", str(MICRO), "--gradient-accumulation-steps", str(GAS), "--bf16"]
    proc = run_group(cmd, cwd=REPO, env=env, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert leaked_shm_segments(port) == []
    return json.loads(out.read_text())


def test_memprof_resolves_auto_as_the_trainers_engine_did(engine_values: dict) -> None:
    ev = engine_values
    assert ev["engine"] == "DeepSpeedEngine" and ev["world_size"] == WORLD and ev["global_steps"] == 2
    fields = settings_from_setup_files(deepspeed_config=CONFIG, model_config=preset_config("gpt2-tiny"), world_size=WORLD,
                                       micro_batch=MICRO, gradient_accumulation_steps=GAS, precision="bf16")
    z = fields["zero"]
    assert fields["zero_stage"] == ev["zero_stage"] == 3
    assert (z.reduce_bucket_size, z.prefetch_bucket_size, z.param_persistence_threshold) == (
        ev["reduce_bucket_size"], ev["prefetch_bucket_size"], ev["param_persistence_threshold"])
    assert (fields["micro_batch"], fields["gradient_accumulation_steps"]) == (ev["micro_batch"], ev["gradient_accumulation_steps"])
    assert fields["auto_values"]["train_batch_size"] == ev["train_batch_size"] == MICRO * GAS * WORLD
    assert fields["precision"] == "bf16" and ev["bf16"] is True and ev["fp16"] is False
    # and the numbers are HF's formulas for the model's hidden size (64 for gpt2-tiny)
    h = ev["hidden_size"]
    assert h == 64 and ev["reduce_bucket_size"] == h * h and ev["prefetch_bucket_size"] == int(0.9 * h * h)
    assert ev["param_persistence_threshold"] == 10 * h
