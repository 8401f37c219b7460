"""Parameter shapes and counts of a model, without allocating weights.

A model type with a family file (memprof/families/: GPT-2, the Llama family) is counted in closed
form by its family (``ModelFamily.shape_fields``); other model types are built on the meta device
(``with torch.device("meta")``; torch is imported lazily).

The order is ``model.parameters()`` order, which is the order DeepSpeed flattens them in, so the
ZeRO partition boundaries computed from it fall where DeepSpeed's do.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from memprof.errors import MemprofError
from memprof.estimate.lora_shape import apply_lora
from memprof.estimate.quant_shape import apply_bnb_4bit
from memprof.estimate.stage3_replay import Stage3Forward, replay_stage3_forward
from memprof.families import family_of
from memprof.families.common import LoraQuery, ModelFamily
from memprof.peft_config import LoraSetup
from memprof.quant_config import Bnb4bitSetup, bnb_4bit_from_quantization_config, packed_numel, quant_state_bytes

# a module inside decoder layer N: "model.layers.3.self_attn.q_proj", "transformer.h.0.attn.c_attn"
_LAYER_MODULE = re.compile(r"\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs to know about a model."""

    param_numels: tuple[int, ...]  # one per parameter tensor in parameters() order, counted once (tied once)
    model_type: str | None = None
    n_layer: int | None = None
    hidden: int | None = None
    n_head: int | None = None
    inner: int | None = None
    vocab: int | None = None
    n_positions: int | None = None
    tied_embeddings: bool = True
    dropout: dict[str, float] | None = None  # embd/attn/resid dropout probabilities
    use_cache: bool = True  # HF config.use_cache: forward fills a DynamicCache (k, v copies per layer)
    # the parameter-holding modules in the order forward calls them, each as indices into
    # ``param_numels`` (a tied lm_head repeats wte's index); None: not known (see ``module_order``)
    fetch_modules: tuple[tuple[int, ...], ...] | None = None
    # Llama family: key/value heads (grouped-query attention when fewer than n_head), head size
    n_kv_head: int | None = None
    head_dim: int | None = None
    # module buffers (not parameters) the model holds, in elements: the Llama family's rotary
    # ``inv_freq`` and ``original_inv_freq`` (head_dim / 2 each); cast with the model like params
    buffer_numel: int = 0
    mlp_bias: bool = False  # Llama's mlp_bias: gate/up/down_proj carry biases
    hidden_act: str | None = None  # Llama family: the MLP activation (the activation model is SiLU's)
    sliding_window: int | None = None  # Mistral / Qwen2 (use_sliding_window): attention window
    # requires_grad per entry of ``param_numels``; None: every parameter trains (full fine-tuning)
    trainable_mask: tuple[bool, ...] | None = None
    # LoRA (memprof.estimate.lora_shape): each wrapped Linear's (in_features, out_features), in
    # parameters() order, its rank and lora_dropout; empty without LoRA
    lora_adapters: tuple[tuple[int, int], ...] = ()
    lora_r: int = 0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()  # the wrapped modules' names, in parameters() order
    lora_frozen_rest: bool = False  # every non-adapter parameter frozen (bias none, no modules_to_save)
    # a bitsandbytes 4-bit base (memprof.estimate.quant_shape): its setup, and each quantized
    # weight's own element count (its ``param_numels`` entry holds the packed Params4bit's
    # elements of ``quant_storage``); None / empty without quantization
    quantization: Bnb4bitSetup | None = None
    quantized_numels: tuple[int, ...] = ()

    @functools.cached_property
    def quant_packed_numel(self) -> int:
        """Elements of the packed Params4bit parameters, in quant_storage (all frozen)."""
        if self.quantization is None:
            return 0
        return sum(packed_numel(n, self.quantization.storage_itemsize) for n in self.quantized_numels)

    @functools.cached_property
    def quant_state_bytes(self) -> int:
        """Bytes of the quantized weights' QuantState tensors (absmax, code tables, double
        quantization's nested state): no parameters, so whole on every rank at every stage."""
        if self.quantization is None:
            return 0
        return sum(quant_state_bytes(n, self.quantization) for n in self.quantized_numels)

    @functools.cached_property
    def model_n_params(self) -> int:
        """The model's own parameter count: ``n_params`` with each 4-bit weight counted by its
        elements, not by its packed storage's (``n_params`` without quantization)."""
        return self.n_params - self.quant_packed_numel + sum(self.quantized_numels)

    def frozen_bytes(self, e: int) -> int:
        """Bytes of the frozen parameters held whole: ``e`` per element (the compute dtype DeepSpeed
        casts them to), the packed 4-bit weights at their storage dtype's size (a uint8 storage is no
        floating dtype, so engine._cast_module_mixed_precision leaves it alone)."""
        packed = self.quant_packed_numel
        itemsize = self.quantization.storage_itemsize if self.quantization is not None else e
        return (self.frozen_numel - packed) * e + packed * itemsize

    @functools.cached_property
    def lora_query(self) -> LoraQuery | None:
        """The adapters as the activation formulas take them, or None: no LoRA, or a setup their
        LoRA terms do not cover (trainable biases or modules_to_save, an adapter outside the
        decoder layers such as on lm_head): the full fine-tuning formula applies then."""
        if not self.lora_targets or not self.lora_frozen_rest or not self.n_layer:
            return None
        layers: list[list[str]] = [[] for _ in range(self.n_layer)]
        for name in self.lora_targets:
            match = _LAYER_MODULE.search(name)
            if match is None:
                return None
            layers[int(match.group(1))].append(match.group(2))
        return LoraQuery(self.lora_r, self.lora_dropout, tuple(tuple(names) for names in layers))

    @functools.cached_property
    def trainable(self) -> ModelShape:
        """The parameters that train, as DeepSpeed's optimizers see them: every ZeRO optimizer and
        FP16/BF16 wrapper keeps only ``is_optimized_parameter`` ones (requires_grad, numel > 0;
        runtime/utils.py), in ``parameters()`` order: stage_1_and_2.py ``DeepSpeedZeroOptimizer.__init__``
        (bit16_groups = trainable_parameters), stage3.py ``_get_trainable_parameter_groups``,
        fp16/fused_optimizer.py and unfused_optimizer.py ``__init__``, bf16_optimizer.py. Itself
        when every parameter trains (so full fine-tuning's arithmetic is untouched)."""
        if self.trainable_mask is None:
            return self
        return ModelShape(param_numels=tuple(n for n, t in zip(self.param_numels, self.trainable_mask) if t))

    @functools.cached_property
    def frozen_numel(self) -> int:
        """Elements of the parameters with requires_grad=False (0 in full fine-tuning)."""
        return self.n_params - self.trainable.n_params

    @functools.cached_property
    def n_params(self) -> int:
        return sum(self.param_numels)

    @functools.cached_property
    def stage12_grads_memo(self) -> dict:
        """(world size, rank) -> zero_layout.Stage12Grads, filled on use: shapes are memoised
        (model_shape), so a plan sweep computes each rank's partition walk once."""
        return {}

    @functools.cached_property
    def activations_memo(self) -> dict:
        """ActivationQuery -> the family's Activations (or None), filled on use by
        activations.model_activations: a plan sweep asks for the same few queries thousands of times."""
        return {}

    @functools.cached_property
    def prefix_sums(self) -> tuple[int, ...]:
        """Offsets of each parameter in the flattened group (DeepSpeed's flatten order)."""
        out = [0]
        for n in self.param_numels:
            out.append(out[-1] + n)
        return tuple(out)

    @functools.cached_property
    def _memo(self) -> dict[tuple[str, int], int]:
        return {}

    def stage3_partition_numel(self, world_size: int) -> int:
        """Sum over params of ZeRO-3 ``ds_tensor`` numel: each param padded to a multiple of the
        world size and split evenly (partition_parameters.py, _aligned_size / _padding_size)."""
        key = ("s3", world_size)
        if key not in self._memo:
            self._memo[key] = sum(-(-n // world_size) for n in self.param_numels)
        return self._memo[key]

    def persistent_numel(self, threshold: int) -> int:
        """Elements in params small enough to stay gathered at stage 3 (numel <= threshold)."""
        key = ("persist", threshold)
        if key not in self._memo:
            self._memo[key] = sum(n for n in self.param_numels if n <= threshold)
        return self._memo[key]

    def persistent_gathered_numel(self, threshold: int, world_size: int) -> int:
        """Elements the gathered persistent params hold at stage 3: each one's ``p.data`` is a view
        of an all-gather buffer of ``partition * N`` elements (partition_parameters.py,
        ``_allgather_params`` / ``all_gather_coalesced``), i.e. its numel rounded up to N."""
        key = ("persist_gathered", threshold, world_size)
        if key not in self._memo:
            self._memo[key] = sum(-(-n // world_size) * world_size for n in self.param_numels if n <= threshold)
        return self._memo[key]

    def module_order(self) -> tuple[tuple[int, ...], ...]:
        """The order ZeRO-3's parameter coordinator sees modules in forward: a family's is known
        (its ``shape_fields``' ``fetch_modules``); otherwise each parameter is taken as its own module, in
        ``parameters()`` order (a weight and its bias are then two neighbours instead of one)."""
        if self.fetch_modules is not None:
            return self.fetch_modules
        return tuple((i,) for i in range(len(self.param_numels)))

    def stage3_gathered_after_forward(
        self, threshold: int, max_reuse_distance: int, prefetch_bucket: int, max_live: int
    ) -> int | None:
        """Elements of non-persistent parameters still gathered when forward ends (steady state:
        from the second step on the coordinator replays a complete trace): memprof.estimate.
        stage3_replay over the trace (forward modules, then backward in reverse):

        * ``_fetch_sub_module_impl`` (:310) gathers the module's params, pops its entries off the
          parameter queue, then prefetches (:452): it pops queue entries, gathering those not
          available, until ``min(max_live - available, prefetch_bucket)`` elements are in flight.
          Entries of params already gathered cost nothing, so once fewer elements than that remain
          to be gathered the scan runs to the end of the queue, through backward's entries;
        * every popped entry raises ``__most_recent_step_id_param_fetched_for`` to its step, and
          ``__params_to_release`` (:634) keeps a param whose entry was popped for a later step
          ("reuse skipped by prefetch"), and one reused within ``max_reuse_distance`` elements
          of traversed params (:653-661).

        For a small model the scan reaches backward's entries early in forward, and from then on
        nothing is released: every parameter is gathered when the loss is computed.
        None for a bare parameter count (no modules to replay)."""
        replayed = self.stage3_forward(threshold, max_reuse_distance, prefetch_bucket, max_live, 1)
        # a parameter prefetched for backward is still in flight at forward's end: its buffer is held
        return None if replayed is None else replayed.end_numel

    def stage3_forward(self, threshold: int, max_reuse_distance: int, prefetch_bucket: int, max_live: int,
                       world_size: int) -> Stage3Forward | None:
        """ZeRO-3's forward replayed (memprof.estimate.stage3_replay): gathered elements and
        all-gather buffers when forward ends, and the most at any module; None for a bare count."""
        if len(self.param_numels) == 1:
            return None
        key = ("stage3", threshold, max_reuse_distance, prefetch_bucket, max_live, world_size)
        if key not in self._memo:
            self._memo[key] = replay_stage3_forward(self.param_numels, self.module_order(), threshold,
                                                    max_reuse_distance, prefetch_bucket, max_live, world_size)
        return self._memo[key]

    def stage3_retained_numel(self, threshold: int, max_reuse_distance: int) -> int:
        """A bare parameter count's stand-in for :meth:`stage3_gathered_after_forward`: a chain
        of small modules, where a parameter's reuse distance is twice the numel after it, so the
        last ``max_reuse_distance / 2`` elements of forward stay gathered (the prefetch window
        comes on top, see zero_layout)."""
        return min(self.n_params - self.persistent_numel(threshold), max_reuse_distance // 2)

    @property
    def n_tensors(self) -> int:
        return len(self.param_numels)

    @functools.cached_property
    def largest_param(self) -> int:
        return max(self.param_numels)

    @property
    def family(self) -> ModelFamily | None:
        """The model's family (memprof/families/), None for other model types and a bare count."""
        return family_of(self.model_type)

    @property
    def has_transformer_shape(self) -> bool:
        """Whether activations can be computed (the shape of a model with a family is known)."""
        return self.family is not None and self.n_layer is not None


def model_shape(cfg: dict[str, Any] | None = None, n_params: int | None = None, lora: LoraSetup | None = None) -> ModelShape:
    """The shape of a model from its HF config dict, or a bare parameter count, wrapped with LoRA
    when ``lora`` is given (memoised: the planner asks for the same model thousands of times)."""
    key = json.dumps(cfg, sort_keys=True, default=str) if cfg is not None else None
    return _model_shape_cached(key, n_params, lora)


def shape_of(inputs: Any) -> ModelShape:
    """The shape of an ``EstimateInputs``' model (its LoRA adapters included)."""
    return model_shape(inputs.model_config, inputs.n_params, inputs.peft)


@functools.lru_cache(maxsize=128)
def _model_shape_cached(cfg_json: str | None, n_params: int | None, lora: LoraSetup | None = None) -> ModelShape:
    cfg = json.loads(cfg_json) if cfg_json is not None else None
    if cfg is None:
        if n_params is None or n_params <= 0:
            raise MemprofError("no model: pass --model PRESET, --model-config PATH or --params N")
        if lora is not None:
            raise MemprofError("LoRA needs the model's shape: pass --model PRESET or --model-config PATH, not --params")
        # A bare count: one flat tensor. Padding and partition boundaries are then per the whole model.
        return ModelShape(param_numels=(int(n_params),))
    model_type = cfg.get("model_type")
    family = family_of(model_type)
    quant = bnb_4bit_from_quantization_config(cfg.get("quantization_config"), "model config quantization_config")
    if quant is not None and family is None:
        raise MemprofError(f"4-bit quantization of model_type {model_type!r} is not modelled (no family file)")
    if family is not None and lora is not None:
        fields = family.shape_fields(cfg)
        if quant is not None:
            fields = apply_bnb_4bit(fields, cfg, quant, family, lora)
        return ModelShape(**apply_lora(fields, cfg, lora, family))
    if quant is not None:
        # transformers 5.25 trainer_utils.validate_quantization_for_training: "You cannot perform
        # fine-tuning on purely quantized models"
        raise MemprofError("a 4-bit base trains only through adapters (transformers' Trainer refuses a purely quantized "
                           "model): add --peft-config or --lora-r with --lora-target-modules")
    if family is not None:
        return ModelShape(**family.shape_fields(cfg))
    if lora is not None:
        raise MemprofError(f"LoRA on model_type {model_type!r} is not modelled (no family file)")
    if not isinstance(model_type, str):
        raise MemprofError("model config has no \"model_type\": pass an HF config.json")
    return ModelShape(param_numels=_meta_param_numels(cfg), model_type=model_type)


def _meta_param_numels(cfg: dict[str, Any]) -> tuple[int, ...]:
    """Any HF model type: instantiate on the meta device (no weights allocated) and list parameters.

    ``with torch.device("meta")``, not ``accelerate.init_empty_weights``: under the latter,
    transformers 5.24 leaves tied weights untied (a tied Qwen2 then counts lm_head twice)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - both are project dependencies
        raise MemprofError(f"counting a {cfg.get('model_type')} model needs transformers and accelerate: {e}") from None
    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        config = AutoConfig.for_model(cfg["model_type"], **kwargs)
    except (ValueError, KeyError, TypeError) as e:
        raise MemprofError(f"model config: transformers cannot build a {cfg['model_type']!r} config: {e}".splitlines()[0]) from None
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:
            model = AutoModel.from_config(config)
    # parameters() yields a tied tensor once, as DeepSpeed sees it
    return tuple(int(p.numel()) for p in model.parameters() if p.requires_grad)

