"""Model families: one file each (``gpt2.py``, ``llama.py``), listed here.

A family file holds everything memprof knows about that family of HF causal LMs: its HF class
names, config defaults and launcher checks, parameter shapes in DeepSpeed's flatten order, ZeRO-3
fetch order and activation formulas, gathered in one :class:`~memprof.families.common.ModelFamily`
(``FAMILY``). The launcher (memprof.models, memprof.train.model), the estimator (model_shapes,
activations, core) and the CLI ask :func:`family_of` instead of testing ``model_type``.

Adding a family: a preset in ``memprof/models.py``, a family file here, and its line in
:data:`FAMILIES`. Torch-free (the estimator imports it).
"""

from __future__ import annotations

from memprof.families import gpt2, llama
from memprof.families.common import ModelFamily

FAMILIES: tuple[ModelFamily, ...] = (
    gpt2.FAMILY,
    llama.FAMILY,
)

_BY_MODEL_TYPE: dict[str, ModelFamily] = {t: family for family in FAMILIES for t in family.model_types}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BY_MODEL_TYPE)


def family_of(model_type: object) -> ModelFamily | None:
    """The family of an HF ``model_type``, or None for one memprof has no family file for (and for
    a config's malformed or absent value)."""
    return _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
