"""Parameter shapes and counts of a model, without allocating weights.

GPT-2 is counted in closed form from ``transformers/models/gpt2/modeling_gpt2.py``
(GPT2LMHeadModel: wte, wpe, per block ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj;
ln_f; lm_head tied to wte unless ``tie_word_embeddings`` is false). The Llama family (``llama``,
``mistral``, ``qwen2``) in closed form from ``modeling_llama.py`` / ``modeling_mistral.py`` /
``modeling_qwen2.py`` (see :func:`llama_param_numels`). Other model types are built on the meta
device (``with torch.device("meta")``; torch is imported lazily).

The order is ``model.parameters()`` order, which is the order DeepSpeed flattens them in, so the
ZeRO partition boundaries computed from it fall where DeepSpeed's do.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from memprof.errors import MemprofError
from memprof.models import LLAMA_FAMILY, llama_family_fields
from memprof.units import is_positive_int


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs to know about a model."""

    param_numels: tuple[int, ...]  # one per trainable parameter tensor, counted once (tied once)
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

    @functools.cached_property
    def n_params(self) -> int:
        return sum(self.param_numels)

    @functools.cached_property
    def stage12_grads_memo(self) -> dict:
        """(world size, rank) -> zero_layout.Stage12Grads, filled on use: shapes are memoised
        (model_shape), so a plan sweep computes each rank's partition walk once."""
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
        """The order ZeRO-3's parameter coordinator sees modules in forward: GPT-2's is known
        (``gpt2_fetch_modules``); otherwise each parameter is taken as its own module, in
        ``parameters()`` order (a weight and its bias are then two neighbours instead of one)."""
        if self.fetch_modules is not None:
            return self.fetch_modules
        return tuple((i,) for i in range(len(self.param_numels)))

    def stage3_gathered_after_forward(
        self, threshold: int, max_reuse_distance: int, prefetch_bucket: int, max_live: int
    ) -> int | None:
        """Elements of non-persistent parameters still gathered when forward ends (steady state:
        from the second step on the coordinator replays a complete trace), by replaying
        ``PartitionedParameterCoordinator`` (partitioned_param_coordinator.py, DeepSpeed 0.19.8)
        over the trace (forward modules, then backward in reverse):

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
        if len(self.param_numels) == 1:
            return None
        key = ("gathered", threshold, max_reuse_distance, prefetch_bucket, max_live)
        if key in self._memo:
            return self._memo[key]
        numels = self.param_numels
        forward = self.module_order()
        trace = forward + forward[::-1]
        prefix = [0]
        for module in trace:
            prefix.append(prefix[-1] + sum(numels[i] for i in module))
        persistent = {i for i, n in enumerate(numels) if n <= threshold}
        queue = [(i, k) for k, module in enumerate(trace) for i in sorted(set(module))]
        head = 0
        gathered: set[int] = set()
        available = 0  # __n_available_params
        latest = [-1] * len(numels)  # __most_recent_step_id_param_fetched_for

        def gather(i: int) -> int:
            nonlocal available
            if i in persistent or i in gathered:
                return 0
            gathered.add(i)
            available += numels[i]
            return numels[i]

        def reused_soon(i: int, pos: int) -> bool:
            reuse = next(k for k in range(pos + 1, len(trace)) if i in trace[k])
            return prefix[reuse] - prefix[pos + 1] < max_reuse_distance

        for pos, module in enumerate(forward):
            for i in module:
                gather(i)
            while head < len(queue) and queue[head][1] <= pos:  # this module's own entries
                i, k = queue[head]
                latest[i] = max(latest[i], k)
                head += 1
            if prefetch_bucket > 0:
                budget = min(max_live - available, prefetch_bucket)
                fetched = 0
                while head < len(queue) and fetched < budget:
                    i, k = queue[head]
                    latest[i] = max(latest[i], k)
                    fetched += gather(i)
                    head += 1
            for i in set(module) - persistent:
                if latest[i] <= pos and not reused_soon(i, pos) and i in gathered:
                    gathered.discard(i)
                    available -= numels[i]
        out = sum(numels[i] for i in gathered)
        self._memo[key] = out
        return out

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
    def has_transformer_shape(self) -> bool:
        """Whether activations can be computed (a GPT-2 or Llama-family shape is known)."""
        return self.model_type in ("gpt2", *LLAMA_FAMILY) and self.n_layer is not None

    @property
    def is_llama_family(self) -> bool:
        return self.model_type in LLAMA_FAMILY and self.n_layer is not None


def gpt2_param_numels(cfg: dict[str, Any]) -> tuple[int, ...]:
    """GPT2LMHeadModel's parameter numels in ``parameters()`` order (tied lm_head counted once)."""
    n_layer, h, vocab, n_pos = _req(cfg, "n_layer"), _req(cfg, "n_embd"), _req(cfg, "vocab_size"), _req(cfg, "n_positions")
    inner = int(cfg.get("n_inner") or 4 * h)
    numels = [vocab * h, n_pos * h]  # transformer.wte, transformer.wpe
    block = [
        h, h,  # ln_1 weight, bias
        h * 3 * h, 3 * h,  # attn.c_attn (Conv1D weight is (in, out)), bias
        h * h, h,  # attn.c_proj
        h, h,  # ln_2
        h * inner, inner,  # mlp.c_fc
        inner * h, h,  # mlp.c_proj
    ]
    if cfg.get("add_cross_attention"):
        block += [h * 2 * h, 2 * h, h * h, h, h * h, h, h, h]  # crossattention c_attn/q_attn/c_proj, ln_cross_attn
    numels += block * n_layer
    numels += [h, h]  # ln_f
    if cfg.get("tie_word_embeddings", True) is False:
        numels.append(vocab * h)  # lm_head.weight, its own tensor when untied (no bias)
    return tuple(numels)


