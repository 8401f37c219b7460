"""FSDP2 with reshard_after_forward: what a block gathers is named when it is made (issue 17).

In forward FSDP2 gathers a block's parameters into storages it re-allocates with
``UntypedStorage.resize_`` (``_fsdp_param.py``: ``alloc_storage``) and frees them again at the
block's ``reshard``, before any ownership walk can name them; its flat all-gather output
(``foreach_all_gather``) lives until the next block's copy-out. Both are alive at the forward peak
(inside the last block), and were counted under the label open when they were allocated
(``activations``), the gathered parameters missing from ``params`` by one block (-11.5% of the
forward peak on tests/test_fsdp2.py's ``reshard`` run). ``ownership.fsdp2.StorageResizeWatch`` now
names them as they are made, on both CPU trackers.

One process, no launch: torch's fake process group (``torch.testing._internal.distributed.fake_pg``)
stands for 2 ranks, so FSDP2 takes its multi-rank path (``foreach_all_gather``, the copy-out) while
its collectives move no data, which changes no allocation.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from memprof.measure.dispatch_tracker import AllocationTracker, label_of, live_tensor_storages
from memprof.measure.native import HookUnavailable
from memprof.measure.ownership.fsdp2 import StorageResizeWatch

H = 64  # both Linear shapes split evenly on 2 ranks: a gathered parameter is its whole, unpadded tensor
WORLD = 2
PARAMS, ACTIVATIONS, COMM = (label_of("device", c) for c in ("params", "activations", "comm_buffers"))

# one block: Linear(H, 4H) and Linear(4H, H), weights and biases, fp32
BLOCK_BYTES = (4 * H * H + 4 * H + H * 4 * H + H) * 4


@pytest.fixture(scope="module")
def fake_group() -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group exists already in this process")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    yield
    dist.destroy_process_group()


def _model() -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(H, 4 * H), torch.nn.Linear(4 * H, H))
                                  for _ in range(2)])
    for block in model:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh)  # the root: no parameters of its own, no group
    return model


def _tracker(kind: str):
    if kind == "dispatch":
        return AllocationTracker()
    from memprof.measure.allocation_hook_tracker import NativeAllocationTracker

    try:
        return NativeAllocationTracker()
    except HookUnavailable:
        pytest.skip("allocation hook unavailable here")


def _step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()
    for p in model.parameters():
        p.grad = None


@pytest.mark.parametrize("warm", [False, True], ids=["gathered-while-tracking", "gathered-before-tracking"])
@pytest.mark.parametrize("kind", ["allocator", "dispatch"])
def test_forward_peak_names_the_last_blocks_gathered_params_and_all_gather_output(fake_group, kind: str,
                                                                                 warm: bool) -> None:
    model = _model()
    x = torch.randn(2, H)
    if warm:  # the gathered storages made (and resharded) with the default allocator: not the hook's
        _step(model, x)
    tracker = _tracker(kind)
    tracker.seed(live_tensor_storages(), PARAMS)  # the shards (and any gathered storage, empty now)
    inside: list[tuple[int, int]] = []
    # after FSDP2's pre-forward of the last block (its gather, and the copy-out into its parameters)
    model[1][0].register_forward_pre_hook(lambda *_: inside.append((tracker.tally[PARAMS], tracker.tally[COMM])))
    with tracker, StorageResizeWatch(tracker.resync):
        # step 0: the first gather while tracking; step 1: FSDP2 re-gathers with resize_ what it resharded
        for _ in range(2):
            tracker.new_label = ACTIVATIONS  # as the profiler's forward phase
            tracker.reset_peak()
            before = tracker.tally[PARAMS], tracker.tally[COMM]
            loss = model(x).sum()
            peak = tracker.peak.tally
            # inside the last block: its gathered parameters and its all-gather output (world x each
            # rank's shard: the whole block); the previous block's output is freed by then
            assert inside[-1] == (before[0] + BLOCK_BYTES, before[1] + BLOCK_BYTES)
            # the forward peak (a few KiB of activations beside) is the last block's copy-out, in its
            # wait_for_unshard: the previous block's all-gather output is still alive there, held by
            # the local `prev_all_gather_state` until the method returns (_fsdp_param_group.py:430)
            assert (peak[PARAMS] - before[0], peak[COMM] - before[1]) == (BLOCK_BYTES, 2 * BLOCK_BYTES)
            # after forward every block is resharded and the root has freed the last all-gather output
            assert (tracker.tally[PARAMS], tracker.tally[COMM]) == before
            loss.backward()
            for p in model.parameters():
                p.grad = None
