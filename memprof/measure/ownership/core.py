"""What every ownership walk shares: the ``Owned`` record, storage keys, the collector applying the
attribution contract, and the breakdown of a walk's result.

Rules (the shared attribution contract, see docs/ownership.md):

* A storage is counted once, keyed on ``(device, untyped_storage().data_ptr())``, with the storage's
  full ``nbytes`` (so the padding of DeepSpeed's flat buffers is included once).
* A storage claimed by two categories goes to the first of ``params, master_params,
  optimizer_state, grads, comm_buffers`` (e.g. ZeRO-3 without a separate fp32 copy).
* Location is decided by ownership on a CPU-only run (every tensor is on the CPU there; states that
  DeepSpeed offloads are ``host``, the compute copy is ``device``). On an accelerator run the tensor's
  device decides: a CPU tensor is ``host``, anything else ``device``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch

from memprof.categories import Breakdown, Category, Location, empty_breakdown
from memprof.errors import MemprofError

# A storage owned by two categories counts in the first of this order (shared contract).
_PRIORITY: dict[str, int] = {
    Category.PARAMS.value: 0,
    Category.MASTER_PARAMS.value: 1,
    Category.OPTIMIZER_STATE.value: 2,
    Category.GRADS.value: 3,
    Category.COMM_BUFFERS.value: 4,
    Category.ACTIVATIONS.value: 5,
}

PARAMS = Category.PARAMS.value
MASTER = Category.MASTER_PARAMS.value
OPT_STATE = Category.OPTIMIZER_STATE.value
GRADS = Category.GRADS.value
COMM = Category.COMM_BUFFERS.value
ACT = Category.ACTIVATIONS.value


class Owned(NamedTuple):
    """One storage's owner: its category, where it lives, its size and who holds it."""

    category: str  # a memprof.categories.Category value
    location: str  # "device" or "host"
    nbytes: int  # the untyped storage's nbytes
    owner: str = ""
    """Who holds it, in words bounded by the model's structure: a parameter's qualified name
    ("transformer.h.0.attn.c_attn.weight"), its gradient ("... .grad"), its optimizer state
    ("exp_avg of ..."), or an engine's grouped buffer ("bit16 flat params, group 0", "ipg reduce
    bucket torch.bfloat16 #0"). "" where the walk gives none (read as :data:`UNNAMED`)."""


UNNAMED = "(unnamed)"
"""The owner of bytes no walk named: an owned storage given no name, or, at a phase peak, bytes of a
model-state category that no named storage accounts for (a transient labelled by the code region
that made it, memprof.measure.regions; a storage named only after it was freed)."""


StorageKey = tuple[str, int]


class Placement(NamedTuple):
    """Where an engine keeps the states the torch optimizer inside it updates (its walk's answer)."""

    offloaded_by_id: dict[int, bool]  # id(master partition) -> offloaded, where it differs per tensor
    default_offloaded: bool  # every other master partition and its optimizer state


def storage_key(t: torch.Tensor) -> StorageKey:
    """The identity of a tensor's underlying storage: views of one storage share it."""
    return (str(t.device), t.untyped_storage().data_ptr())


def iter_tensors(obj: Any, depth: int = 3) -> Iterator[torch.Tensor]:
    """Tensors held in ``obj``: a tensor, or lists/tuples/dict values of them, a few levels deep.

    ``None`` entries are skipped (DeepSpeed keeps ``None`` in lists for freed or swapped buffers).
    An object with a ``flat_partition`` tensor (stage 1/2 ``GradPartitionBufferGroup``, a list of
    views of that flat buffer) yields the flat buffer too.
    """
    if obj is None or depth < 0:
        return
    if isinstance(obj, torch.Tensor):
        # a DTensor (FSDP2's sharded params, their grads and optimizer state) has no storage of
        # its own: its rank-local tensor does (torch DTensor._local_tensor, DTensor.to_local())
        local = getattr(obj, "_local_tensor", None)
        yield local if isinstance(local, torch.Tensor) else obj
        return
    flat = getattr(obj, "flat_partition", None)
    if isinstance(flat, torch.Tensor):
        yield flat
    if isinstance(obj, dict):
        items: Iterable[Any] = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    else:
        return
    for item in items:
        yield from iter_tensors(item, depth - 1)


def _data_ptr(t: torch.Tensor, storage: torch.UntypedStorage) -> int:
    """The storage's address, or a one-line MemprofError naming a tensor type with no real storage
    (a wrapper subclass memprof does not know: its ``data_ptr`` raises)."""
    try:
        return storage.data_ptr()
    except RuntimeError:
        raise MemprofError(f"memprof cannot attribute a {type(t).__module__}.{type(t).__name__} tensor (no storage of "
                           "its own): its sharding or wrapping is not one memprof models") from None


# Owned(...) without the keyword handling of a NamedTuple's __new__ (a walk makes hundreds)
_new_owned = tuple.__new__
_DEVICE = Location.DEVICE.value
_HOST = Location.HOST.value


def grad_of(name: str) -> str:
    """The owner name of the gradient of what ``name`` names."""
    return f".grad of {name}"


