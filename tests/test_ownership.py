"""The ownership walk on plain torch models and optimizers (no DeepSpeed, no launch).

Expected bytes are derived from the layer shapes and dtypes written in each test.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from memprof.categories import CATEGORIES, LOCATIONS
from memprof.measure.ownership import Owned, owned_breakdown, owned_storages, storage_key

FP32 = 4
STEP = 4  # torch Adam/AdamW/RMSprop/Adagrad keep `step` as a 0-dim float32 tensor per param


def mlp() -> tuple[torch.nn.Module, int, int]:
    """Linear(8->16), ReLU, Linear(16->4): (model, parameter count, parameter tensors)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    return model, 8 * 16 + 16 + 16 * 4 + 4, 4


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 2, zero_grad: bool = False) -> None:
    for _ in range(steps):
        if zero_grad:
            opt.zero_grad(set_to_none=True)
        model(torch.randn(3, 8)).sum().backward()
        opt.step()


def test_plain_adamw_amsgrad_params_grads_and_state() -> None:
    model, p, tensors = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
    train(model, opt)  # grads stay: no zero_grad after the last step
    b = owned_breakdown(owned_storages(model=model, optimizer=opt))
    assert b["device"]["params"] == FP32 * p
    assert b["device"]["grads"] == FP32 * p
    # exp_avg, exp_avg_sq, max_exp_avg_sq per element + one step tensor per parameter tensor
    assert b["device"]["optimizer_state"] == 3 * FP32 * p + STEP * tensors
    assert b["device"]["master_params"] == b["device"]["comm_buffers"] == 0
    assert all(v == 0 for v in b["host"].values())  # nothing is offloaded


@pytest.mark.parametrize(
    "make_opt, state_per_element, has_step",
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1), 0, False),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True), 1, False),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.1), 1, True),
        (lambda ps: torch.optim.RMSprop(ps, lr=0.1, momentum=0.9, centered=True), 3, True),
        (lambda ps: torch.optim.Adagrad(ps, lr=0.1), 1, True),
        (lambda ps: torch.optim.Adam(ps, lr=0.1), 2, True),
    ],
)
def test_optimizer_zoo_state(make_opt, state_per_element: int, has_step: bool) -> None:
    model, p, tensors = mlp()
    opt = make_opt(model.parameters())
    train(model, opt, zero_grad=True)
    b = owned_breakdown(owned_storages(model=model, optimizer=opt))
    assert b["device"]["optimizer_state"] == state_per_element * FP32 * p + (STEP * tensors if has_step else 0)


def test_zero_grad_set_to_none_leaves_no_grads() -> None:
    model, p, _ = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, opt)
    opt.zero_grad(set_to_none=True)
    b = owned_breakdown(owned_storages(model=model, optimizer=opt))
    assert b["device"]["grads"] == 0 and b["device"]["params"] == FP32 * p


def test_tied_weights_and_views_count_once() -> None:
    emb = torch.nn.Embedding(10, 6)
    head = torch.nn.Linear(6, 10, bias=False)
    head.weight = emb.weight  # tied, like GPT-2's lm_head
    model = torch.nn.ModuleList([emb, head])
    owned = owned_storages(model=model)
    assert owned_breakdown(owned)["device"]["params"] == FP32 * 10 * 6
    view = emb.weight.data[2:5]
    assert storage_key(view) == storage_key(emb.weight) and len(owned) == 1


def test_flat_buffer_counts_whole_storage_once() -> None:
    # Params that are views of one padded flat buffer (as ZeRO-1/2 makes them) count the buffer's
    # full size once, padding included.
    flat = torch.zeros(7 * 3 + 5)  # 26 elements, 5 of them padding
    a = torch.nn.Parameter(flat[:7 * 3].view(7, 3))
    model = torch.nn.Module()
    model.a = a
    assert owned_breakdown(owned_storages(model=model))["device"]["params"] == FP32 * 26


def test_optimizer_over_copies_counts_them_as_master_params() -> None:
    # A wrapper DeepSpeed does not name: the optimizer updates fp32 copies, not the model params.
    model, p, tensors = mlp()
    model.to(torch.bfloat16)
    masters = [q.detach().float().requires_grad_() for q in model.parameters()]
    opt = torch.optim.Adam(masters, lr=0.1)
    for m in masters:
        m.grad = torch.zeros_like(m)
    opt.step()
    b = owned_breakdown(owned_storages(model=model, optimizer=opt))
    assert b["device"]["params"] == 2 * p  # bf16 compute copy
    assert b["device"]["master_params"] == FP32 * p
    assert b["device"]["grads"] == FP32 * p
    assert b["device"]["optimizer_state"] == 2 * FP32 * p + STEP * tensors


