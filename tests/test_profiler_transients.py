"""The profiler names the transients: tensors born and freed inside a phase, between two ownership
walks, are labelled by the code that made them (memprof/measure/regions.py), so `other` stays
<= 1% of the step's peak.

* a plain torch Adam step (in-process, both CPU trackers): foreach Adam's temporary
  (``exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)``, torch/optim/adam.py
  ``_multi_tensor_adam``: one fp32 tensor per parameter) is optimizer_state at the step peak;
* a ZeRO-2 bf16 step on 2 ranks (the launch tests/test_measured_vs_estimated.py also reads): the
  fp32 gradient partition ZeRO flattens and casts inside ``step()`` (stage_1_and_2.py
  ``single_grad_partition = flat_grad_partition.to(fp32)``: partition numel x 4 bytes) is grads;
* torch's gradient clipping in a plain loop (in-process, both CPU trackers): the per-gradient norms,
  their stack and the total (torch/nn/utils/clip_grad.py ``_get_total_norm``) are grads;
* a ZeRO-0 fp32 run with gradient clipping on 2 ranks (its own launch): the flat copy of every
  gradient the engine all-reduces in backward (runtime/engine.py allreduce_bucket) is comm_buffers,
  as the estimator counts it, and DeepSpeed's clipping norms in the step (clip_fp32_gradients) grads.
"""

from __future__ import annotations

import functools
import gc
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launch_helpers import DeepSpeedRun, SharedLaunches, memprof_in_process
from test_measured_vs_estimated import PEAK_TOLERANCE, P, case_run, param_numels, zero12_partition
from test_measured_vs_estimated import _config as ds_config

from memprof.measure import MemoryProfiler, cuda_counters
from memprof.measure.backends import CudaBackend
from memprof.measure.dispatch_tracker import label_of
from memprof.measure.ownership import Owned, owned_storages, storage_key
from memprof.measure.regions import LabelStack, PeakRegions, install_regions
from memprof.run.files import load_run

OTHER_SHARE = 0.01
IN, HIDDEN, OUT, BATCH = 256, 1024, 256, 8


