"""profile_accelerate in one process (no launcher, no DeepSpeed): micro-step bookkeeping, resident
states derived from the layer shapes, patches removed at the end, and an exception inside a phase
ending the recording with the finished micro-steps on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_ownership_deepspeed import gpt2_param_numels

from memprof.models import PRESETS
from memprof.run.files import load_run

FP32 = 4
TINY = dict(PRESETS["gpt2-tiny"])
NUMELS = gpt2_param_numels(TINY)
P = sum(NUMELS)
GAS, BATCHES, MICRO_BATCH, SEQ = 2, 6, 2, 16


def _setup(gas: int = GAS) -> tuple[Any, torch.nn.Module, Any, Any]:
    import transformers
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TINY))
    data = torch.utils.data.DataLoader(
        [torch.randint(0, TINY["vocab_size"], (SEQ,), generator=torch.Generator().manual_seed(i)) for i in range(BATCHES * MICRO_BATCH)],
        batch_size=MICRO_BATCH)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=gas)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, data = accelerator.prepare(model, optimizer, data)
    return accelerator, model, optimizer, data


def _train(accelerator: Any, model: torch.nn.Module, optimizer: Any, data: Any, fail_at: int | None = None) -> None:
    for i, ids in enumerate(data):
        with accelerator.accumulate(model):
            if i == fail_at:
                ids = ids.clone()
                ids[0, 0] = TINY["vocab_size"] + 7  # out of the embedding's range: IndexError in forward
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()


def test_micro_steps_and_resident_states(tmp_path: Path) -> None:
    from memprof.integrations.accelerate import profile_accelerate

    accelerator, model, optimizer, data = _setup()
    run = profile_accelerate(accelerator, model, optimizer, out_dir=tmp_path / "run")
    assert "forward" in vars(model)
    _train(accelerator, model, optimizer, data)
    doc = run.finish(report=False)
    assert "forward" not in vars(model) and "backward" not in vars(accelerator)  # patches removed
    assert doc is not None and (tmp_path / "run" / "memprof.json").is_file()
    (rank,) = doc["ranks"]
    steps = rank["steps"]
    assert [s["step"] for s in steps] == list(range(BATCHES))
    assert [s["optimizer_step"] for s in steps] == [i // GAS for i in range(BATCHES)]
    assert [s["micro_step"] for s in steps] == [i % GAS for i in range(BATCHES)]
    assert [s["boundary"] for s in steps] == [i % GAS == GAS - 1 for i in range(BATCHES)]
    for s in steps:
        assert set(s["phases"]) == ({"forward", "backward", "step"} if s["boundary"] else {"forward", "backward"})
    # at the end of the last optimizer step (before zero_grad): weights, .grad of every parameter,
    # torch AdamW's two moments and a 4-byte step tensor per parameter tensor
    rest = steps[-1]["phases"]["step"]["end"]["device"]
    assert rest["params"] == FP32 * P and rest["grads"] == FP32 * P
    assert rest["optimizer_state"] == 2 * FP32 * P + 4 * len(NUMELS)
    # the accumulated .grad of the first micro-step is alive through the second one's forward
    assert steps[-1]["phases"]["forward"]["end"]["device"]["grads"] == FP32 * P
    assert steps[-2]["phases"]["forward"]["end"]["device"]["grads"] == 0  # zero_grad freed them
    run_meta = doc["run"]
    assert (run_meta["micro_batch"], run_meta["seq_len"], run_meta["gradient_accumulation_steps"]) == (MICRO_BATCH, SEQ, GAS)
    assert run_meta["integration"] == "accelerate" and run_meta["optimizer"] == "adamw" and run_meta["torch_adam"]
    assert doc["estimate"] is not None


def test_evaluation_forwards_are_not_recorded(tmp_path: Path) -> None:
    from memprof.integrations.accelerate import profile_accelerate

    accelerator, model, optimizer, data = _setup(gas=1)
    run = profile_accelerate(accelerator, model, optimizer, out_dir=tmp_path / "run")
    ids = next(iter(data))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    _train(accelerator, model, optimizer, data)
    doc = run.finish(report=False)
    assert doc is not None and len(doc["ranks"][0]["steps"]) == BATCHES


def test_exception_in_a_phase_stops_recording_and_keeps_finished_micro_steps(tmp_path: Path) -> None:
    from memprof.integrations.accelerate import profile_accelerate

    accelerator, model, optimizer, data = _setup()
    run = profile_accelerate(accelerator, model, optimizer, out_dir=tmp_path / "run")
    with pytest.raises(IndexError):
        _train(accelerator, model, optimizer, data, fail_at=3)
    assert run.recorder.stopped and "forward" not in vars(model)  # tracking off, patches removed
    lines = [json.loads(x) for x in (tmp_path / "run" / "rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["type"] == "step"] == [0, 1, 2]
    assert not any(r["type"] == "end" for r in lines)
    doc = load_run(tmp_path / "run")
    assert doc["ranks"][0]["complete"] is False and len(doc["ranks"][0]["steps"]) == 3
