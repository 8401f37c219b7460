"""How a flat parameter buffer is cut into per-rank partitions: alignment and padding, each
rank's partition numel, and which parameters touch a rank's partition (DeepSpeed 0.19.8,
runtime/zero/stage_1_and_2.py; the rules an engine that flattens its parameters shares).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from memprof.estimate.model_shapes import ModelShape

NCCL_START_ALIGNMENT_FACTOR = 2  # stage_1_and_2.py: 4-byte alignment / sizeof(fp16)


def aligned(numel: int, alignment: int) -> int:
    return int(math.ceil(numel / alignment)) * alignment


def stage12_partition(shape: ModelShape, world_size: int, rank: int) -> tuple[int, int, int]:
    """(padded flat numel, partition numel, numel of the params that touch this rank's partition).

    DeepSpeedZeroOptimizer.__init__: the group is flattened and padded to a multiple of
    ``nccl_start_alignment_factor * world_size`` (flatten_dense_tensors_aligned), cut into equal
    partitions (get_data_parallel_partitions); get_partition_info lists the params that overlap a
    partition, and copy_grads_in_partition sizes ``grads_in_partition`` by their full numel.
    """
    cum = shape.prefix_sums
    total = cum[-1]
    padded = aligned(total, NCCL_START_ALIGNMENT_FACTOR * world_size)
    part = padded // world_size
    start, end = part * rank, min(part * (rank + 1), total)
    if start >= total:
        return padded, part, 0
    first = bisect.bisect_right(cum, start) - 1  # param holding element `start`
    last = bisect.bisect_left(cum, end)  # params [first, last) overlap [start, end)
    return padded, part, cum[last] - cum[first]


@dataclass(frozen=True)
class Stage12Grads:
    """What one rank's gradient bookkeeping holds between backward's end and ``step()``'s flatten."""

    held: int  # elements of the grad storages alive (grads_in_partition: every param touching the partition)
    pad: int  # elements of the zero tensor that fills the partition past the last param (last rank)
    largest_piece: int  # largest part of one param inside the partition (one norm copy at a time)


def stage12_rank_grads(shape: ModelShape, world_size: int, rank: int) -> Stage12Grads:
    """The gradient pieces of ``rank``'s stage 1/2 partition (stage_1_and_2.py, DeepSpeed 0.19.8).

    copy_grads_in_partition (:2184) sizes ``grads_in_partition`` by the full numel of every param
    in ``params_in_partition`` (a param straddling a boundary belongs to both ranks);
    independent_gradient_partition_epilogue (:1047) keeps ``averaged_gradients`` as views of them,
    plus, where the params end before the partition does, ``torch.zeros(partition_size -
    current_size)`` (_get_flat_partition_unpadded, :2890); get_grad_norm_direct (:2684) takes the
    norm of each view after ``.to(get_norm_dtype())`` (float64), one view at a time.
    """
    memo = shape.stage12_grads_memo
    found = memo.get((world_size, rank))
    if found is None:
        found = memo[(world_size, rank)] = _stage12_rank_grads(shape, world_size, rank)
    return found


def _stage12_rank_grads(shape: ModelShape, world_size: int, rank: int) -> Stage12Grads:
    padded, part, touching = stage12_partition(shape, world_size, rank)
    cum = shape.prefix_sums
    total = cum[-1]
    start, end = part * rank, min(part * (rank + 1), total)
    if start >= total:
        return Stage12Grads(0, part, 0)
    if shape.n_tensors == 1:
        # a bare parameter count stands for many tensors of unknown sizes (as for the stage-3
        # gather unit): the rank holds its own share, and no one piece is known to dominate
        return Stage12Grads(end - start, part - (end - start), 0)
    first = bisect.bisect_right(cum, start) - 1
    last = bisect.bisect_left(cum, end)
    largest = max(min(cum[i + 1], end) - max(cum[i], start) for i in range(first, last))
    return Stage12Grads(touching, part - (end - start), largest)



def stage12_partition_param_numels(shape: ModelShape, world_size: int, rank: int) -> list[int]:
    """Numels of the params that touch ``rank``'s stage 1/2 partition (params_in_partition), whole."""
    padded, part, touching = stage12_partition(shape, world_size, rank)
    cum, total = shape.prefix_sums, shape.prefix_sums[-1]
    start, end = part * rank, min(part * (rank + 1), total)
    if start >= total or shape.n_tensors == 1:
        return [touching] if touching else []
    first = bisect.bisect_right(cum, start) - 1
    last = bisect.bisect_left(cum, end)
    return list(shape.param_numels[first:last])


