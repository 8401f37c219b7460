"""Labels by region: the code that allocates a CPU storage names it, at allocation time.

An ownership walk names what an engine *holds* at the moment it runs. Tensors born and freed
between two walks (the fp32 gradient partition ZeRO flattens inside ``step()``, the optimizer's
foreach temporaries) are never held where a walk looks: without a name given when they are
allocated they would keep the phase's default label (``other`` in the step). So the profiler
marks the regions of code that make them, and a CPU tracker labels each new storage with the
label of the innermost region open (``tracker.new_label``, saved and restored: a label switch
per region, never Python work per allocation).

Regions installed on the objects the ownership walk already knows (removed when the profiler
exits; never on a class):

* every inner torch optimizer (``plain_torch.inner_torch_optimizers``): its ``step``, through
  torch's own ``register_step_pre_hook`` / ``register_step_post_hook``, is ``optimizer_state``:
  the working memory of the update (foreach / for-loop temporaries) and the state it creates; on
  the host when the walk places what it updates there (an offloaded optimizer steps on the CPU);
* a DeepSpeed optimizer wrapper (ZeRO-1/2, ZeRO-3, BF16_Optimizer, FP16 optimizers): its own
  ``step`` (an attribute set on the INSTANCE) is ``grads``: what it does around the inner step is
  gradient work (flatten the gradient partition, cast it to fp32, take the norm, unscale and clip:
  deepspeed/runtime/zero/stage_1_and_2.py step() 3013-3170, stage3.py step() 2873-2931 with
  _prepare_fp32_grad_for_sub_group, bf16_optimizer.py step(), fp16/fused_optimizer.py step());
  its inner step is ``optimizer_state`` as above. The all-gather of the updated partitions
  (all_gather_dp_groups) gathers into the flat parameter buffers (params) and its staging is the
  collective's own, which the allocator hook does not count (native/allocation_hook.cpp).
* a DeepSpeed engine (any object with the methods below, set on the INSTANCE):
  ``buffered_allreduce_fallback`` is ``comm_buffers``. It is how the engine all-reduces whole
  gradients where no ZeRO optimizer partitions them (stage 0, BF16_Optimizer: runtime/engine.py
  allreduce_gradients 3073-3096, called from _backward_epilogue 3165 in backward, or from step()
  3603 without managed accumulation): allreduce_no_retain (3828) gathers gradients of one dtype
  until their elements exceed ``elements_per_buffer`` (MEMORY_OPT_ALLREDUCE_SIZE, 5e8, :151) and
  allreduce_bucket (3795) flattens them into one new buffer (and a cast copy when
  ``communication_data_type`` differs), all-reduces it and copies it back: a reduce bucket, the
  estimator's ``comm_buffers`` at the backward peak too (estimate/layout/deepspeed_zero.py
  ``_stage0``: ``C: min(total, 500_000_000) * e``). ``clip_fp32_gradients`` (3502, stage 0 fp32
  with ``gradient_clipping``: runtime/utils.py clip_grad_norm_) is ``grads``: its norms are
  gradient processing, as a ZeRO wrapper's step's are.
* torch's gradient clipping, while the profiler is active: ``torch.nn.utils.clip_grad_norm_``
  calls ``_get_total_norm`` and ``_clip_grads_with_norm_`` (torch/nn/utils/clip_grad.py), looked up
  as module globals at each call, so replacing those two names catches every caller however it
  imported ``clip_grad_norm_``; accelerate's ``Accelerator.clip_grad_norm_`` imports the public
  aliases ``get_total_norm`` / ``clip_grads_with_norm_`` from torch.nn.utils at its call
  (``_clip_grad_norm_dtensor_aware``), replaced too. Their temporaries (one norm per gradient, the
  stacked norms, the total, the clip coefficient) are ``grads``: the working memory of gradient
  processing, as the estimator counts a ZeRO step's norm copies (deepspeed_zero.py
  ``norm = {G: ...}``); it models none of torch's (a few bytes per tensor). No object the walk
  knows is called there (clip_grad_norm_ reaches the gradients through ``p.grad``), so these are
  module attributes, restored when the profiler exits. HF Trainer and accelerate clip between
  ``backward`` and ``step`` (memprof.integrations), outside every phase; a plain loop clips inside
  one.

Storages still alive at the phase end are then relabelled from the ownership walk as before, so
a region's label only decides the bytes nobody holds: a transient's.

On CUDA there is no label per block: :class:`PeakRegions` takes the same regions as allocator
counters read at each region's start and end, and names the bytes the regions had added when the
phase peaked inside one (CudaBackend).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from memprof.measure.dispatch_tracker import label_of
from memprof.measure.ownership.deepspeed import OPTIMIZER_WALKS
from memprof.measure.ownership.plain_torch import InputBatches, inner_torch_optimizers, input_batches_of, set_input_batches

DEVICE_GRADS = label_of("device", "grads")
DEVICE_COMM_BUFFERS = label_of("device", "comm_buffers")
DEVICE_OPTIMIZER_STATE = label_of("device", "optimizer_state")
HOST_OPTIMIZER_STATE = label_of("host", "optimizer_state")


class LabelStack:
    """Nested label regions on a tracker: ``push`` saves ``tracker.new_label`` and sets a new one,
    ``pop`` restores it. ``clear`` forgets regions a raised exception left open (a phase start)."""

    def __init__(self, tracker: Any) -> None:
        self._tracker = tracker
        self._saved: list[int] = []

    def push(self, label: int) -> None:
        self._saved.append(self._tracker.new_label)
        self._tracker.new_label = label

    def pop(self) -> None:
        if self._saved:
            self._tracker.new_label = self._saved.pop()

    def pop_to(self, depth: int) -> None:
        """Close the regions opened since ``depth``, an inner one an exception left open too."""
        while len(self._saved) > depth:
            self.pop()

    def clear(self) -> None:
        self._saved.clear()

    @property
    def depth(self) -> int:
        return len(self._saved)


class PeakRegions:
    """The same regions on CUDA, where the caching allocator gives counters, not a label per block:
    which region the phase's peak was reached in, and how many bytes each open region had added
    (net) by then. ``push`` and ``pop`` read ``allocated_and_peak()`` (allocated now, the phase's
    peak so far). When a region ends with the phase's peak raised inside it, the bytes above its
    start are its own and those between an enclosing region's start and the next inner start are
    the enclosing one's (``layers``, innermost first): net growth, so a block allocated and freed
    inside a region before the peak counts nowhere, and a region's bytes freed before the peak but
    after an inner region started are still counted to it (an approximation; see docs/profiler.md)."""

    def __init__(self, allocated_and_peak: Callable[[], tuple[int, int]]) -> None:
        self._read = allocated_and_peak
        self._open: list[tuple[int, int, int]] = []  # (label, allocated at start, peak at start)
        self.peak = -1  # the peak the layers are of; -1: none reached inside a region this phase
        self.layers: dict[int, int] = {}

    def push(self, label: int) -> None:
        allocated, peak = self._read()
        self._open.append((label, allocated, peak))

    def pop(self) -> None:
        if not self._open:
            return
        _, _, peak_at_start = self._open[-1]
        _, peak = self._read()
        if peak > peak_at_start and peak > self.peak:
            layers: dict[int, int] = {}
            upper = peak
            for label, allocated_at_start, _ in reversed(self._open):
                layers[label] = layers.get(label, 0) + max(0, upper - allocated_at_start)
                upper = min(upper, allocated_at_start)
            self.layers, self.peak = layers, peak
        self._open.pop()

    def pop_to(self, depth: int) -> None:
        while len(self._open) > depth:
            self.pop()

    @property
    def depth(self) -> int:
        return len(self._open)

    def clear(self) -> None:
        """A phase starts (or ended): no region open, no peak recorded."""
        self._open.clear()
        self.peak, self.layers = -1, {}


Remover = Callable[[], None]


def _is_deepspeed_wrapper(optimizer: Any) -> bool:
    return any(matches(optimizer) for matches, _ in OPTIMIZER_WALKS)


Regions = LabelStack | PeakRegions


def _updates_host_tensors(opt: torch.optim.Optimizer, owned: Mapping[tuple[str, int], Any]) -> bool:
    """Whether the walk placed what ``opt`` updates on the host (ZeRO's offload_optimizer, FSDP2's
    CPUOffloadPolicy): its step then runs on the CPU and its working memory is host memory."""
    for group in getattr(opt, "param_groups", None) or []:
        for p in group.get("params", []) if isinstance(group, dict) else []:
            local = getattr(p, "_local_tensor", None)
            t = local if isinstance(local, torch.Tensor) else p
            try:
                found = owned.get(("cpu" if t.is_cpu else str(t.device), t.untyped_storage().data_ptr()))
            except RuntimeError:
                continue
            if found is not None:
                return found.location == "host"
    return False


def _label_torch_optimizer(opt: torch.optim.Optimizer, stack: Regions, label: int) -> Remover:
    """``opt.step`` as an ``optimizer_state`` region (``label``: on the device, or on the host for
    an offloaded optimizer), by torch's per-instance step hooks."""

    def pre(_opt: Any, _args: Any, _kwargs: Any) -> None:
        stack.push(label)

    def post(_opt: Any, _args: Any, _kwargs: Any) -> None:
        stack.pop()

    handles = [opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)]

    def remove() -> None:
        for h in handles:
            h.remove()

    return remove


