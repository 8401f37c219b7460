"""torch DDP's gradient buckets: held by its C++ ``Reducer``, so named from DDP's own record of their
sizes (the model and optimizer of a DDP run are walked as plain torch, ``plain_torch.py``)."""

from __future__ import annotations

from typing import Any

from memprof.measure.ownership.core import COMM, Owned, StorageKey


class DdpBuckets:
    """torch DDP's gradient buckets, which no walk of Python objects reaches.

    ``DistributedDataParallel`` (torch/nn/parallel/distributed.py) hands its parameters to a C++
    ``Reducer``, which allocates one flat bucket tensor per bucket when DDP is built (and again
    when ``_pre_forward`` rebuilds them after the first iteration, unless ``find_unused_parameters``
    or ``static_graph``); with ``gradient_as_bucket_view=False`` (the default, and HF Trainer's /
    accelerate's) every gradient is copied into its bucket for the all-reduce, so the buckets hold
    one element per trainable parameter for the run. Only C++ holds them, so an allocation tracker
    started after DDP was built never sees them, and an ownership walk cannot find them.

    :meth:`owned` names them as ``comm_buffers`` under keys no storage has (negative pointers), so
    the profiler counts them from their size as alive throughout (its "owned but untracked" rule),
    sized from DDP's own record (``_get_ddp_logging_data()["bucket_sizes"]``, bytes per bucket).
    Built when tracking starts; if DDP rebuilds its buckets later, the tracker sees the new ones
    being allocated (as ``activations``, then ``other``) and they are no longer named here.
    ``gradient_as_bucket_view=True`` makes the gradients views of the buckets, which the walk finds
    as ``grads`` while they exist: nothing is named here then (docs/integrations.md).
    """

    def __init__(self, ddp: Any) -> None:
        self.ddp = ddp
        self.rebuilt_before_tracking = bool(getattr(ddp, "_has_rebuilt_buckets", False))
        self.gradient_as_bucket_view = bool(getattr(ddp, "gradient_as_bucket_view", False))
        params = [p for p in ddp.parameters() if p.requires_grad]
        self.device = str(params[0].device) if params else "cpu"

    def bucket_bytes(self) -> list[int]:
        """Bytes of each bucket as DDP records them (its rebuilt sizes once rebuilt)."""
        data = self.ddp._get_ddp_logging_data()
        sizes = data.get("rebuilt_bucket_sizes") if data.get("has_rebuilt_buckets") else None
        sizes = sizes or data.get("bucket_sizes") or ""
        return [int(s) for s in str(sizes).replace(",", " ").split() if s.strip().isdigit()]

    def owned(self) -> dict[StorageKey, Owned]:
        if self.gradient_as_bucket_view:
            return {}
        if not self.rebuilt_before_tracking and getattr(self.ddp, "_has_rebuilt_buckets", False):
            return {}  # rebuilt while tracking: the tracker counts the new buckets itself
        return {(self.device, -(i + 1)): Owned(COMM, "device", n, f"DDP gradient bucket {i}")
                for i, n in enumerate(self.bucket_bytes())}
