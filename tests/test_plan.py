"""The planner's choices on cases reasoned out by hand (bare parameter counts: no activations, so
these plans are asked for on model states only)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from memprof.errors import MemprofError
from memprof.estimate import EstimateInputs, ZeroKnobs, plan
from memprof.estimate.plan import MAX_MICRO_BATCH

P = 10**9  # fp32 AdamW, 1e9 params; buckets made negligible (1000 elements), and ZeRO-3 keeps no
# parameter gathered between its forward and backward uses (stage3_max_reuse_distance 0)
SMALL = ZeroKnobs(reduce_bucket_size=1000, allgather_bucket_size=1000, prefetch_bucket_size=1000, max_reuse_distance=0)
# CUDA (the default device type), H100 assumed: torch's cuBLAS workspaces, one of :4096:8 (32 MiB)
# per GEMM-running thread (forward, autograd) + one 1024 KiB cuBLASLt workspace (forward's addmm)
BLAS_WORKSPACES = 2 * 4096 * 8 * 1024 + 1024 * 1024


def base(gpu_bytes: int) -> EstimateInputs:
    return EstimateInputs(n_params=P, precision="fp32", optimizer="adamw", zero=SMALL,
                          gpu_memory_bytes=gpu_bytes, headroom=0.0)


def test_huge_gpu_picks_stage_0():
    result = plan(base(10**12), gpus=8, model_states_only=True)
    assert result.cheapest.zero_stage == 0 and result.cheapest.offload_optimizer == "none"
    # no activations are modelled for a bare count, so every micro-batch up to the cap fits
    assert result.cheapest.largest_micro_batch == MAX_MICRO_BATCH


def test_stage_1_when_stage_0_cannot_fit():
    # stage 0 holds 4P weights + 12P AdamW state = 16e9 at rest: more than 12e9.
    # stage 1 on 8 GPUs: 4P + 12P/8 = 5.5e9 at rest, + 4P of gradients at the end of backward
    # (stage 1 keeps every param.grad until the reduction) + a 4000-byte bucket = 9.5e9 + 4000
    # (DeepSpeed's default FusedAdam keeps its step count in a Python int: no 4-byte step tensor),
    # + the cuBLAS workspaces.
    result = plan(base(12 * 10**9), gpus=8, max_gpus=64, model_states_only=True)
    rows = {(r.zero_stage, r.offload_optimizer, r.offload_param): r for r in result.rows}
    assert not rows[(0, "none", "none")].fits
    assert result.cheapest.zero_stage == 1 and result.cheapest.offload_optimizer == "none"
    assert rows[(1, "none", "none")].peak_device_bytes == 4 * P + 12 * P // 8 + 4 * P + 4000 + BLAS_WORKSPACES
    # fewest GPUs at stage 1: 8P + 12P/N + 4000 + W <= 12e9  ->  N >= 12/4 = 3 (exactly 3 fails by the
    # bucket and workspaces) -> 4
    assert rows[(1, "none", "none")].fewest_gpus == 4


def test_tiny_gpu_only_full_offload_fits():
    # ZeRO-3 with optimizer and parameters on the CPU leaves on the device only the IPG bucket
    # (1000 x 4 bytes) and the gathered prefetch window (1000 elements x 4 bytes) for a bare count,
    # beside the cuBLAS workspaces every CUDA training process holds
    result = plan(base(10**6 + BLAS_WORKSPACES), gpus=2, max_gpus=4, model_states_only=True)
    best = result.cheapest
    assert (best.zero_stage, best.offload_optimizer, best.offload_param) == (3, "cpu", "cpu")
    assert best.peak_device_bytes == 1000 * 4 + 1000 * 4 + BLAS_WORKSPACES
    assert all(not r.fits and r.fewest_gpus is None and r.largest_micro_batch is None for r in result.rows[:-1])


def test_largest_micro_batch_is_the_fitting_boundary():
    from memprof.estimate.core import peak_device_bytes
    from memprof.models import preset_config

    inp = EstimateInputs(model_config=preset_config("gpt2"), precision="bf16", seq_len=1024,
                         gpu_memory_bytes=16 * 2**30)
    usable = int(inp.gpu_memory_bytes * (1 - inp.headroom))
    result = plan(inp, gpus=4)
    for row in (result.rows[0], next(r for r in result.rows if r.zero_stage == 3 and r.offload_optimizer == "none")):
        mb = row.largest_micro_batch
        assert mb is not None and mb >= 1
        zero = replace(inp.zero, offload_optimizer=row.offload_optimizer, offload_param=row.offload_param)

        def peak(m: int) -> int:
            return peak_device_bytes(replace(inp, zero_stage=row.zero_stage, zero=zero, world_size=4, micro_batch=m))

        # memory grows with the batch, every batch up to the answer fits, and the next one does not
        peaks = [peak(m) for m in range(1, mb + 2)]
        assert peaks == sorted(peaks)
        assert peaks[mb - 1] <= usable < peaks[mb]


def test_plan_needs_gpu_memory():
    with pytest.raises(MemprofError):
        plan(EstimateInputs(n_params=P), gpus=8)