def _profiled_adam_steps(out: Path, steps: int = 2, bias: bool = True) -> tuple[dict, int, int]:
    """(run document, parameter elements, parameter tensors) of a small MLP trained with foreach Adam
    (tests/test_peak_owners.py reads its bias-free variant)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN, bias=bias), torch.nn.GELU(), torch.nn.Linear(HIDDEN, OUT, bias=bias))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    gc.collect()
    prof = MemoryProfiler(model=model, optimizer=optimizer, out_dir=out)
    with prof:
        for i in range(steps):
            x, y = torch.randn(BATCH, IN), torch.randn(BATCH, OUT)
            with prof.step(i) as s:
                with s.phase("forward"):
                    loss = torch.nn.functional.mse_loss(model(x), y)
                with s.phase("backward"):
                    loss.backward()
                with s.phase("step"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                s.loss = loss
    doc = prof.finish()
    assert doc is not None
    params = list(model.parameters())
    return doc, sum(p.numel() for p in params), len(params)


@pytest.mark.parametrize("tracker", ["allocator", "dispatch"])
def test_adam_step_temporaries_are_optimizer_state(tmp_path: Path, tracker: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMPROF_CPU_TRACKER", tracker)
    doc, numel, tensors = _profiled_adam_steps(tmp_path)
    rank = doc["ranks"][0]
    for step in rank["steps"]:
        rec = step["phases"]["step"]
        peak = rec["peak"]["device"]
        # the step names everything it makes: its peak's `other` is at most 1% above what was
        # `other` before it (whatever earlier tests in this process left alive is seeded as
        # `other` at the start: 32 MB of it in CI's full suite)
        before_step = step["phases"]["backward"]["end"]["device"]["other"]
        assert peak["other"] - before_step <= OTHER_SHARE * rec["peak_total"], (step["step"], before_step, peak)
        # exp_avg + exp_avg_sq (fp32) + a 4-byte step tensor per parameter, and the foreach
        # sqrt temporary (fp32, one per parameter) alive while the parameters are updated; the
        # allocator hook also sees a few bytes of wrapped Python scalars
        state = 2 * 4 * numel + 4 * tensors
        assert state + 4 * numel <= peak["optimizer_state"] <= state + 4 * numel + 64, peak
        assert peak["grads"] == 4 * numel and peak["params"] == 4 * numel


def test_an_offloaded_optimizers_working_memory_is_host(tmp_path: Path) -> None:
    # an optimizer over fp32 masters the walk places on the host (as ZeRO's offload_optimizer
    # places its partitions): its step runs on the CPU, its temporaries are host memory
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Linear(HIDDEN, OUT))
    masters = [p.detach().clone().requires_grad_() for p in model.parameters()]
    optimizer = torch.optim.Adam(masters, lr=1e-3, foreach=True)

    def walk() -> dict:
        on_device = {storage_key(t) for p in model.parameters() for t in (p, p.grad) if t is not None}
        return {k: o if k in on_device else o._replace(location="host")
                for k, o in owned_storages(model=model, optimizer=optimizer).items()}

    numel = sum(p.numel() for p in model.parameters())
    prof = MemoryProfiler(model=model, optimizer=optimizer, out_dir=tmp_path, owner_walk=walk)
    with prof:
        for i in range(2):
            x = torch.randn(BATCH, IN)
            with prof.step(i) as s:
                with s.phase("forward"):
                    loss = model(x).square().mean()
                with s.phase("backward"):
                    loss.backward()
                with s.phase("step"):
                    for m, p in zip(masters, model.parameters()):
                        m.grad = p.grad.clone()  # "copied to the host"
                    optimizer.step()
                    model.zero_grad(set_to_none=True)
    doc = prof.finish()
    assert doc is not None
    phases = doc["ranks"][0]["steps"][1]["phases"]
    rec = phases["step"]
    peak = rec["peak"]
    # the device peak holds the params and their grads; the Adam temporaries (4 x numel) that a
    # device label would have put beside them are host bytes, outside the device total; `other`
    # grows by at most 1% in the step (earlier tests' leftovers are `other` from the start)
    before_step = phases["backward"]["end"]["device"]["other"]
    assert peak["device"]["optimizer_state"] == 0
    assert peak["device"]["other"] - before_step <= OTHER_SHARE * rec["peak_total"], (before_step, peak)
    assert peak["device"]["params"] == peak["device"]["grads"] == 4 * numel
    assert peak["host"]["optimizer_state"] == 2 * 4 * numel + 4 * len(masters)


# what torch.nn.utils.clip_grad_norm_ runs through (clip_grad.py, torch 2.13: clip_grad_norm_ calls
# the first two; accelerate's clip_grad_norm_ imports the last two at its call)
CLIP_FUNCTIONS = [(torch.nn.utils.clip_grad, "_get_total_norm"), (torch.nn.utils.clip_grad, "_clip_grads_with_norm_"),
                  (torch.nn.utils, "get_total_norm"), (torch.nn.utils, "clip_grads_with_norm_")]


def test_regions_are_removed_when_the_profiler_exits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.Adam(model.parameters())
    clipping = {name: getattr(module, name) for module, name in CLIP_FUNCTIONS}
    with MemoryProfiler(model=model, optimizer=optimizer, out_dir=tmp_path):
        assert len(optimizer._optimizer_step_pre_hooks) == 1 and len(optimizer._optimizer_step_post_hooks) == 1
        assert all(getattr(module, name) is not clipping[name] for module, name in CLIP_FUNCTIONS)
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert all(getattr(module, name) is clipping[name] for module, name in CLIP_FUNCTIONS)


LAYERS = 6


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("tracker", ["allocator", "dispatch"])
def test_gradient_clipping_temporaries_are_grads(tmp_path: Path, tracker: str, foreach: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMPROF_CPU_TRACKER", tracker)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(IN, IN) for _ in range(LAYERS)])
    params = list(model.parameters())
    numel, tensors = sum(p.numel() for p in params), len(params)
    gc.collect()
    prof = MemoryProfiler(model=model, out_dir=tmp_path)
    with prof:
        for i in range(2):
            x = torch.randn(BATCH, IN)
            with prof.step(i) as s:
                with s.phase("forward"):
                    loss = model(x).square().mean()
                with s.phase("backward"):
                    loss.backward()
                with s.phase("step"):  # the clipping alone: its peak is the step's
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3, foreach=foreach)
            model.zero_grad(set_to_none=True)
    doc = prof.finish()
    assert doc is not None
    for step in doc["ranks"][0]["steps"]:
        rec = step["phases"]["step"]
        peak = rec["peak"]["device"]
        # nothing the clipping makes is `other` (what was `other` before it: earlier tests' leftovers)
        assert peak["other"] <= step["phases"]["backward"]["end"]["device"]["other"], (step["step"], peak)
        # every fp32 .grad, and at the clipping's peak (_get_total_norm, clip_grad.py:95-106): one
        # fp32 norm per gradient (torch._foreach_norm, or linalg.vector_norm each without foreach),
        # their torch.stack (tensors x 4 bytes) and the total norm (4 bytes); the few bytes of
        # scalars wrapped as tensors later (max_norm / (total_norm + 1e-6)) stay below that
        temporaries = 4 * tensors + 4 * tensors + 4
        assert 4 * numel + temporaries <= peak["grads"] <= 4 * numel + temporaries + 64, (step["step"], peak)
        assert peak["params"] == 4 * numel


Z2 = "z2-adamw-bf16-n2"


@pytest.fixture(scope="module")
def z2_run(shared_launches: SharedLaunches) -> dict:
    return load_run(shared_launches.deepspeed({Z2: case_run(Z2)})[Z2].ok())


def test_zero2_step_names_the_fp32_gradient_partition(z2_run: dict) -> None:
    n = len(z2_run["ranks"])
    # this rank's fp32 gradient partition: partition numel (the flat group padded to 2N, split
    # in N) x 4 bytes, made by step() from the bf16 averaged gradients
    fp32_partition = 4 * zero12_partition(n)
    # the launcher keeps its text outside tensor memory (memprof/train/data.py): no data set sits in
    # `other`, so at every peak of every rank `other` itself is at most 1%
    assert z2_run["run"]["data_tensor_bytes"] == 0
    for rank in z2_run["ranks"]:
        for step in rank["steps"]:
            for phase, rec in step["phases"].items():
                peak = rec["peak"]["device"]
                assert peak["other"] <= OTHER_SHARE * rec["peak_total"], (rank["rank"], step["step"], phase, peak)
            if step.get("boundary", True):
                assert step["phases"]["step"]["peak"]["device"]["grads"] >= fp32_partition, (rank["rank"], step)


# ZeRO-0 SGD fp32 with gradient clipping, at 8 tokens a sequence: backward's activations (saved for
# it at the start) are then below every .grad plus the all-reduce copy, so backward's peak is the
# all-reduce (the tests' usual 32 tokens put it at backward's start, where no copy exists yet)
Z0_CLIP = "z0-sgd-fp32-clip-seq8-n2"
Z0_CLIP_RUN = DeepSpeedRun.of(2, {**ds_config(0, "sgd", False), "gradient_clipping": 1.0}, steps=2, seq_len=8)


@pytest.fixture(scope="module")
def z0_clip_run(shared_launches: SharedLaunches) -> Path:
    return shared_launches.deepspeed({Z0_CLIP: Z0_CLIP_RUN})[Z0_CLIP].ok()


def test_zero0_names_the_all_reduce_copy_and_the_clipping(z0_clip_run: Path) -> None:
    run = load_run(z0_clip_run)
    assert run["run"]["data_tensor_bytes"] == 0  # the launcher's text is not tensor memory
    tensors = len(param_numels())  # gpt2-tiny's parameter tensors, lm_head tied to wte
    for rank in run["ranks"]:
        for step in rank["steps"]:
            where = (rank["rank"], step["step"])
            backward, step_ = step["phases"]["backward"]["peak"]["device"], step["phases"]["step"]["peak"]["device"]
            # backward ends with allreduce_gradients -> buffered_allreduce_fallback (runtime/engine.py
            # 3165, 3095): allreduce_no_retain (3828-3839) buckets gradients until their elements
            # exceed 5e8 (MEMORY_OPT_ALLREDUCE_SIZE, :151), so all P of them go in one, and
            # allreduce_bucket (3795) flattens it into one new fp32 tensor (fp32 is the communication
            # dtype: no cast copy) beside every .grad; the allocator hook adds a few bytes of wrapped
            # Python scalars (the 1/world_size factor)
            assert backward["grads"] == 4 * P and 4 * P <= backward["comm_buffers"] <= 4 * P + 64, (where, backward)
            # step: engine._take_model_step -> clip_fp32_gradients (engine.py 3511, 3502) ->
            # runtime/utils.py clip_grad_norm_: one fp32 norm per gradient (:398), kept in a list
            # while torch.stack(...).pow(2) (:404) makes two more tensors of that many (the stack
            # freed once pow returns, after pow's result exists); SGD updates in place
            clipping = 3 * 4 * tensors
            assert 4 * P + clipping <= step_["grads"] <= 4 * P + clipping + 64, (where, step_)
            for phase, rec in step["phases"].items():
                assert rec["peak"]["device"]["other"] <= OTHER_SHARE * rec["peak_total"], (where, phase, rec["peak"]["device"])
    # the estimator counts the copy as comm_buffers too (estimate/layout/deepspeed_zero.py _stage0)
    res = memprof_in_process("compare", str(z0_clip_run), "--fresh-estimate", "--json")
    assert res.returncode == 0, res.stderr
    rows = {(r["rank"], r["name"]): r for r in json.loads(res.stdout)["category_rows"]}
    for rank in run["ranks"]:
        row = rows[(rank["rank"], "backward/comm_buffers")]
        assert row["estimated"] == 4 * P and abs(row["error"]) <= PEAK_TOLERANCE, row


# ---- CUDA: the regions as allocator counters (no GPU here: the counters are simulated) ----------
DEVICE_GRADS, DEVICE_OPT = label_of("device", "grads"), label_of("device", "optimizer_state")
DEVICE_OTHER = label_of("device", "other")


def test_peak_regions_name_the_layers_above_each_region_start() -> None:
    # (allocated, peak so far) at: grads region start, optimizer region start, its end, grads end
    reads = iter([(100, 100), (150, 180), (120, 260), (120, 260)])
    regions = PeakRegions(lambda: next(reads))
    regions.push(DEVICE_GRADS)
    regions.push(DEVICE_OPT)
    regions.pop()  # the peak rose to 260 inside: 260 - 150 the optimizer's, 150 - 100 the grads region's
    regions.pop()  # no higher peak after: unchanged
    assert regions.peak == 260 and regions.layers == {DEVICE_OPT: 110, DEVICE_GRADS: 50}
    # a peak reached in the enclosing region after the inner one ended is the enclosing one's alone
    reads = iter([(100, 100), (150, 150), (150, 170), (120, 300)])
    regions = PeakRegions(lambda: next(reads))
    regions.push(DEVICE_GRADS)
    regions.push(DEVICE_OPT)
    regions.pop()
    regions.pop()
    assert regions.peak == 300 and regions.layers == {DEVICE_GRADS: 200}


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, int], Callable[[int], None]]:
    """The caching allocator's counters, simulated: (the counters, alloc(bytes), negative to free)."""
    now = {"allocated": 0, "peak": 0}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: now["allocated"])
    monkeypatch.setattr(cuda_counters, "start_phase", lambda device: now.update(peak=now["allocated"]))
    monkeypatch.setattr(cuda_counters, "allocated_and_peak", lambda device: (now["allocated"], now["peak"]))
    monkeypatch.setattr(cuda_counters, "read", lambda device: {
        "allocated_bytes": now["allocated"], "reserved_bytes": now["peak"], "peak_allocated_bytes": now["peak"],
        "alloc_retries": 0})

    def alloc(n: int) -> None:
        now["allocated"] += n
        now["peak"] = max(now["peak"], now["allocated"])

    return now, alloc


