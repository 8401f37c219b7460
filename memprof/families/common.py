"""What every model family file shares: the registry entry (:class:`ModelFamily`), the question an
activation formula answers (:class:`ActivationQuery`) and its answer (:class:`Activations`), element
sizes, and the attention facts that do not depend on the family.

Torch-free: the estimator imports this (benchmarks/bench_estimate.py checks torch stays out).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

INT64 = 8  # token ids, labels and position ids (torch.long)
FP32 = 4
# torch.get_rng_state(): the CPU generator's state as a uint8 tensor (mt19937's 624 words and the
# rest of CPUGeneratorImplState), which torch.utils.checkpoint stashes per checkpointed layer
# (preserve_rng_state=True); on CUDA it is host memory, like the device generators' states
CPU_RNG_STATE_BYTES = 5056


def lora_checkpoint_held(bsh_e: int, seq: int, layers: int, *, reentrant: bool, cpu: bool, kwargs_bytes: int) -> int:
    """What a LoRA model's loss keeps alive after backward under gradient checkpointing, until the
    loss is dropped (traced at 2 and 3 layers, Llama and GPT-2, both checkpoint kinds):

    * PEFT's ``enable_input_require_grads`` (``_prepare_model_for_gradient_checkpointing``) hooks the
      input embedding with ``output.requires_grad_(True)``: the frozen embedding's output becomes a
      leaf that requires grad, held by its AccumulateGrad node in the loss's graph, and backward
      fills its ``.grad``: 2 ``B*S*H*e`` (``bsh_e`` is one), whatever the depth;
    * reentrant checkpointing also keeps each ``CheckpointFunction`` node's ``ctx.run_function``
      (transformers' GradientCheckpointingLayer passes ``partial(forward, self, **kwargs)``: the
      layer's keyword tensors, shared by all layers: ``kwargs_bytes``) and, on CPU, the stashed
      ``ctx.fwd_cpu_state`` (torch.get_rng_state(), one per layer); the non-reentrant checkpoint's
      frames are gone by then (torch 2.13 utils/checkpoint.py)."""
    held = 2 * bsh_e
    if reentrant:
        held += kwargs_bytes + (layers * CPU_RNG_STATE_BYTES if cpu else 0)
    return held


@dataclass(frozen=True)
class LoraQuery:
    """PEFT LoRA adapters as the activation formulas need them (memprof.estimate.lora_shape): the
    rank, ``lora_dropout`` and, per decoder layer, the names of the wrapped modules inside it
    (relative to the layer, e.g. ``("self_attn.q_proj", "self_attn.v_proj")``). Only set where the
    family's LoRA formula applies: adapters inside the layers only, every other parameter frozen
    (no ``modules_to_save``, ``bias`` none)."""

    r: int
    dropout: float
    layers: tuple[tuple[str, ...], ...]

    def targets(self, layer: int) -> tuple[str, ...]:
        return self.layers[layer] if layer < len(self.layers) else ()


@dataclass(frozen=True)
class ActivationQuery:
    """One micro-batch's training setting, as the activation formulas need it."""

    micro_batch: int
    seq_len: int
    element_size: int  # bytes per element of the compute dtype (dsconfig.ELEMENT_SIZE[precision])
    attn_implementation: str = "sdpa"  # HF config._attn_implementation: sdpa or eager
    checkpointing: bool = False  # HF gradient checkpointing (non-reentrant torch.utils.checkpoint)
    device_type: str = "cuda"  # whose kernels run: cuda or cpu
    lora: LoraQuery | None = None  # PEFT LoRA on a frozen model; None: every parameter trains
    # TRL's fused LM head (memprof.estimate.trainer_terms.FusedHeadBytes) in place of the HF
    # ForCausalLM loss's logits and cross-entropy; None: the HF loss
    fused_head: Any = None
    # torch.utils.checkpoint's reentrant CheckpointFunction (``use_reentrant=True``: TRL's DPOTrainer
    # forces it with PEFT + ZeRO-3) instead of the non-reentrant checkpoint; only with checkpointing
    checkpoint_reentrant: bool = False

    @property
    def cpu(self) -> bool:
        return self.device_type == "cpu"


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch on one rank (the training loop of ``memprof.train``:
    it keeps the loss and its input batch, and drops the model output right after forward)."""

    saved: int  # everything saved for backward once forward returns (logits excluded)
    forward_peak: int  # largest activation footprint during forward
    backward_peak: int  # largest activation footprint during backward
    per_layer_saved: int  # one block's saved tensors (without checkpointing)
    formula: str  # the per-layer formula in words
    loop_held: int = 0  # what the loop holds between steps: its input batch (int64) and the loss
    backward_first_hook: int = 0  # activations alive when the first parameter gradients appear
    # (backward's start, the first hook's own moment, the largest moment after the head's backward:
    # the final norm's and the last block's in-block ones, CPU RNG stashes included) where the
    # family tells them apart (backward_peak and backward_first_hook take the max over all three,
    # an upper bound for an engine that releases the head's parameters and gradient after its
    # backward: StateLayout.backward_after_head_extra, ZeRO-3); () where not modelled
    backward_head_split: tuple[int, int, int] = ()
    # activations alive once the gradient hooks of the final norm and of the last block's MLP
    # output projection have fired (GPT-2 tied: ln_f and mlp.c_proj, 4 hooks), at GELU's last mul
    # of that block; 0 where not modelled. ZeRO-2 with a small reduce bucket allocates
    # grads_in_partition by then on some ranks (zero_layout._stage2_after_mlp_out_hooks)
    after_mlp_out_hooks: int = 0
    # the same block's backward at two later gradient hooks (GPT-2 tied; 0 where not modelled),
    # where ZeRO-2 + optimizer offload adds an oversized gradient's clone or fp64 norm copy
    # (layout/deepspeed_zero.py _stage2_offload_hooks): mlp.c_proj.weight's hook (c_proj's backward returned,
    # its weight gradient alive) and mlp.c_fc.bias's hook (c_fc's backward returned, GELU's
    # tensors released, c_fc's weight and bias gradients alive)
    mlp_out_weight_hook: int = 0
    mlp_in_bias_hook: int = 0
    # the widest moment inside the last layer's forward (checkpointing: its MLP, every layer's input
    # kept), paired with what an engine holds there beyond the loss's moment (ZeRO-3's prefetch
    # buffers: StateLayout.forward_in_layer_extra); 0 where not modelled
    forward_in_layer: int = 0
    # with checkpointing, every block's in-block forward moments (not only the last block's), each
    # as (position in ModelShape.module_order of the module whose fetch and release come last
    # before the moment, activation bytes then): an engine whose parameters come and go module by
    # module (ZeRO-3: StateLayout.forward_at_fetch) can peak in an earlier block, where fewer
    # block inputs are kept but prefetched all-gather buffers are held. Empty where not modelled
    forward_in_blocks: tuple[tuple[int, int], ...] = ()
    # with checkpointing, the activations alive as the last block's forward starts (its input and
    # every earlier block's, what the model's forward still holds of the embeddings, the CPU RNG
    # stashes): FSDP2's last-block copy-out (StateLayout.forward_copy_out_extra). 0 where not
    # modelled (the engine counts each block's checkpointed input only then)
    forward_before_last_block: int = 0
    # The backward seen block by block (block i = L-1 down to 0), for engines that keep every
    # param.grad through backward (DeepSpeed ZeRO-0/1: StateLayout.backward_blocks_extra):
    # ``block_moments``: the last block's in-block backward moments, each as (activation bytes,
    # elements of that block's own parameters whose .grad already exists then; a gradient being
    # formed is in the activation bytes); ``block_kept``: what each block keeps until its own
    # backward and releases there (its saved tensors; with checkpointing its checkpointed input;
    # the recomputed tensors come and go with each block), so block i's moment is the last
    # block's less (L-1-i) x block_kept; ``later_grad_elements[i]``: trainable elements whose
    # .grad exists when block i's backward starts (parameters after block i in parameters()
    # order: blocks > i, the final norm, an untied lm_head). Empty where not modelled.
    block_moments: tuple[tuple[int, int], ...] = ()
    block_kept: int = 0
    later_grad_elements: tuple[int, ...] = ()
    # what the formula leaves out or simplifies, one estimate assumption line each
    notes: tuple[str, ...] = ()
    # activations alive when the last block's forward returns (FSDP2's last-block moment, before
    # its reshard): every block's saved tensors and what the model's forward still holds then; 0
    # where not modelled (``saved`` stands for it: memprof.estimate.core._last_block_activations)
    last_block_end: int = 0


def attention_keeps_probabilities(attn_implementation: str, device_type: str, attn_dropout: bool) -> bool:
    """Whether the attention saves B*a*S*S tensors: eager always; sdpa on CPU with dropout, which
    falls back to the math kernel. CUDA's fused sdpa kernels save none."""
    return attn_implementation == "eager" or (device_type == "cpu" and attn_dropout)


@dataclass(frozen=True)
class ParamModule:
    """One parameter-holding module of the HF causal LM, as PEFT sees it (``model.named_modules()``
    of the model ``get_peft_model`` wraps): its full name, its own parameters as (name, index into
    the family's parameter numels) and, for an ``nn.Linear`` / GPT-2 ``Conv1D``, its in and out
    features (what a LoRA adapter on it is shaped by)."""

    name: str  # e.g. "transformer.h.0.attn.c_attn", "model.layers.0.self_attn.q_proj"
    params: tuple[tuple[str, int], ...]  # (("weight", 4), ("bias", 5)); a tied lm_head: (("weight", 0),)
    linear: tuple[int, int] | None = None  # (in_features, out_features) of a Linear / Conv1D
    output_embedding: bool = False  # the LM head (get_output_embeddings): left out of "all-linear"
    # the weight is stored (in, out) (GPT-2's Conv1D), not nn.Linear's (out, in): which dim FSDP2 shards
    weight_in_first: bool = False


@dataclass(frozen=True)
class ModelFamily:
    """Everything memprof knows about one family of HF causal LMs: the launcher, the estimator and
    the CLI ask this instead of testing ``model_type``. One instance per family file
    (``memprof/families/<family>.py``), listed in :data:`memprof.families.FAMILIES`.

    ``shape`` and ``activations`` work on :class:`memprof.estimate.model_shapes.ModelShape`
    (built by ``model_shape`` from ``shape_fields``); the family files never import it, so the
    estimator sits above them."""

    name: str  # in words, e.g. "GPT-2"
    # model_type -> (HF config class, HF causal-LM class), as transformers exports them: the
    # launcher builds the model from these (memprof/train/model.py), the estimate names the second
    hf_classes: Mapping[str, tuple[str, str]]
    # the config field that caps the sequence length (n_positions, max_position_embeddings)
    positions_field: str
    # the estimate's "train mode (...)" words: what dropout does in training
    train_mode: str
    # the launcher's check of a config: MemprofError naming the field (vocabulary checked apart)
    check_launchable: Callable[[dict[str, Any], str], None]
    # the config's vocabulary size and longest sequence, absent fields read as the HF class does
    vocab_size: Callable[[dict[str, Any]], Any]
    max_positions: Callable[[dict[str, Any]], int]
    # what the HF config class sets bos/eos_token_id to when absent, where that can fall outside a
    # small preset's vocabulary (GPT2Config: 50256); None where the defaults always fit
    default_special_token_id: int | None
    # ModelShape's fields for a config: parameter numels in DeepSpeed's flatten order
    # (``model.parameters()``), forward fetch order for ZeRO-3, and the dimensions the
    # activation formulas read; MemprofError on a bad shape
    shape_fields: Callable[[dict[str, Any]], dict[str, Any]]
    # activation bytes of one micro-batch, or None where the family's formula does not apply
    activations: Callable[[Any, ActivationQuery], Activations | None]
    # the parameter-holding modules in ``model.parameters()`` order (PEFT's view: LoRA targets,
    # modules_to_save); None where the family does not list them (LoRA then refused)
    param_modules: Callable[[dict[str, Any]], tuple[ParamModule, ...]] | None = None
    # PEFT's default LoRA targets for the family (peft/utils/constants.py
    # TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING): what `memprof advise` offers as fewer targets
    lora_default_targets: tuple[str, ...] = ()

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.hf_classes)

    def causal_lm_class(self, model_type: str) -> str:
        return self.hf_classes[model_type][1]


