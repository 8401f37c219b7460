"""ZeRO-3's forward, replayed: which parameters DeepSpeed 0.19.8's ``PartitionedParameterCoordinator``
(runtime/zero/partitioned_param_coordinator.py) has gathered at each module of a forward with a
complete trace, and what its all-gathers hold beside them. Pure arithmetic over a model's module
call order (``ModelShape.module_order``: every module whose forward hooks fire, parameter-less ones
as empty tuples, since each fetch, with or without parameters, starts a prefetch).

What is replayed, by the coordinator's code:

* ``_fetch_sub_module_impl``: one ``__all_gather_params`` call for the module's own parameters not
  yet gathered or in flight; then, for each of its parameters in ``__inflight_param_registry``, the
  entry is popped and its handle waited; then its queue entries are popped; then one prefetch call
  for the parameters it pops off the queue until ``min(max_live - available, prefetch_bucket)``
  elements not yet available are in it. ``release_sub_module`` after the module's forward releases
  the parameters ``__params_to_release`` allows (not persistent, no later queue entry popped for
  them, no reuse within ``max_reuse_distance`` elements of the trace);
* one call is one all-gather (runtime/zero/partition_parameters.py ``all_gather_coalesced``): a
  single parameter goes ``_all_gather_sequential`` (its gathered data is a view of a buffer of its
  numel rounded up to the world size: no second copy); two or more go ``_all_gather_coalesced`` ->
  ``_all_gather_dtype``: one flat buffer of their partitions x world size, and
  ``AllGatherCoalescedHandle.wait`` gives each parameter its own ``torch.cat`` of its pieces
  (``param.data``), so the flat buffer is a second copy. The registry holds the handle, and with it
  the flat buffer, under every parameter of the call until that parameter's module pops it: a
  prefetched group stays doubled from its first consumer's fetch to its last one's.

Persistent parameters are gathered for good in the steady state (``_post_step`` gathers them after
each optimizer step): never in a call here.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage3Forward:
    """Elements of non-persistent parameters (and all-gather buffers) on a rank during forward."""

    end_gathered: int  # gathered when forward ends (after the last module's release)
    end_buffers: int  # coalesced all-gather buffers (or in-flight single buffers) alive then
    end_numel: int  # the same two in parameters' elements (no rounding to the world size)
    peak_gathered: int  # at the module fetch with the most gathered + buffer elements: gathered,
    peak_buffers: int  # and buffers
    # (gathered, buffers) once each module (by forward position) is fetched, its prefetch issued and
    # its post-forward release done: what holds from then until the next module's fetch, e.g.
    # through an attention core between c_attn and c_proj, or a parameter-less module's forward
    # (GPT-2's mlp.act, GELU) whose own fetch only prefetched; compared to an in-block activation
    # moment (memprof.estimate.core._block_fetch_moments)
    after: tuple[tuple[int, int], ...] = ()

    @property
    def peak(self) -> int:
        return self.peak_gathered + self.peak_buffers


class _Replay:
    def __init__(self, numels: tuple[int, ...], forward: tuple[tuple[int, ...], ...], threshold: int,
                 max_reuse_distance: int, world_size: int) -> None:
        self.numels, self.forward, self.n = numels, forward, max(1, world_size)
        self.trace = forward + forward[::-1]
        self.prefix = [0]
        for module in self.trace:
            self.prefix.append(self.prefix[-1] + sum(numels[i] for i in module))
        self.persistent = {i for i, n in enumerate(numels) if n <= threshold}
        self.max_reuse = max_reuse_distance
        self.queue = [(i, k) for k, module in enumerate(self.trace) for i in sorted(set(module))]
        self.head = 0
        self.uses: dict[int, list[int]] = {}  # param -> the trace positions using it, ascending
        for k, module in enumerate(self.trace):
            for i in set(module):
                self.uses.setdefault(i, []).append(k)
        self.latest = [-1] * len(numels)  # __most_recent_step_id_param_fetched_for
        self.available = 0  # __n_available_params (gathered or in flight)
        self.held: dict[int, int] = {}  # param -> elements its gathered data holds
        self.inflight: set[int] = set()
        self.registry: dict[int, int] = {}  # param -> its call
        self.calls: list[tuple[tuple[int, ...], int, bool]] = []  # (params, flat buffer elements, waited)
        self.registered: list[int] = []  # per call: its params still in the registry
        # running totals (a 560-adapter model fetches ~4,000 modules: no sums per fetch)
        self.held_total = 0
        self.buffer_total = 0  # flat buffers of calls still registered + single in-flight buffers
        self.numel_total = 0  # gathered or in flight, in parameters' elements (one copy each)

    def aligned(self, i: int) -> int:
        return -(-self.numels[i] // self.n) * self.n

    def gather(self, params: list[int]) -> int:
        new = [i for i in params if i not in self.persistent and i not in self.held and i not in self.inflight]
        if not new:
            return 0
        self.available += sum(self.numels[i] for i in new)
        flat = 0 if len(new) == 1 else sum(self.aligned(i) for i in new)
        self.calls.append((tuple(new), flat, False))
        self.registered.append(len(new))
        self.buffer_total += flat if flat else self.aligned(new[0])
        self.numel_total += sum(self.numels[i] for i in new)
        for i in new:
            self.inflight.add(i)
            self.registry[i] = len(self.calls) - 1
        return sum(self.numels[i] for i in new)

    def wait(self, call: int) -> None:
        params, flat, waited = self.calls[call]
        if waited:
            return
        self.calls[call] = (params, flat, True)
        for i in params:
            if i in self.inflight:
                self.inflight.discard(i)
                self.held[i] = self.aligned(i) if flat == 0 else self.numels[i]
                self.held_total += self.held[i]
        if flat == 0:  # a single param's buffer is its data now
            self.buffer_total -= self.aligned(params[0])

    def unregister(self, i: int) -> None:
        call = self.registry.pop(i)
        self.registered[call] -= 1
        if self.registered[call] == 0:
            self.buffer_total -= self.calls[call][1]

    def elements(self) -> tuple[int, int]:
        """(gathered data, buffers): flat buffers of calls still in the registry, and single
        in-flight buffers (their data once waited)."""
        return self.held_total, self.buffer_total

    def reused_soon(self, i: int, pos: int) -> bool:
        # the next use after pos (backward's mirrored half always has one); bisect keeps a
        # 560-adapter LoRA model's replay linear
        reuse = self.uses[i][bisect.bisect_right(self.uses[i], pos)]
        return self.prefix[reuse] - self.prefix[pos + 1] < self.max_reuse

    def pop_own(self, pos: int) -> None:
        """Pop the entries of the modules fetched so far (the current one's)."""
        queue, latest = self.queue, self.latest
        while self.head < len(queue) and queue[self.head][1] <= pos:
            i, k = queue[self.head]
            if k > latest[i]:
                latest[i] = k
            self.head += 1

    def prefetch(self, budget: int) -> list[int]:
        """Pop entries until ``budget`` elements not yet gathered or in flight are picked."""
        queue, latest, numels = self.queue, self.latest, self.numels
        skip = (self.persistent, self.held, self.inflight)
        picked: dict[int, None] = {}
        fetched = 0
        while self.head < len(queue) and fetched < budget:
            i, k = queue[self.head]
            if k > latest[i]:
                latest[i] = k
            self.head += 1
            if i not in picked and not any(i in x for x in skip):
                picked[i] = None
                fetched += numels[i]
        return list(picked)

    def fetch(self, pos: int, module: tuple[int, ...], prefetch_bucket: int, max_live: int) -> tuple[int, int]:
        """One module's fetch; (gathered, buffers) at its widest."""
        waited = self.elements()
        if module:
            own = sorted(set(module))
            self.gather(own)
            for i in own:
                if i in self.registry:
                    self.wait(self.registry[i])
            waited = self.elements()  # the waited copies beside the buffers still registered
            for i in own:
                if i in self.registry:
                    self.unregister(i)
            self.pop_own(pos)
        if prefetch_bucket > 0:
            self.gather(self.prefetch(min(max_live - self.available, prefetch_bucket)))
        after = self.elements()
        return after if sum(after) >= sum(waited) else waited

    def release(self, pos: int, module: tuple[int, ...]) -> None:
        for i in set(module) - self.persistent:
            if i in self.held and self.latest[i] <= pos and not self.reused_soon(i, pos):
                self.held_total -= self.held.pop(i)
                self.available -= self.numels[i]
                self.numel_total -= self.numels[i]


def replay_stage3_forward(numels: tuple[int, ...], forward: tuple[tuple[int, ...], ...], threshold: int,
                          max_reuse_distance: int, prefetch_bucket: int, max_live: int,
                          world_size: int) -> Stage3Forward:
    """The forward of a complete trace (module doc), from the second step on."""
    r = _Replay(numels, forward, threshold, max_reuse_distance, world_size)
    peak = (0, 0)
    after: list[tuple[int, int]] = []
    for pos, module in enumerate(forward):
        peak = max(peak, r.fetch(pos, module, prefetch_bucket, max_live), key=sum)
        r.release(pos, module)
        after.append(r.elements())
    end = r.elements()
    peak = max(peak, end, key=sum)
    return Stage3Forward(end[0], end[1], r.numel_total, peak[0], peak[1], tuple(after))