def _labelled(function: Callable[..., Any], stack: Regions, label: int) -> Callable[..., Any]:
    """``function`` run as a ``label`` region: one push and one pop per call."""

    @functools.wraps(function)
    def labelled(*args: Any, **kwargs: Any) -> Any:
        depth = stack.depth
        stack.push(label)
        try:
            return function(*args, **kwargs)
        finally:
            stack.pop_to(depth)  # also an inner region (an optimizer's) that raised before its post hook

    return labelled


def _label_method(obj: Any, name: str, stack: Regions, label: int) -> Remover:
    """``obj.<name>`` (replaced on the INSTANCE, never its class) as a ``label`` region."""
    had_own = name in vars(obj)
    previous = vars(obj).get(name)
    labelled = _labelled(getattr(obj, name), stack, label)
    setattr(obj, name, labelled)

    def remove() -> None:
        if vars(obj).get(name) is labelled:
            if had_own:
                setattr(obj, name, previous)
            else:
                delattr(obj, name)

    return remove


def _label_wrapper_step(wrapper: Any, stack: Regions) -> Remover:
    """A DeepSpeed wrapper's ``step`` (set on the instance) as a ``grads`` region."""
    return _label_method(wrapper, "step", stack, DEVICE_GRADS)


# (method of a DeepSpeed engine, its label): see the module docstring
_ENGINE_REGIONS = (("buffered_allreduce_fallback", DEVICE_COMM_BUFFERS), ("clip_fp32_gradients", DEVICE_GRADS))


