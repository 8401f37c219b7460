"""What TRL's trainers add to a phase peak: the fused LM head's bytes (pure arithmetic, no torch).

TRL 1.16's ``SFTTrainer`` and ``DPOTrainer`` never build the ``(batch, seq, vocab)`` logits: each
patches the model's forward with ``add_fused_lm_head`` (trl/trainer/utils.py; SFTTrainer
``__init__`` with ``outputs=("log_probs", "entropy", "is_top1")``, DPOTrainer ``__init__`` with
``("log_probs", "entropy", "mean_logits", "is_top1")``) and ``compute_loss`` calls
``model(..., fused_lm_head=True)``. That forward runs the backbone, slices the last hidden state
to the ``N`` scored positions and calls ``ChunkedLogProbFunction`` (trl/kernels/chunked_logprob.py),
which projects ``TOKEN_CHUNK_SIZE`` (4096) tokens by ``chunk_size`` (32768,
``_CHUNKED_LOGPROB_CHUNK_SIZE``) vocabulary columns at a time into one preallocated buffer. So
where an HF ``ForCausalLM`` loss holds ``B*S*V`` fp32 logits, a TRL run holds, per forward:

* ``mm_buf``: ``min(N, 4096) x 32768`` elements of the compute dtype (autocast's, else the
  hidden state's), allocated whole whatever the vocabulary (a 512-token vocabulary still gets
  32768 columns: ``torch.empty((min(N, TOKEN_CHUNK_SIZE), chunk_size))``), in ``forward`` and again
  in ``backward``;
* the saved hidden copy: ``hidden_states[mask]`` (Triton devices: the ``N`` label positions) or
  ``hidden_states[:, :-1].reshape(-1, H)`` (elsewhere: all ``B*(S-1)`` positions; the slice is not
  contiguous, so ``reshape`` copies), ``N x H`` of the hidden dtype, held until backward;
* seven fp32 ``[N]`` running statistics (``running_max`` ... ``target_logit``);
* without Triton (CPU; the kernels' torch fallbacks ``_forward_tile`` / ``_backward_tile``): the
  tile's temporaries, ``n x c`` elements with ``n = min(N, 4096)`` and ``c = min(V, 32768)``:
  12 bytes each in forward (``z`` fp32, ``z - new_m``, ``e = exp(...)``), 13 with ``is_top1``
  (its bool ``before_target`` mask stays alive), and 29 bytes each in backward (``y``, ``z``,
  ``log_p``, ``p``, ``grad`` fp32, the bool ``is_target``, its fp32 copy, ``is_target - p``);
* in backward, ``grad_hidden``: ``N x H`` fp32 (accumulated in fp32 whatever the dtype).

``N``: SFT scores ``B*(S-1)`` positions off Triton and the label positions (``labels != -100``)
on it; DPO's batch is ``[chosen; rejected]``, so ``2B`` rows. DPO's reference forward (under
``torch.no_grad``) runs the same head a second time, transiently, and saves nothing.

DPO (TRL 1.16 ``DPOTrainer``, trl/trainer/dpo_trainer.py), what it adds beyond SFT's terms:

* the batch: ``DataCollatorForPreference.torch_call`` stacks ``prompt+chosen`` rows, then
  ``prompt+rejected`` rows, right-padded to the longest: ``B`` pairs are ``2B`` rows through the
  policy (``_compute_loss``: one ``model(...)`` call), so every activation term is that of a
  ``2B``-row micro-batch (:func:`dpo_rows`), the fused head's ``N`` = ``2B*(S-1)``;
* the reference forward (``_compute_loss``, unless ``precompute_ref_log_probs``): after the policy's
  forward returned (its saved tensors alive), under ``torch.no_grad`` and with the policy's
  gradient checkpointing off, either ``self.ref_model(...)`` (an explicit reference: its own
  ``add_fused_lm_head`` with ``outputs=("log_probs",)``) or, PEFT without a reference, the policy's
  own ``PeftModel`` inside ``use_adapter(..., None)`` (``disable_adapter``: the base model, through
  the policy's patched forward, so its four outputs). It saves nothing; its widest moment
  (:func:`reference_forward_bytes`) is its fused head (the backbone's ``last_hidden_state``, the
  head's inputs and its forward transient) or, under ``no_grad``, the last decoder layer's
  SwiGLU (``LlamaMLP.forward``): the embedding output (``LlamaModel.forward``'s ``inputs_embeds``),
  the layer's input, the post-attention sum and its normalised copy (4 ``R*S*H*e``; 3 in a
  one-layer model, where the input is the embedding output) beside silu's output, up's output and
  their product (3 ``R*S*I*e``), with cos, sin and the position ids;
* DPO's loss itself (``-logsigmoid(beta * ...)`` over per-sequence sums): ``[2B]``-sized, nothing.

The reference forward runs outside the policy engine's ``forward`` (where MemprofCallback's
forward phase ends) and before its backward: the estimate counts it in the forward phase, the
callback's phases do not see it.

Measured on this machine's CPU with memprof's allocation hook (tests/test_trainer_terms.py): the
head alone, fp32 and bf16, vocabularies 512 to 40000, within 0.1% of these functions. Where core
should add it: memprof/estimate/activations (the loss term of the forward and backward peaks),
replacing the logits / cross-entropy bytes when the run's ``trainer.trainer_class`` is a TRL
trainer (SFTTrainer, DPOTrainer, KTOTrainer, GRPOTrainer, RLOOTrainer all call add_fused_lm_head).
"""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_CHUNK_SIZE = 4096  # trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE
VOCAB_CHUNK_SIZE = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE
FP32 = 4
RUNNING_STATS = 7  # ChunkedLogProbFunction.forward: running_max ... target_logit, fp32 [N] each
FORWARD_TILE_BYTES = 12  # per tile element, _forward_tile without is_top1
IS_TOP1_TILE_BYTES = 1  # the bool before_target mask, alive to the end of _forward_tile
BACKWARD_TILE_BYTES = 29  # per tile element, _backward_tile with a log-prob gradient
INT64, BOOL = 8, 1
ROWS_PER_PAIR = 2  # DataCollatorForPreference: a chosen and a rejected row per pair
SWIGLU_FAMILY = ("llama", "mistral", "qwen2")  # LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x))


