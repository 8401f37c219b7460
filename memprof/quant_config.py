"""A bitsandbytes 4-bit base (QLoRA), read once: the ``quantization_config`` an HF config.json
carries (what ``BitsAndBytesConfig.to_dict`` writes, transformers 5.25
``utils/quantization_config.py``) or the ``--load-in-4bit`` flags, as a :class:`Bnb4bitSetup`,
and the bytes bitsandbytes 0.50.2 keeps for one quantized weight.

Modelled: ``load_in_4bit``, ``bnb_4bit_quant_type`` (nf4 / fp4), ``bnb_4bit_use_double_quant``,
``bnb_4bit_quant_storage``, ``bnb_4bit_compute_dtype``, ``llm_int8_skip_modules``. Refused in
one line: ``load_in_8bit`` (LLM.int8 is not modelled), another ``quant_method`` (GPTQ, AWQ, ...),
``llm_int8_enable_fp32_cpu_offload``.

The bytes of one weight of ``n`` elements, from bitsandbytes 0.50.2's code:

* packed data (the ``Params4bit`` parameter): two 4-bit codes per byte, held in
  ``quant_storage``: ``(n + 1) // (2 * itemsize)`` elements of ``itemsize`` bytes
  (``backends/cuda/ops.py`` ``quantize_4bit``: ``torch.empty(((n + 1) // (quant_storage.itemsize
  * 2), 1), dtype=quant_storage)``; the CPU / default kernel packs ``ceil(n / 2)`` bytes and
  ``view``s them as ``quant_storage``: the same bytes whenever ``n`` is a multiple of
  ``2 * itemsize``). The storage dtype changes the element count, never the bytes;
* ``QuantState`` (``functional.py`` ``quantize_4bit``), not a parameter: ``absmax``, one fp32
  per block of ``blocksize`` = 64 elements (``Params4bit.__new__``: ``blocksize = 64``), and
  ``code``, the 16-entry fp32 nf4 / fp4 table (``get_4bit_type``: a new tensor per call, so one
  per weight). With double quantization (``compress_statistics``) the fp32 ``absmax`` is
  replaced by ``quantize_blockwise(absmax - offset, blocksize=256)``: one uint8 per block, an
  fp32 ``absmax`` per 256 blocks, its own copy of the 256-entry fp32 dynamic map
  (``code.to(A.device, copy=True)``), and the fp32 ``offset`` (a 0-dim tensor).

Torch-free and bitsandbytes-free: the estimator imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memprof.errors import MemprofError

QUANT_TYPES = ("nf4", "fp4")
# BitsAndBytesConfig's accepted quant_storage strings -> bytes per element
STORAGE_ITEMSIZE = {"uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
# memprof's precision names -> torch dtype names, and back
DTYPE_OF_PRECISION = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64", "half": "float16",
            "float": "float32", "double": "float64"}

BLOCKSIZE = 64  # Params4bit.__new__ (transformers passes none)
NESTED_BLOCKSIZE = 256  # quantize_4bit: quantize_blockwise(_absmax - offset, blocksize=256)
CODE_4BIT_BYTES = 16 * 4  # get_4bit_type: 16 fp32 values
CODE_DYNAMIC_BYTES = 256 * 4  # create_dynamic_map(): 256 fp32 values, copied per QuantState
OFFSET_BYTES = 4  # _absmax.mean(): a 0-dim fp32 tensor


@dataclass(frozen=True)
class Bnb4bitSetup:
    """The 4-bit settings that change memory (hashable)."""

    quant_type: str = "fp4"  # BitsAndBytesConfig's default
    double_quant: bool = False
    quant_storage: str = "uint8"  # a torch dtype name
    compute_dtype: str = "float32"  # BitsAndBytesConfig's default (None -> torch.float32)
    skip_modules: tuple[str, ...] | None = None  # llm_int8_skip_modules; None: transformers' defaults
    source: str = "quantization_config"

    @property
    def storage_itemsize(self) -> int:
        return STORAGE_ITEMSIZE[self.quant_storage]

    def describe(self) -> str:
        skips = ("the output embedding (transformers' default skips)" if self.skip_modules is None
                 else "llm_int8_skip_modules " + (",".join(self.skip_modules) or "(none)"))
        return (f"4-bit {self.quant_type} base (bitsandbytes), double quantization "
                f"{'on' if self.double_quant else 'off'}, quant_storage {self.quant_storage}, compute dtype "
                f"{self.compute_dtype}, every Linear quantized but {skips} (from {self.source})")


def packed_numel(n: int, itemsize: int) -> int:
    """Elements of the packed ``Params4bit`` of an ``n``-element weight in a storage dtype of
    ``itemsize`` bytes (bitsandbytes' CUDA ``quantize_4bit``)."""
    return (n + 1) // (2 * itemsize)


def quant_state_bytes(n: int, setup: Bnb4bitSetup) -> int:
    """Bytes of the ``QuantState`` tensors of an ``n``-element weight (module docstring)."""
    blocks = -(-n // BLOCKSIZE)
    if not setup.double_quant:
        return blocks * 4 + CODE_4BIT_BYTES
    nested_blocks = -(-blocks // NESTED_BLOCKSIZE)
    return blocks + nested_blocks * 4 + CODE_DYNAMIC_BYTES + OFFSET_BYTES + CODE_4BIT_BYTES


def dequantized_absmax_bytes(n: int, setup: Bnb4bitSetup) -> int:
    """The fp32 ``absmax`` a double-quantized weight's matmul rebuilds before dequantizing
    (``functional.dequantize_4bit`` / ``_gemm_4bit_default_impl``: ``dequantize_blockwise`` of
    the uint8 absmax); 0 without double quantization (the stored fp32 absmax is used)."""
    return -(-n // BLOCKSIZE) * 4 if setup.double_quant else 0


def _dtype_name(value: Any, key: str, source: str) -> str:
    name = str(value).removeprefix("torch.")
    name = _ALIASES.get(name, name)
    if name not in STORAGE_ITEMSIZE:
        raise MemprofError(f"{source}: {key} = {value!r} is not one of {', '.join(STORAGE_ITEMSIZE)}")
    return name


def bnb_4bit_from_quantization_config(qc: Any, source: str = "quantization_config") -> Bnb4bitSetup | None:
    """The 4-bit setup an HF ``quantization_config`` dict states; None when it loads nothing in
    4 bits; MemprofError, one line naming the key, for what is not modelled."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise MemprofError(f"{source}: must be a JSON object (what BitsAndBytesConfig.to_dict writes)")
    method = str(qc.get("quant_method", "bitsandbytes"))
    if method != "bitsandbytes":
        raise MemprofError(f"{source}: quant_method {method!r} is not modelled (only bitsandbytes 4-bit)")
    in_8bit = qc.get("load_in_8bit", qc.get("_load_in_8bit", False))
    in_4bit = qc.get("load_in_4bit", qc.get("_load_in_4bit", False))
    if in_8bit:
        raise MemprofError(f"{source}: load_in_8bit (LLM.int8) is not modelled; only load_in_4bit")
    if not in_4bit:
        return None
    if qc.get("llm_int8_enable_fp32_cpu_offload"):
        raise MemprofError(f"{source}: llm_int8_enable_fp32_cpu_offload is not modelled")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")
    if quant_type not in QUANT_TYPES:
        raise MemprofError(f"{source}: bnb_4bit_quant_type = {quant_type!r} is not one of {', '.join(QUANT_TYPES)}")
    double = qc.get("bnb_4bit_use_double_quant", False)
    if not isinstance(double, bool):
        raise MemprofError(f"{source}: bnb_4bit_use_double_quant = {double!r} must be true or false")
    storage = _dtype_name(qc.get("bnb_4bit_quant_storage") or "uint8", "bnb_4bit_quant_storage", source)
    compute = _dtype_name(qc.get("bnb_4bit_compute_dtype") or "float32", "bnb_4bit_compute_dtype", source)
    if compute not in DTYPE_OF_PRECISION.values():
        raise MemprofError(f"{source}: bnb_4bit_compute_dtype = {compute!r} must be float32, bfloat16 or float16")
    skips = qc.get("llm_int8_skip_modules")
    if skips is not None and not (isinstance(skips, list) and all(isinstance(s, str) for s in skips)):
        raise MemprofError(f"{source}: llm_int8_skip_modules = {skips!r} must be a list of module names")
    return Bnb4bitSetup(quant_type, double, storage, compute, None if skips is None else tuple(skips), source)


def quantization_config_from_flags(load_in_4bit: bool, quant_type: str | None = None, double_quant: bool = False,
                                   quant_storage: str | None = None, compute_dtype: str | None = None
                                   ) -> dict[str, Any] | None:
    """``--load-in-4bit`` and its ``--bnb-4bit-*`` flags as the ``quantization_config`` dict
    BitsAndBytesConfig would write (None without ``--load-in-4bit``; the other flags alone are
    refused)."""
    if not load_in_4bit:
        if quant_type is not None or double_quant or quant_storage is not None or compute_dtype is not None:
            raise MemprofError("--bnb-4bit-* flags need --load-in-4bit")
        return None
    source = "--load-in-4bit flags"
    out: dict[str, Any] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                           "bnb_4bit_quant_type": quant_type or "fp4", "bnb_4bit_use_double_quant": bool(double_quant),
                           "bnb_4bit_quant_storage": _dtype_name(quant_storage or "uint8", "--bnb-4bit-quant-storage", source),
                           "bnb_4bit_compute_dtype": _dtype_name(compute_dtype or "float32", "--bnb-4bit-compute-dtype", source),
                           "llm_int8_skip_modules": None}
    bnb_4bit_from_quantization_config(out, source)  # the same checks as a config file's
    return out


def check_4bit_training(setup: Bnb4bitSetup, precision: str, zero_stage: int, engine: str, source: str) -> None:
    """MemprofError, one line, for a 4-bit base in a setup memprof does not model (or that breaks):

    * the FSDP2 engine (its estimate models no frozen adapters' base; accelerate's fully_shard
      path also leaves uint8 Params4bit out of the shards, utils/fsdp_utils.py);
    * bf16 / fp16 with a floating ``quant_storage`` of another dtype: DeepSpeed 0.19.8's
      ``engine._cast_module_mixed_precision`` runs ``p.data = p.data.to(param_dtype)`` on every
      parameter of a floating dtype, which converts the packed codes as if they were numbers
      (a uint8 storage is no floating dtype and is left alone; under fp32 nothing is cast);
    * ZeRO-3 with a ``quant_storage`` other than the compute dtype: memprof models the recipe
      transformers and PEFT document for QLoRA under ZeRO-3 (the storage in the compute dtype, so a
      Linear4bit's packed weight is partitioned and gathered like its bf16 neighbours; DeepSpeed's
      all-reduce fetch path, partition_parameters.py ``_all_gather_coalesced``, builds one flat
      buffer of ``get_only_unique_item`` of the module's dtypes), not a uint8 one.
    """
    dtype = DTYPE_OF_PRECISION[precision]
    if engine == "fsdp2":
        raise MemprofError(f"{source}: a 4-bit base under --engine fsdp2 is not modelled (DeepSpeed ZeRO or DDP only)")
    floating = setup.quant_storage not in ("uint8", "int8")
    if precision != "fp32" and floating and setup.quant_storage != dtype:
        raise MemprofError(f"{source}: bnb_4bit_quant_storage {setup.quant_storage} under {precision}: DeepSpeed casts "
                           f"every floating parameter to {dtype}, corrupting the packed 4-bit weights; use "
                           f"{dtype} or uint8")
    if zero_stage == 3 and setup.quant_storage != dtype:
        raise MemprofError(f"{source}: ZeRO-3 with bnb_4bit_quant_storage {setup.quant_storage} is not modelled: set "
                           f"bnb_4bit_quant_storage to the compute dtype {dtype} (--bnb-4bit-quant-storage {dtype}), as "
                           "the transformers / PEFT QLoRA + ZeRO-3 recipe does, or use ZeRO 0-2")