def _label_engine(engine: Any, stack: Regions) -> list[Remover]:
    return [_label_method(engine, name, stack, label) for name, label in _ENGINE_REGIONS
            if callable(getattr(engine, name, None))]


def _torch_clip_functions() -> list[tuple[Any, str]]:
    """(module, name) of the functions torch's gradient clipping runs through (module docstring):
    the helpers clip_grad_norm_ calls (torch >= 2.6), or clip_grad_norm_ itself before them."""
    from torch.nn.utils import clip_grad

    if hasattr(clip_grad, "_get_total_norm") and hasattr(clip_grad, "_clip_grads_with_norm_"):
        names = [(clip_grad, "_get_total_norm"), (clip_grad, "_clip_grads_with_norm_")]
        public = ("get_total_norm", "clip_grads_with_norm_")
    else:
        names, public = [(clip_grad, "clip_grad_norm_")], ("clip_grad_norm_",)
    return names + [(torch.nn.utils, n) for n in public if callable(getattr(torch.nn.utils, n, None))]


def _label_torch_clipping(stack: Regions) -> Remover:
    """torch's gradient clipping helpers as ``grads`` regions, while the profiler is active."""
    replaced: list[tuple[Any, str, Any, Any]] = []
    for module, name in _torch_clip_functions():
        original = getattr(module, name)
        labelled = _labelled(original, stack, DEVICE_GRADS)
        setattr(module, name, labelled)
        replaced.append((module, name, original, labelled))

    def remove() -> None:
        for module, name, original, labelled in reversed(replaced):
            if getattr(module, name, None) is labelled:  # another profiler's, installed later, stays
                setattr(module, name, original)

    return remove


def install_regions(stack: Regions, engine: Any = None, optimizer: Any = None,
                    owner_walk: Callable[[], Mapping[tuple[str, int], Any]] | None = None,
                    model: torch.nn.Module | None = None) -> Remover:
    """Mark the regions above on ``optimizer`` (else ``engine.optimizer``), ``engine`` and torch's
    gradient clipping, and record the input batches of ``model`` (else ``engine.module``: the
    data-loader section below); returns the function that removes them all. ``owner_walk`` (the
    profiler's) says which optimizers are offloaded."""
    if optimizer is None and engine is not None:
        optimizer = getattr(engine, "optimizer", None)
    if model is None and engine is not None:
        model = getattr(engine, "module", None)
    removers: list[Remover] = [_label_torch_clipping(stack)]
    if isinstance(model, torch.nn.Module):
        removers.append(install_input_batches(model))
    if engine is not None:
        removers += _label_engine(engine, stack)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and _is_deepspeed_wrapper(optimizer):
        removers.append(_label_wrapper_step(optimizer, stack))
    inner = inner_torch_optimizers(optimizer)
    owned = owner_walk() if owner_walk is not None and inner else {}
    for opt in inner:
        label = HOST_OPTIMIZER_STATE if _updates_host_tensors(opt, owned) else DEVICE_OPTIMIZER_STATE
        removers.append(_label_torch_optimizer(opt, stack, label))

    def remove_all() -> None:
        for remove in reversed(removers):
            remove()
        stack.clear()

    return remove_all