@dataclass(frozen=True)
class FusedHeadBytes:
    """The fused LM head's bytes in one forward + backward."""

    saved: int  # held from forward to backward (the hidden copy, the per-token outputs)
    forward_transient: int  # on top of ``saved`` at the forward's peak, freed when it returns
    backward_transient: int  # at the backward's peak, freed when it returns


def scored_positions(batch: int, seq: int, *, trainer: str = "sft", triton: bool = False,
                     label_tokens: int | None = None) -> int:
    """``N``, the rows ``ChunkedLogProbFunction`` gets: every shifted position off Triton
    (``B*(S-1)``), the label positions on it (``label_tokens``, default all of them). DPO's
    micro-batch of ``batch`` pairs is ``2*batch`` rows (DPOTrainer's collator: chosen, then rejected)."""
    rows = 2 * batch if trainer == "dpo" else batch
    positions = rows * (seq - 1)
    if triton and label_tokens is not None:
        return min(int(label_tokens), positions)
    return positions


def trl_fused_head_bytes(n_positions: int, hidden: int, vocab: int, *, compute_bytes: int, hidden_bytes: int,
                         triton: bool = False, is_top1: bool = True) -> FusedHeadBytes:
    """Bytes of ``add_fused_lm_head``'s forward and backward over ``n_positions`` rows (module doc).

    ``compute_bytes``: element size of the projection's dtype (autocast's, else the hidden
    state's: ChunkedLogProbFunction.forward ``compute_dtype``); ``hidden_bytes``: the hidden
    state's. ``triton``: CUDA/XPU with Triton (``_use_triton``), where the tiles are folded in
    kernels with no temporaries. ``is_top1``: the trainer asks for token accuracy (SFT and DPO do).
    """
    n = int(n_positions)
    if n <= 0:
        return FusedHeadBytes(0, 0, 0)
    tile_rows = min(n, TOKEN_CHUNK_SIZE)
    mm_buf = tile_rows * VOCAB_CHUNK_SIZE * compute_bytes
    tile = tile_rows * min(vocab, VOCAB_CHUNK_SIZE)
    forward_tile = 0 if triton else tile * (FORWARD_TILE_BYTES + (IS_TOP1_TILE_BYTES if is_top1 else 0))
    backward_tile = 0 if triton else tile * BACKWARD_TILE_BYTES
    hidden_copy = n * hidden * hidden_bytes
    return FusedHeadBytes(
        saved=hidden_copy,
        forward_transient=mm_buf + RUNNING_STATS * FP32 * n + forward_tile,
        backward_transient=mm_buf + FP32 * n * hidden + backward_tile,
    )