def test_priority_params_before_optimizer_state() -> None:
    # A storage claimed twice counts once, in the first of params, master, state, grads, comm.
    model, p, _ = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = next(model.parameters())
    opt.state[first]["momentum_buffer"] = first.data  # same storage as the param
    b = owned_breakdown(owned_storages(model=model, optimizer=opt))
    assert b["device"]["params"] == FP32 * p and b["device"]["optimizer_state"] == 0


def test_reduce_bucket_wins_over_the_grad_views_into_it() -> None:
    # ZeRO-2 contiguous_gradients (stage_1_and_2.py reduce_independent_p_g_buckets_and_remove_grads):
    # a gradient is copied into the reduce bucket and param.grad points at its slice until the
    # bucket is reduced. The storage is the bucket: comm_buffers, not grads (Collector.claim).
    model, p, _ = mlp()
    bucket = torch.zeros(p + 100)  # reduce_bucket_size elements, larger than the grads in it
    offset = 0
    for q in model.parameters():
        q.grad = bucket[offset:offset + q.numel()].view_as(q)
        offset += q.numel()
    master = torch.zeros(p)
    zero = SimpleNamespace(single_partition_of_fp32_groups=[master], ipg_buckets={torch.float32: SimpleNamespace(buffer=[bucket])})
    b = owned_breakdown(owned_storages(model=model, optimizer=zero))
    assert b["device"]["comm_buffers"] == FP32 * (p + 100) and b["device"]["grads"] == 0
    assert b["device"]["params"] == FP32 * p and b["device"]["master_params"] == FP32 * p


def test_none_and_empty_entries_are_skipped() -> None:
    model, _, _ = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.state[next(model.parameters())]["odd"] = [None, torch.empty(0), (None,)]
    b = owned_breakdown(owned_storages(model=model, optimizer=opt))
    assert b["device"]["optimizer_state"] == 0


def test_on_an_accelerator_the_tensor_device_decides_location() -> None:
    # When the compute device is not the CPU, a CPU tensor is host memory whatever owns it.
    model, p, tensors = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    train(model, opt)
    fake_engine = SimpleNamespace(module=model, optimizer=opt, device=torch.device("cuda", 0))
    b = owned_breakdown(owned_storages(fake_engine))
    assert all(v == 0 for v in b["device"].values())
    assert b["host"]["params"] == FP32 * p and b["host"]["optimizer_state"] == 2 * FP32 * p + STEP * tensors


def test_breakdown_has_every_location_and_category() -> None:
    owned = {("cpu", 1): Owned("params", "device", 10), ("cpu", 2): Owned("grads", "host", 3),
             ("cpu", 3): Owned("params", "device", 5)}
    b = owned_breakdown(owned)
    assert set(b) == set(LOCATIONS) and all(set(b[loc]) == set(CATEGORIES) for loc in LOCATIONS)
    assert b["device"]["params"] == 15 and b["host"]["grads"] == 3
    assert all(isinstance(v, int) for loc in b.values() for v in loc.values())


def test_nothing_passed_gives_an_empty_walk() -> None:
    assert owned_storages() == {}


def test_module_tree_listed_like_torch() -> None:
    """The walk's one-pass listing of parameters and buffers (memprof/measure/ownership/plain_torch.py)
    keeps torch's order and dedup: a shared submodule, a tied weight, a None parameter, and a module
    class that lists its members its own way (torch's calls are used then)."""
    from memprof.measure.ownership.plain_torch import module_tensors

    shared = torch.nn.Linear(3, 3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), shared, torch.nn.BatchNorm1d(3),
                                torch.nn.Sequential(shared, torch.nn.Linear(3, 3)))
    model[3][1].weight = model[0].weight  # tied

    class OwnListing(torch.nn.Sequential):
        def parameters(self, recurse: bool = True):
            return iter(list(super().parameters(recurse))[::-1])

    for m in (model, OwnListing(*model)):
        params, buffers = module_tensors(m)
        assert [id(p) for p in params] == [id(p) for p in m.parameters()]
        assert [id(b) for b in buffers] == [id(b) for b in m.buffers()]