def later_grad_elements(numels: tuple[int, ...], n_layer: int, before: int, after: int) -> tuple[int, ...]:
    """For each block i, the elements of the parameters after block i in ``parameters()`` order
    (``Activations.later_grad_elements``): ``before`` tensors ahead of the blocks (embeddings),
    ``after`` behind them (final norm, an untied lm_head), the rest split evenly over the
    ``n_layer`` blocks. Empty where the count does not split evenly (not a plain stack)."""
    per_block, rem = divmod(len(numels) - before - after, n_layer) if n_layer > 0 else (0, 1)
    if rem or per_block <= 0:
        return ()
    tail = [0] * (len(numels) + 1)
    for j in range(len(numels) - 1, -1, -1):
        tail[j] = tail[j + 1] + numels[j]
    return tuple(tail[before + (i + 1) * per_block] for i in range(n_layer))


def rng_stash(q: ActivationQuery) -> int:
    """torch.utils.checkpoint (non-reentrant, preserve_rng_state=True) stashes the CPU generator's
    state per checkpointed block on CPU runs (``_get_device_states`` keeps device states for CUDA
    tensors only, host memory): CPU_RNG_STATE_BYTES, alive until that block's backward ran."""
    return CPU_RNG_STATE_BYTES if q.checkpointing and q.cpu and not q.checkpoint_reentrant else 0


def with_rng_stash(moments: tuple[tuple[int, int], ...], layers: int, q: ActivationQuery) -> tuple[tuple[int, int], ...]:
    """``Activations.block_moments`` with every block's stashed RNG state alive at the last block's
    backward (:func:`rng_stash`; block i then holds i+1 of them, ``block_kept`` carrying one each)."""
    extra = layers * rng_stash(q)
    return tuple((level + extra, own) for level, own in moments)