def gpt2_fetch_modules(cfg: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """GPT2LMHeadModel's parameter-holding modules in forward call order (modeling_gpt2.py:
    wte, wpe (GPT2Model.forward), per block ln_1, attn.c_attn, attn.c_proj, [ln_cross_attn,
    crossattention q_attn, c_attn, c_proj], ln_2, mlp.c_fc, mlp.c_proj, then ln_f and lm_head),
    as indices into :func:`gpt2_param_numels`. A tied lm_head uses wte's weight (index 0)."""
    n_layer = _req(cfg, "n_layer")
    cross = bool(cfg.get("add_cross_attention"))
    per_block = 20 if cross else 12
    modules: list[tuple[int, ...]] = [(0,), (1,)]
    for layer in range(n_layer):
        b = 2 + layer * per_block
        modules += [(b, b + 1), (b + 2, b + 3), (b + 4, b + 5)]  # ln_1, attn.c_attn, attn.c_proj
        if cross:  # appended after the MLP in gpt2_param_numels' block layout
            modules += [(b + 18, b + 19), (b + 14, b + 15), (b + 12, b + 13), (b + 16, b + 17)]
        modules += [(b + 6, b + 7), (b + 8, b + 9), (b + 10, b + 11)]  # ln_2, mlp.c_fc, mlp.c_proj
    ln_f = 2 + n_layer * per_block
    modules.append((ln_f, ln_f + 1))
    modules.append((0,) if cfg.get("tie_word_embeddings", True) is not False else (ln_f + 2,))
    return tuple(modules)


def _llama_biases(f: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, MLP bias) by family: LlamaAttention/LlamaMLP take
    ``attention_bias`` (all four projections) and ``mlp_bias``; Qwen2Attention has
    ``bias=True`` on q/k/v and none on o_proj, Qwen2MLP none; Mistral none anywhere."""
    if f["model_type"] == "llama":
        att = bool(f.get("attention_bias", False))
        return att, att, bool(f.get("mlp_bias", False))
    if f["model_type"] == "qwen2":
        return True, False, False
    return False, False, False


def _sliding_window(f: dict[str, Any]) -> int | None:
    """The attention window in effect: MistralConfig's ``sliding_window`` (default 4096, None
    turns it off); Qwen2's only with ``use_sliding_window`` (Qwen2Config.__post_init__); Llama none."""
    if f["model_type"] == "mistral":
        return f.get("sliding_window", 4096)
    if f["model_type"] == "qwen2" and f.get("use_sliding_window"):
        return f.get("sliding_window", 4096)
    return None


def llama_param_numels(cfg: dict[str, Any]) -> tuple[int, ...]:
    """``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` parameter numels in
    ``parameters()`` (registration) order: model.embed_tokens V*H; per decoder layer
    self_attn.q_proj a*d*H (+a*d), k_proj and v_proj kv*d*H (+kv*d each), o_proj H*a*d (+H),
    mlp.gate_proj, up_proj I*H (+I each), down_proj H*I (+H), input_layernorm H,
    post_attention_layernorm H (RMSNorm: weight only); model.norm H; lm_head V*H unless tied
    (``tie_word_embeddings``; no bias). a heads, kv key/value heads, d head_dim."""
    f = llama_family_fields(cfg)
    h, inter, vocab = f["hidden_size"], f["intermediate_size"], f["vocab_size"]
    a, kv, d = f["num_attention_heads"], f["num_key_value_heads"], f["head_dim"]
    qkv_bias, o_bias, mlp_bias = _llama_biases(f)
    layer: list[int] = []
    for out in (a * d, kv * d, kv * d):  # q_proj, k_proj, v_proj (nn.Linear weight is (out, in))
        layer += [out * h] + ([out] if qkv_bias else [])
    layer += [h * a * d] + ([h] if o_bias else [])  # o_proj
    for out, inp in ((inter, h), (inter, h), (h, inter)):  # gate_proj, up_proj, down_proj
        layer += [out * inp] + ([out] if mlp_bias else [])
    layer += [h, h]  # input_layernorm, post_attention_layernorm
    numels = [vocab * h] + layer * f["num_hidden_layers"] + [h]
    if not f["tie_word_embeddings"]:
        numels.append(vocab * h)
    return tuple(numels)