# ---- the data loader: the training loop's input batches -------------------------------------------
# Not a label region: a batch is fetched outside every phase, and a step's start turns whatever
# unowned ``activations`` are left into ``other`` (backends.CpuBackend.begin_step), which a label
# given at allocation would not survive. The tensors of each batch are recorded instead
# (ownership.plain_torch.InputBatches), and every ownership walk names those alive ``activations``
# (one record per batch, never per allocation). Two places see the batches:
#
# * the data loaders: torch's ``_BaseDataLoaderIter.__next__`` (torch/utils/data/dataloader.py; every
#   DataLoader's iterator, single- or multi-process, after collate_fn and pin_memory: the batch the
#   loop receives; its subclasses do not override it) and, when accelerate is imported, the
#   ``send_to_device`` that ``accelerate.data_loader`` calls by its module global (DataLoaderShard
#   .__iter__ moves each batch to the device one batch ahead, DataLoaderDispatcher after
#   broadcasting it): on an accelerator that copy is a new tensor. Both are replaced while a
#   profiler runs or a front end records ahead of it (a torch class's attribute and a module's, as
#   torch's clipping above; restored when the last one is removed);
# * the profiled root module: a forward pre-hook (``with_kwargs``) records its inputs, what the loop
#   made outside a data loader (a script's own tensors, the Trainer's ``_prepare_inputs`` device
#   copies, TRL DPO's concatenated chosen + rejected rows).
_BATCH_RECORDERS: list[InputBatches] = []  # one entry per install_input_batches not yet removed
_DATA_LOADER_PATCHES: list[tuple[Any, str, Any, Any]] = []  # (owner, name, original, replacement)


def _record_batch(batch: Any) -> Any:
    for batches in _BATCH_RECORDERS:  # one record may come twice (install_input_batches): it keeps each tensor once
        batches.record(batch)
    return batch


def _data_loader_functions() -> list[tuple[Any, str]]:
    """(owner, name) of the functions that return a loop's batches (see above)."""
    import sys

    from torch.utils.data import dataloader

    found: list[tuple[Any, str]] = [(dataloader._BaseDataLoaderIter, "__next__")]
    accelerate_loader = sys.modules.get("accelerate.data_loader")
    if accelerate_loader is not None and callable(getattr(accelerate_loader, "send_to_device", None)):
        found.append((accelerate_loader, "send_to_device"))
    return found


def _patch_data_loaders() -> None:
    for owner, name in _data_loader_functions():
        original = getattr(owner, name)

        @functools.wraps(original)
        def recording(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
            return _record_batch(_original(*args, **kwargs))

        setattr(owner, name, recording)
        _DATA_LOADER_PATCHES.append((owner, name, original, recording))


def _unpatch_data_loaders() -> None:
    while _DATA_LOADER_PATCHES:
        owner, name, original, recording = _DATA_LOADER_PATCHES.pop()
        if getattr(owner, name, None) is recording:  # someone else's, installed later, stays
            setattr(owner, name, original)


def install_input_batches(module: torch.nn.Module) -> Remover:
    """Record the batches fed to ``module`` (the profiled root module) for the ownership walk,
    until the returned function is called. A record already installed for ``module`` is kept and
    added to: a front end that starts its profiler lazily (memprof.integrations.recorder, at the
    first training forward) installs one first, so the batches fetched before that forward (the
    first optimizer step's, under the Trainer) are in it."""
    batches = input_batches_of(module)
    if batches is None:
        batches = InputBatches()
        set_input_batches(module, batches)
    if not _BATCH_RECORDERS:
        _patch_data_loaders()
    _BATCH_RECORDERS.append(batches)

    def pre_hook(_module: Any, args: Any, kwargs: Any) -> None:
        batches.record(args)
        batches.record(kwargs)

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def remove() -> None:
        handle.remove()
        if batches in _BATCH_RECORDERS:
            _BATCH_RECORDERS.remove(batches)
        if not _BATCH_RECORDERS:
            _unpatch_data_loaders()
        if batches not in _BATCH_RECORDERS and input_batches_of(module) is batches:  # the last install of it
            set_input_batches(module, None)

    return remove
