"""ZeRO-3's in-flight all-gather outputs are comm_buffers in the ownership walk (issue 17), no launch.

A coalesced fetch's flat output is held only by DeepSpeed's ``AllGatherCoalescedHandle``
(deepspeed 0.19.8, runtime/zero/partition_parameters.py 735-811), registered under each of its
parameters in the model's ``InflightParamRegistry`` (parameter_offload.py:198-200,
partitioned_param_coordinator.py:613) until each is consumed (:406). A world of one rank never
gathers (all_gather_coalesced returns ``_no_gather_coalesced`` at partition world size 1, :1560),
so the handles here are DeepSpeed's own classes built as ``_all_gather_dtype`` builds them
(:1343-1370), over stand-in parameters; the launched run (tests/test_launch_lora.py) checks the
bytes DeepSpeed itself gathers on 2 ranks.

Expected bytes: DeepSpeed's partition rule, each rank's partition of a parameter of n elements is
ceil(n / world) elements (_aligned_size pads to a multiple of the world, :1690-1696, and
partition_size = tensor_size // world, :1816-1817); a coalesced call's flat output is the sum of
its parameters' partitions times the world (:1336, :1343), in the all-gather dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("deepspeed")

from deepspeed.runtime.zero.partition_parameters import (  # noqa: E402
    AllGatherCoalescedHandle,
    AllGatherHandle,
    MultipleAllGatherHandles,
    ZeroParamStatus,
)
from deepspeed.runtime.zero.partitioned_param_coordinator import InflightParamRegistry  # noqa: E402

from memprof.measure.ownership import owned_storages  # noqa: E402
from memprof.measure.ownership.deepspeed import INFLIGHT_GATHER  # noqa: E402

WORLD = 2
FP32, BF16 = 4, 2  # bytes per element


class Param:
    """What the handles and the registry read of a ZeRO-3 parameter (hashable by identity, as
    torch.nn.Parameter is)."""

    def __init__(self, ds_id: int, numel: int) -> None:
        self.ds_id, self.ds_numel, self.ds_shape = ds_id, numel, (numel,)
        self.ds_status = ZeroParamStatus.INFLIGHT
        self.ds_tensor = torch.zeros(math.ceil(numel / WORLD))  # this rank's partition
        self.ds_tensor.ds_numel = self.ds_tensor.numel()
        self.data = torch.empty(0)  # released: ZeRO-3 frees a partitioned parameter's data to size 0


class Done:
    """A collective that has completed (gloo's work object, as wait() sees it)."""

    def wait(self) -> None:
        pass


def coalesced(params: list[Param], dtype: torch.dtype = torch.float32) -> AllGatherCoalescedHandle:
    """As _all_gather_dtype (:1336-1370): one flat output, ``partitions`` its per-rank views."""
    partition_sz = sum(math.ceil(p.ds_numel / WORLD) for p in params)
    flat = torch.empty(partition_sz * WORLD, dtype=dtype)
    partitions = [flat.narrow(0, partition_sz * i, partition_sz) for i in range(WORLD)]
    return AllGatherCoalescedHandle(allgather_handle=Done(), params=params, partitions=partitions, world_size=WORLD)


class Stage3:
    """The ZeRO-3 wrapper as the walk sees it: detected by ``fp32_partitioned_groups_flat``
    (ownership.deepspeed.OPTIMIZER_WALKS), its ``module`` holding the registry."""

    def __init__(self) -> None:
        self.fp32_partitioned_groups_flat: list[torch.Tensor] = []
        self.module = torch.nn.Module()
        self.module.ds_inflight_param_registry = InflightParamRegistry()

    def register(self, handle, params: list[Param]) -> None:
        for p in params:  # __all_gather_params_ (:612-613): the same handle under each parameter
            self.module.ds_inflight_param_registry[p] = handle


def comm_owners(zo: Stage3) -> dict[str, int]:
    owned = owned_storages(optimizer=zo)
    by_owner: dict[str, int] = {}
    for o in owned.values():
        assert o.category == "comm_buffers" and o.location == "device", o
        by_owner[o.owner] = by_owner.get(o.owner, 0) + o.nbytes
    return by_owner


def test_coalesced_output_is_one_comm_buffer_until_its_last_parameter_is_consumed() -> None:
    # the launched case's bucket of layer 1's down_proj (176 x 64) and lm_head (512 x 64), and an odd
    # pair that shows the per-parameter padding: ceil(7/2) + ceil(10/2) = 9 elements per rank
    bucket = [Param(27, 176 * 64), Param(28, 512 * 64)]
    odd = [Param(3, 7), Param(4, 10)]
    zo = Stage3()
    zo.register(coalesced(bucket), bucket)
    zo.register(coalesced(odd), odd)
    assert comm_owners(zo) == {f"{INFLIGHT_GATHER} (2 params from ds_id 27)": FP32 * (176 * 64 + 512 * 64),
                               f"{INFLIGHT_GATHER} (2 params from ds_id 3)": FP32 * 9 * WORLD}
    # the coordinator pops a parameter's handle when its module runs (:406): the buffer stays while
    # another parameter of its bucket still waits, and is nobody's once the last one is consumed
    zo.module.ds_inflight_param_registry.pop(bucket[0]).wait()
    # wait() copied every parameter of the bucket out of the flat output (torch.cat, :795)
    assert all(p.data.numel() == p.ds_numel and p.ds_status == ZeroParamStatus.AVAILABLE for p in bucket)
    assert comm_owners(zo)[f"{INFLIGHT_GATHER} (2 params from ds_id 27)"] == FP32 * (176 * 64 + 512 * 64)
    zo.module.ds_inflight_param_registry.pop(bucket[1])
    assert list(comm_owners(zo)) == [f"{INFLIGHT_GATHER} (2 params from ds_id 3)"]


def test_multiple_handles_and_a_dtype_changing_single_gather() -> None:
    """all_gather_coalesced over several process groups returns MultipleAllGatherHandles (:1553-1558);
    a lone parameter is gathered by _all_gather_sequential (:1373-1444) into ceil(n / world) * world
    elements, which the handle keeps (``param_buffer``) only across a dtype change (:1418-1419)."""
    group_a, lone = [Param(1, 64), Param(2, 33)], Param(5, 101)
    buffer = torch.empty(math.ceil(101 / WORLD) * WORLD, dtype=torch.bfloat16)
    single = AllGatherHandle(None, lone, param_buffer=buffer, original_dtype=torch.float32)
    both = MultipleAllGatherHandles([coalesced(group_a, torch.bfloat16), single])
    zo = Stage3()
    zo.register(both, group_a + [lone])
    assert comm_owners(zo) == {f"{INFLIGHT_GATHER} (2 params from ds_id 1)": BF16 * (32 + 17) * WORLD,
                               f"{INFLIGHT_GATHER} (1 params from ds_id 5)": BF16 * 51 * WORLD}