def trl_loss_extra_bytes(batch: int, seq: int, vocab: int, hidden: int, *, dtype_bytes: int, trainer: str = "sft",
                         triton: bool = False) -> FusedHeadBytes:
    """The fused head's bytes for a TRL ``trainer`` ("sft" or "dpo") micro-batch of ``batch`` x
    ``seq`` tokens, the model computing in ``dtype_bytes`` (4 fp32, 2 bf16/fp16; under CPU autocast
    the projection is bf16 over fp32 hidden states: call trl_fused_head_bytes directly)."""
    n = scored_positions(batch, seq, trainer=trainer, triton=triton)
    return trl_fused_head_bytes(n, hidden, vocab, compute_bytes=dtype_bytes, hidden_bytes=dtype_bytes, triton=triton)


def dpo_rows(pairs: int) -> int:
    """Rows through the policy for a DPO micro-batch of ``pairs`` preference pairs (module doc)."""
    return ROWS_PER_PAIR * int(pairs)


@dataclass(frozen=True)
class ReferenceForward:
    """DPO's reference forward under ``torch.no_grad``: its widest moment, beyond what the policy
    holds once its own forward returned, and which moment that is."""

    nbytes: int
    moment: str  # "head" or "mlp"
    head: int  # the fused head's moment
    mlp: int  # the last decoder layer's SwiGLU moment (0: not modelled)


def reference_forward_bytes(rows: int, seq: int, hidden: int, vocab: int, *, e: int, inner: int | None,
                            n_layer: int | None, head_dim: int | None, policy_outputs: bool,
                            triton: bool = False) -> ReferenceForward:
    """The reference forward's widest moment over ``rows`` x ``seq`` tokens in the compute dtype
    (``e`` bytes), beyond what the policy holds after its forward (module doc).

    Head (``add_fused_lm_head``'s ``_fused_forward``): ``last_hidden_state`` (``rows*seq*H*e``), the
    head's rows (``hidden_states[:, :-1].reshape`` copy off Triton, N x H), the clamped targets
    (N int64) and the label mask (N bool), and ChunkedLogProbFunction's forward transient
    (:func:`trl_fused_head_bytes`: its buffer, running statistics and tiles; ``is_top1`` only where
    the policy's patched forward runs it, ``policy_outputs``). Under ``no_grad`` nothing of it is
    saved. ``inner`` / ``n_layer`` / ``head_dim`` None: a model whose layers are not known (a bare
    parameter count), the MLP moment is left out."""
    r, s, h = int(rows), int(seq), int(hidden)
    n = scored_positions(r, s, triton=triton)
    fused = trl_fused_head_bytes(n, h, vocab, compute_bytes=e, hidden_bytes=e, triton=triton, is_top1=policy_outputs)
    head = r * s * h * e + fused.saved + n * (INT64 + BOOL) + fused.forward_transient
    mlp = 0
    if inner and n_layer and head_dim:
        streams = 4 if n_layer > 1 else 3
        mlp = streams * r * s * h * e + 3 * r * s * int(inner) * e + 2 * s * int(head_dim) * e + s * INT64
    return ReferenceForward(max(head, mlp), "head" if head >= mlp else "mlp", head, mlp)


def dpo_reference_forward(rows: int, seq: int, reference_shape: object | None, *, e: int, peft_reference: bool,
                          triton: bool) -> ReferenceForward | None:
    """:func:`reference_forward_bytes` for the model DPO's reference forward runs:
    ``reference_shape`` (a ModelShape: the explicit reference model's, or the policy's when PEFT
    disables its adapters; ``peft_reference``: the latter, whose patched forward computes the
    policy's four outputs). None when it has no transformer shape to read (a bare count). The MLP
    moment is the Llama family's SwiGLU; for another family only the head is counted."""
    shape = reference_shape
    if shape is None or not getattr(shape, "has_transformer_shape", False):
        return None
    swiglu = getattr(shape, "model_type", None) in SWIGLU_FAMILY
    return reference_forward_bytes(rows, seq, shape.hidden, shape.vocab, e=e, inner=shape.inner if swiglu else None,
                                   n_layer=shape.n_layer, head_dim=shape.head_dim, policy_outputs=peft_reference,
                                   triton=triton)