def test_cuda_step_peak_names_the_region_it_was_reached_in(fake_cuda) -> None:
    _, alloc = fake_cuda
    params, data = 1000, 50  # owned parameters; a tensor of the script's, alive before the step
    alloc(params + data)
    owned = {("cuda:0", 1): Owned("params", "device", params)}
    backend = CudaBackend(torch.device("cuda", 0), lambda: owned, {"negative_clamps": 0}, memory_budget=None)
    backend.start()
    backend.begin_step()
    backend.begin_phase("step")
    backend._peaks.push(DEVICE_GRADS)  # what the DeepSpeed wrapper's step region does
    alloc(400)  # the fp32 gradient partition
    backend._peaks.push(DEVICE_OPT)  # the inner torch optimizer's step hooks
    alloc(200)  # its temporaries
    alloc(-200)
    backend._peaks.pop()
    alloc(-400)
    backend._peaks.pop()
    peak = backend.end_phase("step")["peak"]["device"]
    assert peak == {**peak, "params": params, "grads": 400, "optimizer_state": 200, "other": data, "activations": 0}


def test_cuda_zero0_backward_peak_names_the_all_reduce_copy(fake_cuda) -> None:
    _, alloc = fake_cuda
    params, grads = 1000, 1000
    alloc(params)
    owned = {("cuda:0", 1): Owned("params", "device", params)}

    def buffered_allreduce_fallback(*args: object, **kwargs: object) -> None:
        alloc(grads)  # allreduce_bucket's flat copy of every gradient (runtime/engine.py:3796)
        alloc(-grads)

    engine = SimpleNamespace(buffered_allreduce_fallback=buffered_allreduce_fallback, optimizer=None)
    backend = CudaBackend(torch.device("cuda", 0), lambda: owned, {"negative_clamps": 0}, memory_budget=None,
                          regions=functools.partial(install_regions, engine=engine))
    backend.start()
    backend.begin_step()
    backend.begin_phase("backward")
    alloc(300)  # activations saved for backward
    alloc(grads)  # loss.backward(): every .grad
    owned[("cuda:0", 2)] = Owned("grads", "device", grads)
    alloc(-300)
    engine.buffered_allreduce_fallback()  # engine.allreduce_gradients, through the region
    peak = backend.end_phase("backward")["peak"]["device"]
    backend.stop()
    assert "buffered_allreduce_fallback" in vars(engine)  # the method the instance had is kept
    assert peak == {**peak, "params": params, "grads": grads, "comm_buffers": grads, "activations": 0, "other": 0}


def test_a_region_left_open_by_an_exception_is_closed_by_the_enclosing_one() -> None:
    tracker = SimpleNamespace(new_label=DEVICE_OTHER)
    stack = LabelStack(tracker)

    class Inner(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[override]
            raise RuntimeError("boom")

    inner = Inner([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    wrapper = SimpleNamespace(optimizer=inner, single_partition_of_fp32_groups=[], step=lambda: inner.step())
    remove = install_regions(stack, optimizer=wrapper)
    with pytest.raises(RuntimeError, match="boom"):
        wrapper.step()  # grads region, then the optimizer's, whose post hook never runs
    assert tracker.new_label == DEVICE_OTHER and stack.depth == 0
    remove()
    assert "step" in vars(wrapper) and not inner._optimizer_step_pre_hooks