class Collector:
    """Accumulates ``storage key -> Owned``, applying the dedup and priority rules.

    It runs at every phase end, so :meth:`add_tensor` is written for speed (a few hundred tensors
    per walk): no generator for a lone tensor, the device read through ``is_meta`` / ``is_cpu``
    (no ``torch.device`` object) where that says the same.
    """

    def __init__(self, compute_on_cpu: bool) -> None:
        self.compute_on_cpu = compute_on_cpu
        self.owned: dict[StorageKey, Owned] = {}
        # id(tensor) -> its owner name, for the tensors an optimizer updates (model parameters,
        # master partitions): their optimizer state is named after them ("exp_avg of <name>")
        self.names: dict[int, str] = {}
        # ids of the model parameters walked, with their gradients (plain_torch.walk_module), so
        # that an optimizer's param_groups do not offer them again (the offer could only lose)
        self.model_params: set[int] = set()
        # storages claimed with :meth:`claim`: their category wins over the priority order
        self.final: set[StorageKey] = set()

    def add(self, obj: Any, category: str, offloaded: bool = False, owner: str = "") -> None:
        """Every tensor in ``obj`` (a tensor, or containers of them: :func:`iter_tensors`), held by
        ``owner`` (:attr:`Owned.owner`)."""
        if obj is None:
            return
        if isinstance(obj, torch.Tensor):
            self.add_tensor(obj, category, offloaded, owner)
            return
        for t in iter_tensors(obj):
            self.add_tensor(t, category, offloaded, owner)

    def add_each(self, obj: Any, category: str, owner: str, offloaded: bool = False) -> None:
        """Each item of a list (or dict) ``obj`` with its own owner, ``owner`` formatted with its
        index (or key): an engine's per-group buffers ("fp32 partition, group {}")."""
        if obj is None:
            return
        if not isinstance(obj, (dict, list, tuple)):  # one tensor, or one GradPartitionBufferGroup
            self.add(obj, category, offloaded, owner.format(0))
            return
        for i, item in (obj.items() if isinstance(obj, dict) else enumerate(obj)):
            self.add(item, category, offloaded, owner.format(i))

    def add_tensor(self, t: torch.Tensor, category: str, offloaded: bool = False, owner: str = "") -> None:
        """One tensor's storage, owned by ``category`` and held by ``owner``; ``offloaded``: whether
        its owner keeps it offloaded (decides the location on a CPU-only run)."""
        priority = _PRIORITY[category]
        # a DTensor (FSDP2's sharded params, their grads and optimizer state) has no storage of
        # its own: its rank-local tensor does (torch DTensor._local_tensor, DTensor.to_local())
        local = getattr(t, "_local_tensor", None)
        if isinstance(local, torch.Tensor):
            t = local
        if t.is_meta:
            return
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes == 0:  # freed ZeRO-3 params are torch.empty(0): nothing resident
            return
        on_cpu = t.is_cpu
        key = ("cpu" if on_cpu else str(t.device), _data_ptr(t, storage))
        held = self.owned.get(key)
        if held is not None and (_PRIORITY[held[0]] <= priority or key in self.final):
            if owner and not held[3] and held[0] == category:
                # claimed first without a name (a wrapper's list of the model's own params): the
                # module walk's name for it
                self.owned[key] = held._replace(owner=owner)
            return
        if self.compute_on_cpu:
            # Every tensor is on the CPU: only ownership (is this state offloaded?) tells them apart.
            on_cpu = offloaded
        self.owned[key] = _new_owned(Owned, (category, _HOST if on_cpu else _DEVICE, nbytes, owner))

    def claim(self, obj: Any, category: str, offloaded: bool = False, owner: str = "") -> None:
        """Every tensor in ``obj`` owned by ``category`` whatever else offers its storage later or
        earlier: a reduce bucket whose slices are, for a while, parameters' ``.grad`` views (ZeRO-2
        contiguous_gradients, stage_1_and_2.py reduce_independent_p_g_buckets_and_remove_grads)
        holds gradients waiting to be reduced: it is the bucket, comm_buffers, as the estimator
        counts it, not grads."""
        for t in ([obj] if isinstance(obj, torch.Tensor) else iter_tensors(obj)):
            local = getattr(t, "_local_tensor", None)
            t = local if isinstance(local, torch.Tensor) else t
            if t.is_meta or t.untyped_storage().nbytes() == 0:
                continue
            key = ("cpu" if t.is_cpu else str(t.device), _data_ptr(t, t.untyped_storage()))
            self.owned.pop(key, None)
            self.final.discard(key)
            self.add_tensor(t, category, offloaded, owner)
            self.final.add(key)

    def add_masters(self, obj: Any, owner: str, offloaded: bool = False) -> None:
        """Master partitions (a list per group, ``owner`` formatted with the group's index) and
        their ``.grad``; each is remembered in :attr:`names`, so its optimizer state is named after it."""
        for i, item in (enumerate(obj) if isinstance(obj, (list, tuple)) else [(0, obj)] if obj is not None else []):
            name = owner.format(i)
            for t in iter_tensors(item):
                self.names[id(t)] = name
                self.add_tensor(t, MASTER, offloaded, name)
                self.add(t.grad, GRADS, offloaded, grad_of(name))

    def add_grad_of(self, obj: Any, offloaded: bool = False) -> None:
        """The ``.grad`` of every tensor in ``obj`` (e.g. of the fp32 master partitions)."""
        for t in iter_tensors(obj):
            name = self.names.get(id(t))
            self.add(t.grad, GRADS, offloaded, grad_of(name) if name else "")


def owner_breakdown(owned: dict[StorageKey, Owned]) -> dict[str, dict[str, dict[str, int]]]:
    """Bytes per location, category and owner (:data:`UNNAMED` for a storage given no owner)."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for item in owned.values():
        by_owner = out.setdefault(item.location, {}).setdefault(item.category, {})
        name = item.owner or UNNAMED
        by_owner[name] = by_owner.get(name, 0) + int(item.nbytes)
    return out


def owned_breakdown(owned: dict[StorageKey, Owned]) -> Breakdown:
    """Bytes per location and category, every location and category present."""
    out = empty_breakdown()
    for item in owned.values():
        out[item.location][item.category] += int(item.nbytes)
    return out
