"""The one reader of DeepSpeed configs: a JSON file or dict in, one typed, frozen
:class:`DeepSpeedSettings` out (:func:`read_deepspeed_config`). Plain Python: no torch, no
deepspeed import.

Every user reads configs through it: the launcher (``memprof.train.config``, ``strict=True``: what
DeepSpeed itself refuses when handed the file as is), the estimator (``memprof.estimate``, which
passes its flags in: they apply over the config, once) and accelerate YAML
(``memprof.accelerate_config``, through :func:`load_config_file`).

Modules, one question each:

* ``schema``: the vocabularies, :class:`ZeroKnobs`, :class:`AutoValue`, :class:`DeepSpeedSettings`;
* ``files``: a file into a dict (JSON, or the Hjson DeepSpeed also reads);
* ``reader``: :func:`read_deepspeed_config`, the order of reading, ``activation_checkpointing``;
* ``zero_block``: ``zero_optimization`` (``runtime/zero/config.py`` ``DeepSpeedZeroConfig``: its
  defaults, ``stage3_*`` aliases, deprecated ``cpu_offload`` booleans and ``"zero_optimization":
  true``, float sizes; knobs the stage never reads are listed in :attr:`DeepSpeedSettings.ignored`);
* ``precision``: ``fp16`` / ``bf16`` / legacy ``bfloat16`` (``runtime/precision_config.py``) and
  ``data_types.grad_accum_dtype``;
* ``batch``: the batch keys (``runtime/config.py`` ``_set_batch_related_parameters``,
  ``_batch_assertion``) with the caller's micro-batch and accumulation laid over them;
* ``optimizer_block``: ``optimizer`` -> a zoo name (``runtime/engine.py`` ``_configure_basic_optimizer``);
* ``unmodelled``: ZeRO++, MiCS, NVMe / partial offload, pipeline / tensor / sequence parallelism...
  refused with one line naming the feature;
* ``launch``: DeepSpeed's launch-time refusals (the strict mode).

HF-style ``"auto"`` values are resolved as ``transformers/integrations/deepspeed.py``
``HfTrainerDeepSpeedConfig`` does (``trainer_config_process`` / ``trainer_config_finalize``):
micro-batch, gradient accumulation and fp16/bf16 from the caller's values, ``train_batch_size`` =
micro x accumulation x world size, ``reduce_bucket_size`` = hidden², and at ZeRO-3
``stage3_prefetch_bucket_size`` = int(0.9 x hidden²) and ``stage3_param_persistence_threshold`` =
10 x hidden. An "auto" the caller cannot settle stays unresolved (:meth:`DeepSpeedSettings.unresolved`),
with the flag that would settle it.
"""

from memprof.dsconfig.files import load_config_file
from memprof.dsconfig.launch import find_auto, launchable_optimizer_name
from memprof.dsconfig.optimizer_block import config_number, optimizer_name_from_block
from memprof.dsconfig.reader import read_deepspeed_config
from memprof.dsconfig.schema import (
    AUTO,
    DTYPE_SPELLINGS,
    ELEMENT_SIZE,
    OFFLOAD_DEVICES,
    PRECISIONS,
    AutoValue,
    DeepSpeedSettings,
    ZeroKnobs,
)
from memprof.dsconfig.zero_block import offload_devices
from memprof.optimizers import OPTIMIZERS

__all__ = [
    "AUTO",
    "DTYPE_SPELLINGS",
    "ELEMENT_SIZE",
    "OFFLOAD_DEVICES",
    "OPTIMIZERS",
    "PRECISIONS",
    "AutoValue",
    "DeepSpeedSettings",
    "ZeroKnobs",
    "config_number",
    "find_auto",
    "launchable_optimizer_name",
    "load_config_file",
    "offload_devices",
    "optimizer_name_from_block",
    "read_deepspeed_config",
]
