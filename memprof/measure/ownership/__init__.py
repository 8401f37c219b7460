"""Who owns which tensor storage: a walk over a DeepSpeed engine (or a plain model + optimizer).

The walk reads the real objects an engine keeps (the model, DeepSpeed's ZeRO / BF16 / FP16
optimizer wrappers, the inner torch optimizer) and maps every storage it finds to a memprof
:class:`~memprof.categories.Category` and :class:`~memprof.categories.Location`. It never walks the
garbage collector: it only follows the attributes listed in docs/ownership.md.

One module per engine over a shared core:

* ``core.py``: ``Owned``, ``storage_key``, the collector applying the attribution contract
  (one owner per storage, priority, location), ``owned_breakdown``;
* ``plain_torch.py``: the model's parameters, gradients and buffers and the torch optimizers'
  state (all a plain torch or DDP run holds in Python objects);
* ``deepspeed.py``: DeepSpeed's optimizer wrappers and their detection;
* ``ddp.py``: DDP's gradient buckets, which only its C++ reducer holds;
* ``fsdp2.py``: torch FSDP2 (``fully_shard``): sharded and gathered parameters, gradients, its
  all-gather / reduce-scatter buffers, and the run's FSDP2 record (``fsdp2_record``);
* ``walk.py``: ``owned_storages``, which picks the engine's walk.
"""

from memprof.measure.ownership.core import UNNAMED, Owned, StorageKey, owned_breakdown, owner_breakdown, storage_key
from memprof.measure.ownership.ddp import DdpBuckets
from memprof.measure.ownership.fsdp2 import fsdp2_record, is_fsdp2_model
from memprof.measure.ownership.walk import owned_storages

__all__ = ["UNNAMED", "DdpBuckets", "Owned", "StorageKey", "fsdp2_record", "is_fsdp2_model", "owned_breakdown",
           "owned_storages", "owner_breakdown", "storage_key"]
