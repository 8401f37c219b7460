"""The training loop's input batches are ``activations``, named ``input batch`` by the ownership walk.

A loop memprof does not own (HF Trainer, TRL, a user's script) makes its batches outside every
phase and holds some beyond the current one (transformers 5 fetches an optimizer step's
gradient-accumulation batches up front, accelerate's DataLoaderShard one ahead). While a profiler
runs, memprof.measure.regions records every batch a torch DataLoader returns and every input of the
profiled root module's forward; the walk (ownership.walk.owned_storages) names those alive.

Expected bytes are the batches' own: rows x seq x 8 for an int64 tensor, rows x features x 4 for fp32.
"""

from __future__ import annotations

import gc

import torch
from torch.utils.data import DataLoader, Dataset, dataloader

from memprof.measure import MemoryProfiler
from memprof.measure.ownership import owned_storages, storage_key
from memprof.measure.ownership.core import Collector
from memprof.measure.ownership.plain_torch import INPUT_BATCH, InputBatches, input_batches_of, walk_input_batches
from memprof.measure.regions import LabelStack, install_regions

VOCAB, HIDDEN, SEQ, ROWS, GAS, OPT_STEPS = 50, 16, 8, 2, 2, 2
INT64, FP32 = 8, 4


class Tokens(Dataset):
    """Deterministic token rows; default_collate stacks them into fresh (ROWS, SEQ) int64 tensors."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = (torch.arange(SEQ) * 7 + i) % VOCAB
        return {"input_ids": ids, "labels": ids.roll(-1)}


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(input_ids))


def _profiler(tmp_path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> MemoryProfiler:
    gc.collect()
    return MemoryProfiler(model=model, optimizer=opt, out_dir=tmp_path, run={"model": "tiny"})


def _assert_named_input_batches(owned: dict, held: list[dict[str, torch.Tensor]]) -> None:
    for batch in held:
        for t in batch.values():
            assert (owned[storage_key(t)].category, owned[storage_key(t)].owner) == ("activations", INPUT_BATCH)


def test_trainer_like_loop_names_its_held_batches_activations(tmp_path) -> None:
    """GAS batches fetched before the micro-steps (as transformers 5's get_batch_samples does), both
    held through the optimizer step: at the step's peak each batch's input_ids and labels are
    activations, and the walk names them ``input batch``."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(Tokens(), batch_size=ROWS)
    prof = _profiler(tmp_path, model, opt)
    batch_bytes = 2 * ROWS * SEQ * INT64  # input_ids + labels, int64
    step = 0
    with prof:
        it = iter(loader)
        for _ in range(OPT_STEPS):
            held = [next(it) for _ in range(GAS)]  # outside every phase and every profiler step
            for micro, batch in enumerate(held):
                with prof.step(step) as s:
                    with s.phase("forward"):
                        logits = model(batch["input_ids"])
                        loss = torch.nn.functional.cross_entropy(logits.view(-1, VOCAB), batch["labels"].view(-1))
                        del logits
                    with s.phase("backward"):
                        loss.backward()
                    with s.phase("step"):
                        if micro == GAS - 1:
                            opt.step()
                            opt.zero_grad(set_to_none=True)
                    s.loss = loss.item()
                step += 1
            _assert_named_input_batches(owned_storages(model=model, optimizer=opt), held)
            del held, batch  # the next optimizer step's batches replace them, as in the Trainer
    doc = prof.finish()
    steps = doc["ranks"][0]["steps"]
    assert len(steps) == OPT_STEPS * GAS
    for rec in steps:
        peak = rec["phases"]["step"]["peak"]["device"]
        # both batches of the optimizer step and the fp32 loss (a few bytes of wrapped Python
        # scalars besides, which the allocator hook counts)
        assert GAS * batch_bytes + FP32 <= peak["activations"] <= GAS * batch_bytes + FP32 + 64, (rec["step"], peak)


def test_a_script_batch_fed_to_the_model_is_activations(tmp_path) -> None:
    """The FSDP2 harness's pattern: one batch made before the profiler, fed every step
    (``model(input_ids=x)``): the root module's forward pre-hook records it; at the step's peak it is
    activations, where the launcher's own batch is too."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, VOCAB, (ROWS, SEQ))
    prof = _profiler(tmp_path, model, opt)
    with prof:
        for i in range(2):
            with prof.step(i) as s:
                with s.phase("forward"):
                    loss = model(input_ids=x).float().mean()
                with s.phase("backward"):
                    loss.backward()
                with s.phase("step"):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                s.loss = loss.item()
    doc = prof.finish()
    last = doc["ranks"][0]["steps"][-1]["phases"]["step"]["peak"]["device"]
    assert ROWS * SEQ * INT64 + FP32 <= last["activations"] <= ROWS * SEQ * INT64 + FP32 + 64, last


def test_a_slice_of_a_resident_data_set_stays_the_data_sets() -> None:
    """A view into a larger storage is the data set the script keeps in tensor memory (``other``, as
    the estimator's script_resident_bytes), not a batch; a parameter passed as an input stays params."""
    model = TinyLM()
    data = torch.randint(0, VOCAB, (16, SEQ))
    fresh = torch.randint(0, VOCAB, (ROWS, SEQ))
    batches = InputBatches()
    batches.record({"input_ids": data[:ROWS], "fresh": [fresh], "weight": model.head.weight})
    col = Collector(compute_on_cpu=True)
    walk_input_batches(col, batches)
    assert set(col.owned) == {storage_key(fresh), storage_key(model.head.weight)}
    assert col.owned[storage_key(fresh)].nbytes == ROWS * SEQ * INT64
    owned = owned_storages(model=model)  # no profiler: nothing recorded for this model
    assert all(o.category == "params" for o in owned.values())
    with_batches = Collector(compute_on_cpu=True)
    with_batches.add_tensor(model.head.weight, "params", False, "head.weight")
    walk_input_batches(with_batches, batches)
    assert with_batches.owned[storage_key(model.head.weight)].category == "params"


def test_freed_batches_are_forgotten_and_the_hooks_leave_with_the_profiler() -> None:
    model = TinyLM()
    original_next = dataloader._BaseDataLoaderIter.__next__
    remove = install_regions(LabelStack(type("T", (), {"new_label": 0})()), model=model)
    try:
        assert dataloader._BaseDataLoaderIter.__next__ is not original_next
        batch = next(iter(DataLoader(Tokens(), batch_size=ROWS)))
        recorded = input_batches_of(model)
        assert recorded is not None
        assert {id(t) for t in recorded.tensors()} == {id(batch["input_ids"]), id(batch["labels"])}
        del batch
        gc.collect()
        assert recorded.tensors() == []
        model(torch.zeros(ROWS, SEQ, dtype=torch.long))
        assert recorded.tensors() == []  # the argument died with the call
    finally:
        remove()
    assert dataloader._BaseDataLoaderIter.__next__ is original_next
    assert input_batches_of(model) is None
    assert not model._forward_pre_hooks


def test_accelerate_loop_names_its_first_steps_batches(tmp_path) -> None:
    """profile_accelerate starts its profiler at the first training forward, after accelerate's
    DataLoaderShard fetched the first batch and the one after it (it iterates one ahead); the
    recorder records batches from its construction, so at the first optimizer step's peak both are
    activations: 2 x micro-batch x seq x 8 bytes (int64 ids, passed as input_ids and labels)."""
    import transformers
    from accelerate import Accelerator

    from memprof.integrations.accelerate import profile_accelerate
    from memprof.models import PRESETS

    micro, seq, n_batches = 2, 16, 4
    tiny = dict(PRESETS["gpt2-tiny"])
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**tiny))
    rows = [torch.randint(0, tiny["vocab_size"], (seq,), generator=torch.Generator().manual_seed(i))
            for i in range(n_batches * micro)]
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model, optimizer, data = accelerator.prepare(model, optimizer, torch.utils.data.DataLoader(rows, batch_size=micro))
    gc.collect()
    run = profile_accelerate(accelerator, model, optimizer, out_dir=tmp_path / "run")
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    doc = run.finish(report=False)
    assert dataloader._BaseDataLoaderIter.__next__.__name__ == "__next__" and input_batches_of(model) is None
    steps = doc["ranks"][0]["steps"]
    assert len(steps) == n_batches
    batch = micro * seq * INT64
    for i, rec in enumerate(steps):
        peak = rec["phases"]["step"]["peak"]["device"]
        held = 2 if i < n_batches - 1 else 1  # the current batch and the one ahead; none after the last
        # and the fp32 loss (a few bytes of wrapped Python scalars besides)
        assert held * batch + FP32 <= peak["activations"] <= held * batch + FP32 + 64, (i, peak)