def llama_fetch_modules(cfg: dict[str, Any]) -> tuple[tuple[int, ...], ...]:
    """The parameter-holding modules in forward call order (LlamaModel.forward: embed_tokens,
    then per LlamaDecoderLayer input_layernorm, self_attn.q_proj, k_proj, v_proj, o_proj,
    post_attention_layernorm, mlp.gate_proj, up_proj (``down_proj(act_fn(gate_proj(x)) *
    up_proj(x))``), down_proj; then norm and lm_head), as indices into :func:`llama_param_numels`.
    A tied lm_head is embed_tokens' weight (index 0)."""
    f = llama_family_fields(cfg)
    qkv_bias, o_bias, mlp_bias = _llama_biases(f)
    sizes = [1 + qkv_bias] * 3 + [1 + o_bias] + [1 + mlp_bias] * 3 + [1, 1]  # per layer, param order
    per_layer = sum(sizes)
    modules: list[tuple[int, ...]] = [(0,)]
    for layer in range(f["num_hidden_layers"]):
        start, own = 1 + layer * per_layer, []
        for n in sizes:
            own.append(tuple(range(start, start + n)))
            start += n
        q, k, v, o, gate, up, down, ln_in, ln_post = own
        modules += [ln_in, q, k, v, o, ln_post, gate, up, down]
    norm = 1 + f["num_hidden_layers"] * per_layer
    modules.append((norm,))
    modules.append((0,) if f["tie_word_embeddings"] else (norm + 1,))
    return tuple(modules)


def model_shape(cfg: dict[str, Any] | None = None, n_params: int | None = None) -> ModelShape:
    """The shape of a model from its HF config dict, or a bare parameter count (memoised: the
    planner asks for the same model thousands of times)."""
    key = json.dumps(cfg, sort_keys=True, default=str) if cfg is not None else None
    return _model_shape_cached(key, n_params)


@functools.lru_cache(maxsize=128)
def _model_shape_cached(cfg_json: str | None, n_params: int | None) -> ModelShape:
    cfg = json.loads(cfg_json) if cfg_json is not None else None
    if cfg is None:
        if n_params is None or n_params <= 0:
            raise MemprofError("no model: pass --model PRESET, --model-config PATH or --params N")
        # A bare count: one flat tensor. Padding and partition boundaries are then per the whole model.
        return ModelShape(param_numels=(int(n_params),))
    model_type = cfg.get("model_type")
    if model_type == "gpt2":
        h = _req(cfg, "n_embd")
        n_head = _req(cfg, "n_head")
        if h % n_head:
            raise MemprofError(f"model config: n_embd {h} is not divisible by n_head {n_head}")
        return ModelShape(
            param_numels=gpt2_param_numels(cfg),
            model_type="gpt2",
            n_layer=_req(cfg, "n_layer"),
            hidden=h,
            n_head=n_head,
            inner=int(cfg.get("n_inner") or 4 * h),
            vocab=_req(cfg, "vocab_size"),
            n_positions=_req(cfg, "n_positions"),
            tied_embeddings=cfg.get("tie_word_embeddings", True) is not False,
            dropout={k: float(cfg.get(k, 0.1)) for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop")},
            use_cache=cfg.get("use_cache", True) is not False,  # GPT2Config's default is True
            fetch_modules=gpt2_fetch_modules(cfg),
        )
    if model_type in LLAMA_FAMILY:
        f = llama_family_fields(cfg)
        return ModelShape(
            param_numels=llama_param_numels(cfg),
            model_type=model_type,
            n_layer=f["num_hidden_layers"],
            hidden=f["hidden_size"],
            n_head=f["num_attention_heads"],
            inner=f["intermediate_size"],
            vocab=f["vocab_size"],
            n_positions=f["max_position_embeddings"],
            tied_embeddings=bool(f["tie_word_embeddings"]),
            dropout={"attention_dropout": float(f.get("attention_dropout") or 0.0)},
            use_cache=f.get("use_cache", True) is not False,
            fetch_modules=llama_fetch_modules(cfg),
            n_kv_head=f["num_key_value_heads"],
            head_dim=f["head_dim"],
            buffer_numel=2 * (f["head_dim"] // 2),  # LlamaRotaryEmbedding: inv_freq, original_inv_freq
            mlp_bias=_llama_biases(f)[2],
            hidden_act=str(f.get("hidden_act", "silu")),
            sliding_window=_sliding_window(f),
        )
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


def _req(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if not is_positive_int(value):
        raise MemprofError(f"model config: {key} = {value!r} must be a positive whole number")
    return value
