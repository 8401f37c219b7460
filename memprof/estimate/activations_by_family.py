"""Which activation model a model has: one dispatcher over the families memprof models.

Its own module so that ``activations`` (GPT-2 and the shared types) and ``activations_llama``
(which builds on those types) import in one direction only.
"""

from __future__ import annotations

from memprof.estimate.activations import Activations, gpt2_activations
from memprof.estimate.activations_llama import llama_activations
from memprof.estimate.model_shapes import ModelShape


def model_activations(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    element_size: int,
    attn_implementation: str = "sdpa",
    checkpointing: bool = False,
    device_type: str = "cuda",
) -> Activations | None:
    """The activation model of ``shape``'s family: GPT-2 (:func:`gpt2_activations`), the Llama
    family (``activations_llama.llama_activations``), or None where none exists (other model
    types, a bare parameter count, Llama-family activation checkpointing)."""
    if shape.model_type == "gpt2" and shape.n_layer is not None:
        return gpt2_activations(shape, micro_batch, seq_len, element_size, attn_implementation, checkpointing, device_type)
    if shape.is_llama_family:
        return llama_activations(shape, micro_batch, seq_len, element_size, attn_implementation, checkpointing, device_type)
    return None
