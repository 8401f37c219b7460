"""Parameter shapes and counts of a model, without allocating weights.

GPT-2 is counted in closed form from ``transformers/models/gpt2/modeling_gpt2.py``
(GPT2LMHeadModel: wte, wpe, per block ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj;
ln_f; lm_head tied to wte unless ``tie_word_embeddings`` is false). Other model types are built on
the meta device with ``accelerate.init_empty_weights`` (imported lazily: it pulls in torch).

The order is ``model.parameters()`` order, which is the order DeepSpeed flattens them in, so the
ZeRO partition boundaries computed from it fall where DeepSpeed's do.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from memprof.errors import MemprofError


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

    @functools.cached_property
    def n_params(self) -> int:
        return sum(self.param_numels)

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

    @property
    def n_tensors(self) -> int:
        return len(self.param_numels)

    @functools.cached_property
    def largest_param(self) -> int:
        return max(self.param_numels)

    @property
    def has_transformer_shape(self) -> bool:
        """Whether activations can be computed (a GPT-2 shape is known)."""
        return self.model_type == "gpt2" and self.n_layer is not None


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
        )
    if not isinstance(model_type, str):
        raise MemprofError("model config has no \"model_type\": pass an HF config.json")
    return ModelShape(param_numels=_meta_param_numels(cfg), model_type=model_type)


def _meta_param_numels(cfg: dict[str, Any]) -> tuple[int, ...]:
    """Any HF model type: instantiate on the meta device (no weights allocated) and list parameters."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModel
    except ImportError as e:  # pragma: no cover - both are project dependencies
        raise MemprofError(f"counting a {cfg.get('model_type')} model needs transformers and accelerate: {e}") from None
    kwargs = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")}
    try:
        config = AutoConfig.for_model(cfg["model_type"], **kwargs)
    except (ValueError, KeyError, TypeError) as e:
        raise MemprofError(f"model config: transformers cannot build a {cfg['model_type']!r} config: {e}".splitlines()[0]) from None
    with init_empty_weights():
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:
            model = AutoModel.from_config(config)
    # parameters() yields a tied tensor once, as DeepSpeed sees it
    return tuple(int(p.numel()) for p in model.parameters() if p.requires_grad)


def _req(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise MemprofError(f"model config: {key} = {value!r} must be a positive whole number")
    return value
