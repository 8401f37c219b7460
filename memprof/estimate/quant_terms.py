"""What a bitsandbytes 4-bit base (QLoRA) adds to an estimate beyond its parameter bytes (which
model_shapes / the layouts hold): the dequantization workspace of a 4-bit Linear's matmul, and
the assumptions that say what was derived, measured and left out.

From bitsandbytes 0.50.2's code:

* forward: ``Linear4bit.forward`` -> ``matmul_4bit`` -> ``MatMul4Bit.forward`` ->
  ``torch.ops.bitsandbytes.gemm_4bit``. The default kernel (``backends/default/ops.py``
  ``_gemm_4bit_default_impl``, CPU's) and CUDA's ``_dequant_linear_fallback`` (taken for more
  than 1536 rows, ``_gemm_4bit_custom_max_m``, or where ``_gemm_4bit_use_custom_cuda`` declines
  the fused kernel) dequantize the whole weight into a compute-dtype tensor (``B_dq``) and call
  ``F.linear``; double quantization first rebuilds the fp32 absmax (``dequantize_blockwise``);
* ``MatMul4Bit`` saves only the packed weight (``ctx.tensors = (None, B)``): no input, as a
  frozen nn.Linear;
* backward: ``grad_A = grad_output @ dequantize_4bit(B, state).to(grad_output.dtype)``: the
  weight dequantized again, every time.

Torch-free.
"""

from __future__ import annotations

from memprof.dsconfig import ELEMENT_SIZE
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.model_shapes import ModelShape
from memprof.quant_config import DTYPE_OF_PRECISION, STORAGE_ITEMSIZE, dequantized_absmax_bytes


def dequant_workspace_bytes(inputs: EstimateInputs, shape: ModelShape) -> int:
    """The largest transient a 4-bit Linear's matmul allocates: its weight dequantized into the
    compute dtype, plus the fp32 absmax double quantization rebuilds (0 without a 4-bit base)."""
    setup = shape.quantization
    if setup is None or not shape.quantized_numels:
        return 0
    n = max(shape.quantized_numels)
    return n * STORAGE_ITEMSIZE[setup.compute_dtype] + dequantized_absmax_bytes(n, setup)


def quantization_assumptions(inputs: EstimateInputs, shape: ModelShape) -> list[str]:
    """What the 4-bit base holds, where, and what of it is not modelled."""
    setup = shape.quantization
    if setup is None:
        return []
    packed_bytes = shape.quant_packed_numel * setup.storage_itemsize
    where = ("partitioned and gathered like every parameter (ZeRO-3, quant_storage = the compute dtype)"
             if inputs.zero_stage == 3 else "whole on every rank")
    out = [
        f"{setup.describe()}: {len(shape.quantized_numels)} Linear weights ({sum(shape.quantized_numels):,} elements) held "
        f"as packed Params4bit, {packed_bytes:,} bytes ({shape.quant_packed_numel:,} elements of {setup.quant_storage}), "
        f"{where}, plus {shape.quant_state_bytes:,} bytes of QuantState (fp32 absmax per 64-element block"
        + (", double-quantized to uint8 with an fp32 absmax per 256 blocks, its 256-entry fp32 map and offset"
           if setup.double_quant else "")
        + ", a 16-entry fp32 code table per weight) whole on every rank, in params; the parameter counts above are "
        "the packed elements model.parameters() yields. Bytes derived from bitsandbytes 0.50.2's quantize_4bit and "
        "checked against a model quantized on CPU (tests/test_qlora.py); CUDA's kernel allocates the same sizes by "
        "its code, not measured on a GPU",
        "prepare_model_for_kbit_training (peft/utils/other.py) upcasts every non-4-bit fp16/bf16 parameter to fp32; "
        "DeepSpeed's engine casts them back to the training precision (_cast_module_mixed_precision), so they are "
        f"estimated in {inputs.precision}",
        f"4-bit Linears save no input for backward (bitsandbytes MatMul4Bit keeps only the packed weight), as frozen "
        f"Linears do; each call dequantizes its weight into a transient (gemm_4bit's dequantize + F.linear path: "
        f"bitsandbytes' CPU kernel, CUDA's fallback above 1536 rows or where its heuristic declines the fused kernel; "
        f"backward always): the largest is {dequant_workspace_bytes(inputs, shape):,} bytes, alive only inside one "
        "Linear's call, not added to the phase peaks; PEFT's lora Linear4bit.forward clones the base output "
        "(result.clone(), peft/tuners/lora/bnb.py), a transient B*S*out copy, also not added",
    ]
    model_dtype = DTYPE_OF_PRECISION[inputs.precision]
    if setup.compute_dtype != model_dtype:
        out.append(f"bnb_4bit_compute_dtype {setup.compute_dtype} differs from the model's {model_dtype}: each 4-bit "
                   f"Linear casts its input to {setup.compute_dtype} and its output back (Linear4bit.forward); those "
                   f"transients are not modelled (the workspace above is in {setup.compute_dtype}, "
                   f"{STORAGE_ITEMSIZE[setup.compute_dtype]} bytes per element vs {ELEMENT_SIZE[inputs.precision]})")
    return out
