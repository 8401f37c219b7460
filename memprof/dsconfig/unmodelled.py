"""What memprof does not model, refused before anything is read: ZeRO++, MiCS, ZenFlow, NVMe and
partial offload, pipeline / tensor / sequence parallelism, low-precision master weights, torch
autocast. One MemprofError line naming the feature and the key to remove."""

from __future__ import annotations

from typing import Any

from memprof.dsconfig.reading import Reading
from memprof.dsconfig.schema import AUTO


def refuse_unmodelled(ds: dict[str, Any], reading: Reading) -> None:
    zero = ds.get("zero_optimization")
    zero = zero if isinstance(zero, dict) else {}
    _refuse_zero_features(zero, reading)
    _refuse_partial_offload(zero, reading)
    _refuse_parallelism(ds, reading)
    for block_key in ("bf16", "bfloat16", "fp16"):
        block = ds.get(block_key)
        if isinstance(block, dict):
            for key in ("bf16_master_weights_and_grads", "bf16_optimizer_states", "fp16_master_weights_and_grads"):
                if block.get(key) not in (None, False):
                    raise reading.fail(f"{block_key}.{key} (low-precision master weights) is not modelled by memprof: remove it")
    if isinstance(ds.get("torch_autocast"), dict) and ds["torch_autocast"].get("enabled") not in (None, False):
        raise reading.fail("torch_autocast is not modelled by memprof: use the bf16 or fp16 block instead")


def _refuse_zero_features(zero: dict[str, Any], reading: Reading) -> None:
    for key, feature in (("zero_quantized_weights", "ZeRO++ quantized weights"),
                         ("zero_quantized_nontrainable_weights", "ZeRO++ quantized non-trainable weights"),
                         ("zero_quantized_gradients", "ZeRO++ quantized gradients")):
        if zero.get(key) not in (None, False, AUTO):
            raise reading.fail(f"zero_optimization.{key} ({feature}) is not modelled by memprof: remove it or set it to false")
    hpz = zero.get("zero_hpz_partition_size")
    if hpz not in (None, 0, 1, AUTO):
        raise reading.fail(f"zero_optimization.zero_hpz_partition_size {hpz!r} (ZeRO++ hierarchical partitioning) is not "
                           "modelled by memprof: remove it or set it to 1")
    for key in ("mics_shard_size", "mics_hierarchical_params_gather"):
        if key in zero:
            raise reading.fail(f"zero_optimization.{key} (MiCS) is not modelled by memprof, and DeepSpeed 0.19.8 removed "
                               "MiCS: remove it")
    if zero.get("zenflow") is not None:
        raise reading.fail("zero_optimization.zenflow (ZenFlow) is not modelled by memprof: remove it")


def _refuse_partial_offload(zero: dict[str, Any], reading: Reading) -> None:
    for key in ("offload_optimizer", "offload_param"):
        block = zero.get(key)
        if not isinstance(block, dict):
            continue
        if str(block.get("device", "none")).lower() == "nvme":
            raise reading.fail(f"zero_optimization.{key}.device 'nvme' is not supported by memprof (NVMe offload "
                               "is not modelled): use 'cpu' or 'none'")
        ratio = block.get("ratio", 1.0)
        if ratio not in (1, 1.0, AUTO):
            raise reading.fail(f"zero_optimization.{key}.ratio {ratio!r} (partial offload) is not modelled by "
                               "memprof: remove it (offload everything) or use 'device': 'none'")
        if block.get("super_offload"):
            raise reading.fail(f"zero_optimization.{key}.super_offload is not modelled by memprof: remove it")


def _refuse_parallelism(ds: dict[str, Any], reading: Reading) -> None:
    pipe = ds.get("pipeline")
    if isinstance(pipe, dict) and pipe.get("stages", 1) not in (1, AUTO):
        raise reading.fail(f"pipeline.stages {pipe.get('stages')!r} (pipeline parallelism) is not modelled by memprof: "
                           "remove the pipeline block")
    tp = ds.get("tensor_parallel")
    if isinstance(tp, dict) and tp.get("autotp_size", 1) not in (0, 1, AUTO):
        raise reading.fail(f"tensor_parallel.autotp_size {tp.get('autotp_size')!r} (tensor parallelism) is not modelled "
                           "by memprof: remove the tensor_parallel block")
    sp = ds.get("sequence_parallel_size", 1)
    if sp not in (1, AUTO):
        raise reading.fail(f"sequence_parallel_size {sp!r} (sequence parallelism) is not modelled by memprof: remove it")
