"""Model states per rank under torch FSDP2 (``fully_shard`` on each transformer block and on the
root module), torch 2.13, derived from torch/distributed/fsdp/_fully_shard/:

* Sharding (``_fsdp_param.py``: ``FSDPParam._init_sharded_param``): every parameter is cut into
  ``world_size`` dim-0 chunks (``_chunk_with_empty`` = ``torch.chunk``: ``ceil(d0 / N)`` rows
  each, the last ones shorter or empty) and each rank keeps its chunk padded to the size of chunk
  0 (``padded_sharded_param_size = chunks[0].size()``): ``ceil(d0 / N) * numel / d0`` elements,
  alike on every rank, in the parameter's own dtype (a ``MixedPrecisionPolicy`` casts only the
  gathered copy: ``init_dtype_attrs``, ``_get_param_all_gather_inputs``).
* Gathering (``_fsdp_collectives.py``: ``foreach_all_gather``, ``foreach_all_gather_copy_out``): a
  group's flat all-gather output holds ``N x`` its padded shards in ``param_dtype``; the copy-out
  fills each parameter's own padded unsharded storage (``FSDPParam.init_all_gather_outputs``,
  ``numel x world_size``). In forward the flat output is kept until the next group's copy-out
  (``FSDPParamGroup.wait_for_unshard``: ``comm_ctx.all_gather_state``), the last one until the root's
  post-forward (``_fsdp_state.py``: ``FSDPState._post_forward``); in backward the next group is
  prefetched (``_backward_prefetch``): its flat output is alive beside the current group.
  ``reshard_after_forward`` False keeps every block gathered from its forward to its backward;
  the root is never resharded after forward (``FSDPState._lazy_init``: root
  ``post_forward_mesh_info = None``).
* Peak moments modelled: forward, the end of the last block (it and the root gathered, its flat
  output, every block's saved activations) and the loss's end (the root gathered, the last flat
  output, the whole forward's activations); backward, its start (the root gathered, no flat
  output: ``FSDPState._post_forward`` freed it), the last block's pre-backward (root gathered
  with its unsharded gradients, the block gathered, the next one prefetched), every block's
  in-block moments (``Activations.block_moments``: its own unsharded gradients so far beside the
  finished blocks' sharded ones and the previous block's reduce-scatter input, and its
  post-backward copy-in: ``_block_state``; on 2-rank GPT-2 the highest is the last block's, once
  mlp.c_proj's weight gradient exists; with 6 blocks and checkpointing an earlier block's, the
  sharded gradients having piled up) and the root's post-backward reduce at the end. Checked on 2
  CPU ranks (tests/test_fsdp2.py).
* Gradients (``FSDPParamGroup.post_backward``, ``foreach_reduce``): a block's unsharded gradients
  (compute dtype, unpadded) until its post-backward; the reduce-scatter input (``N x`` padded
  shards, ``reduce_dtype``), kept in ``comm_ctx.reduce_scatter_states`` until the next block's
  reduce; the reduce-scatter output is the sharded gradient (padded, cast to the parameter dtype).
* Optimizer: the script's torch optimizer over the sharded parameters (DTensors): its state is
  shard-sized, in the parameter dtype; a step tensor per parameter (torch.optim).
"""

from __future__ import annotations

from collections.abc import Callable
from math import ceil
from typing import Any, NamedTuple

from memprof.dsconfig import ELEMENT_SIZE
from memprof.errors import MemprofError
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.layout.state import (
    C,
    EngineLayout,
    G,
    LayoutSetup,
    O,
    P,
    StateLayout,
    accumulate_between_microsteps,
    optimizer_temporaries,
)
from memprof.estimate.model_shapes import ModelShape
from memprof.estimate.optimizers import optimizer_state_bytes
from memprof.families.common import ParamModule


class Unit(NamedTuple):
    """One parameter as FSDP2 shards it."""

    d0: int  # its dim 0 (what torch.chunk splits)
    numel: int
    trains: bool  # requires_grad
    # a root parameter forward uses after the blocks (the final norm, an untied head): its gradient
    # exists from the loss's backward on, before any block's backward
    late: bool = False


Dims = list[Unit]


def _dim0(module: ParamModule, pname: str, numel: int, hidden: int) -> int:
    """dim 0 of one parameter as the family lays it out: a Linear's weight (out, in), a GPT-2
    Conv1D's (in, out); an embedding (rows, hidden); a bias or a norm's weight is 1-D."""
    if pname == "weight" and module.linear is not None:
        fan_in, fan_out = module.linear
        return fan_in if module.weight_in_first else fan_out
    if pname == "weight" and hidden and numel != hidden and numel % hidden == 0:
        return numel // hidden  # an embedding table
    return numel


def _block_of(name: str) -> str | None:
    """The transformer block a module belongs to (``transformer.h.3``, ``model.layers.3``): the
    name up to its first numeric part; None for a root module (embeddings, final norm, head)."""
    parts = name.split(".")
    index = next((k for k, part in enumerate(parts) if part.isdigit()), None)
    return None if index is None else ".".join(parts[:index + 1])


def _saved(modules_to_save: tuple[str, ...], name: str) -> bool:
    """peft's ``modules_to_save`` match (``ModulesToSaveWrapper``: the name or a ``.``-suffix)."""
    return any(name == m or name.endswith("." + m) for m in modules_to_save)


def _module_params(sh: ModelShape, module: ParamModule, own: list[tuple[str, int]], cursor: int,
                   modules_to_save: tuple[str, ...]) -> list[tuple[int, int]]:
    """(dim 0, index into the wrapped model's ``param_numels``) of what one module holds in
    ``parameters()`` order, as peft 0.21.2 wraps it (memprof.estimate.lora_shape.apply_lora): its
    own parameters; a ``modules_to_save`` copy (``modules_to_save.default``, same shapes); for a LoRA
    target ``lora_A.default`` = nn.Linear(in, r) (weight (r, in): dim 0 r) and ``lora_B.default`` =
    nn.Linear(r, out) (weight (out, r): dim 0 out), registered after the base layer
    (``LoraLayer.update_layer``). Without LoRA, the module's own parameters only."""
    hidden = sh.hidden or 0
    dims = [_dim0(module, pname, sh.param_numels[cursor + k], hidden) for k, (pname, _) in enumerate(own)]
    if own and _saved(modules_to_save, module.name):
        dims += dims
    if module.name in sh.lora_targets and module.linear is not None:
        dims += [sh.lora_r, module.linear[1]]
    return [(d0, cursor + k) for k, d0 in enumerate(dims)]


def fsdp2_units(sh: ModelShape, cfg: dict[str, Any], modules_to_save: tuple[str, ...] = ()) -> tuple[Dims, Dims]:
    """(the root module's own parameters, one transformer block's), as (dim 0, numel, requires_grad)
    each: the wrapping ``fully_shard(block)`` for every block, then ``fully_shard(model)``; derived
    from the family's parameter-holding modules (``ModelFamily.param_modules``), so a new family
    needs nothing here. With PEFT LoRA (``sh.trainable_mask``) the adapters sit in their target's
    block, each parameter keeps its ``requires_grad`` (frozen ones are sharded and gathered alike:
    ``FSDPParam`` is built for every parameter of the module, _fsdp_init.py ``_get_managed_states``).
    MemprofError for a model whose parameter shapes memprof does not know."""
    family = sh.family
    if family is None or family.param_modules is None or not sh.n_layer:
        raise MemprofError(f"--engine fsdp2 needs per-parameter shapes: model_type {sh.model_type or '(a bare --params count)'} "
                           "is not modelled (GPT-2 and the Llama family are)")
    try:
        modules = family.param_modules(cfg)
    except MemprofError as e:  # the family's own refusal names LoRA: say what FSDP2 cannot model
        raise MemprofError(f"--engine fsdp2: {e}".replace("LoRA on ", "")) from None
    mask = sh.trainable_mask or (True,) * len(sh.param_numels)
    units: dict[str | None, Dims] = {}
    seen: set[int] = set()  # the family's indices: a tied head's weight is the embedding's (the root's)
    cursor = 0  # index into the (wrapped) model's parameters() order
    for module in modules:
        own = [(pname, index) for pname, index in module.params if index not in seen]
        seen.update(index for _, index in own)
        held = _module_params(sh, module, own, cursor, modules_to_save)
        cursor += len(held)
        if cursor > len(sh.param_numels):
            break
        block = _block_of(module.name)
        late = block is None and any(k is not None for k in units)  # a root module after the blocks
        units.setdefault(block, []).extend(Unit(d0, sh.param_numels[i], mask[i], late) for d0, i in held)
    root, blocks = units.pop(None, []), list(units.values())
    if cursor != len(sh.param_numels) or any(u.d0 <= 0 or u.numel % u.d0 for b in [root, *blocks] for u in b):
        raise MemprofError(f"--engine fsdp2: the {sh.model_type} model's parameters (with its adapters) do not follow "
                           "the family's modules in parameters() order: not modelled")
    if len(blocks) != sh.n_layer or any(b != blocks[0] for b in blocks):
        raise MemprofError(f"--engine fsdp2: the {sh.model_type} config's parameters are not the plain "
                           "block layout memprof models (e.g. cross-attention, adapters on some layers only)")
    return root, blocks[0]


def padded_shard_numel(d0: int, numel: int, world_size: int) -> int:
    """Elements one rank keeps of a parameter: ``ceil(d0 / N)`` rows of ``numel / d0`` (chunk 0's size)."""
    return ceil(d0 / world_size) * (numel // d0) if d0 else 0


def local_shard_numel(d0: int, numel: int, world_size: int, rank: int) -> int:
    """Elements of a parameter's unpadded chunk on ``rank`` (``sharded_param``'s local tensor: the
    padded shard narrowed to the rows ``torch.chunk`` gives that rank, ``ceil(d0 / N)`` each, the
    later ranks of an uneven dim 0 fewer or none): what torch.optim's ``zeros_like`` state is sized by."""
    if not d0:
        return 0
    rows = ceil(d0 / world_size)
    return min(rows, max(0, d0 - rank * rows)) * (numel // d0)


def _shards(dims: Dims, n: int, trainable_only: bool = False) -> int:
    """Padded shard elements of ``dims`` on one rank (of the trainable parameters only, if asked)."""
    return sum(padded_shard_numel(u.d0, u.numel, n) for u in dims if u.trains or not trainable_only)


def fsdp2_dtypes(inp: EstimateInputs) -> tuple[int, int, int]:
    """Bytes per element of (the sharded parameters, the gathered copies, the reduce-scatter)."""
    compute = ELEMENT_SIZE[inp.precision]
    sharded = ELEMENT_SIZE["fp32"] if inp.fsdp2.param_dtype else compute
    reduce = ELEMENT_SIZE[inp.fsdp2.reduce_dtype] if inp.fsdp2.reduce_dtype else compute
    return sharded, compute, reduce


def fsdp2_layout(s: LayoutSetup, out: StateLayout) -> None:
    """One rank's model states under FSDP2 (every rank alike: each pads its chunk to chunk 0's size).

    Frozen parameters (PEFT LoRA's backbone) are sharded and gathered like the others, but have no
    gradient, no reduce-scatter space and no optimizer state: ``FSDPParamGroup.post_backward``
    reduces only parameters with an unsharded gradient, ``foreach_reduce`` sizes the reduce-scatter
    input and output by those (``padded_unsharded_sizes`` of ``unsharded_grads``), the sharded
    gradients are views of that output, and torch.optim makes state only for a parameter with a
    gradient (a group whose parameters are all frozen, as the root under LoRA, reduces nothing)."""
    inp, n, layers = s.inp, s.N, s.shape.n_layer or 0
    root, block = fsdp2_units(s.shape, inp.model_config or {}, inp.peft.modules_to_save if inp.peft else ())
    e_o, e_p, e_r = fsdp2_dtypes(inp)
    root_shard, block_shard = _shards(root, n), _shards(block, n)
    shards = root_shard + layers * block_shard  # elements this rank keeps
    trained = _shards(root, n, True) + layers * _shards(block, n, True)  # ... of trainable parameters
    n_trained = sum(u.trains for u in root) + layers * sum(u.trains for u in block)
    local = [local_shard_numel(u.d0, u.numel, n, s.rank) for u in root + block * layers if u.trains]
    where = "host" if inp.fsdp2.offload_params else "device"
    out.add(where, P, shards * e_o)
    # torch.optim over the sharded DTensors: state like each rank's unpadded local shard (its dtype),
    # a step tensor each
    out.add(where, O, optimizer_state_bytes(inp.optimizer, sum(local), n_trained, e_o, step_tensors=s.step_tensors))
    root_gathered, block_gathered = root_shard * n * e_p, block_shard * n * e_p
    blocks_kept = 0 if inp.fsdp2.reshard_after_forward else layers * block_gathered
    # a block's flat all-gather output; none on one rank, where FSDPParamGroup.unshard skips the
    # collective and wait_for_unshard copies each shard into its unsharded parameter directly
    flat = block_gathered if n > 1 else 0
    last_block = _forward_moments(out, root_gathered, block_gathered, blocks_kept, flat, layers)
    # backward's start: the root's post-forward freed the flat output (FSDPState._post_forward);
    # the root stays gathered, and every block under reshard_after_forward False; the root's
    # pre-backward prefetches the last block's all-gather (FSDPParamGroup.pre_backward ->
    # _backward_prefetch), a flat output unless that block is still gathered
    out.backward_start_extra = {P: root_gathered + blocks_kept, C: 0 if blocks_kept else flat}
    # backward, the last block's pre-backward: the root still gathered with the unsharded gradients
    # its trainable parameters have by then: those forward used after the blocks (the final norm, an
    # untied head), from the loss's backward; not yet the embeddings' (their backward comes last),
    # and a tied head's is the activation term's (the family counts it waiting in the embedding's
    # AccumulateGrad buffer, not yet a .grad); none under LoRA. The block gathered and, when blocks
    # were resharded, the next one's all-gather prefetched (_backward_prefetch); already gathered
    # blocks need none
    root_grads = sum(u.numel for u in root if u.trains and u.late) * e_p
    out.backward_extra = {P: root_gathered + last_block, G: root_grads,
                          C: 0 if blocks_kept else flat}
    grads = trained * e_o  # the reduce-scatter outputs (padded), cast to the parameter dtype
    offload, accumulating = inp.fsdp2.offload_params, inp.gradient_accumulation_steps > 1
    if offload:
        out.add("host", G, grads)  # copied to the host by foreach_reduce (offload_to_cpu)
        step_grads = {}
    else:
        step_grads = {G: grads}
    out.backward_block_state = _block_state(n, layers, root_grads, root_gathered, block_gathered, flat,
                                            _shards(block, n, True), sum(u.numel for u in block if u.trains),
                                            e_o, e_p, e_r, bool(blocks_kept), offload,
                                            grads if accumulating else None)
    # block moments need every block parameter trainable: Activations.block_moments counts a
    # block's own .grad elements as full fine-tuning has them (none under LoRA, frozen ones)
    out.backward_block_count = layers if all(u.trains for u in block) else 0
    # the end of backward at its highest: the root's post-backward, run last by
    # FSDPState._root_post_backward_final_callback (_fsdp_state.py:395-431; autograd is done, no
    # activation beyond the loop's is alive): _fsdp_param_group.py:637-638 reshards the root
    # before the reduce (its gathered copies freed), :650-658 drops block 0's reduce-scatter input,
    # and foreach_reduce (_fsdp_collectives.py:597-606) allocates the root's reduce-scatter input
    # (N x its trainable padded shards, reduce_dtype) and copies the root's unsharded gradients
    # (compute dtype, unpadded) into it before clearing them: both alive beside every block's
    # sharded gradient (on the host under offload; all of them, the root's too, when an earlier
    # micro-step left them). After it only the sharded gradients remain (step_grads), less.
    root_trained = _shards(root, n, True)
    block_grads = 0 if offload else (grads if accumulating else layers * _shards(block, n, True) * e_o)
    out.backward_end_extra = {G: block_grads + sum(u.numel for u in root if u.trains) * e_p,
                              C: n * root_trained * e_r} if root_trained else dict(step_grads)
    # the optimizer's temporaries; under CPUOffloadPolicy the step runs on the host shards (its
    # temporaries host memory, not in the device peak)
    temporaries = optimizer_temporaries(inp, max(local, default=0), sum(local), s.device_type)
    out.step_moments = [{**step_grads, O: 0 if inp.fsdp2.offload_params else temporaries}]
    accumulate_between_microsteps(s, out, dict(step_grads), same_at_end=(G,),
                                  how="every sharded gradient (reduce-scattered every micro-step)")
    out.notes.append(_note(inp, root_shard, block_shard, layers, trained))


def _forward_moments(out: StateLayout, root_gathered: int, block_gathered: int, blocks_kept: int, flat: int,
                     layers: int) -> int:
    """FSDP2's forward moments beside the activations (``fsdp2_layout``'s share of the layout);
    returns the gathered bytes of the last block's moment (the blocks kept, or one block)."""
    # forward, two moments: the end of the last block (it is gathered, with its flat all-gather
    # output, kept in comm_ctx.all_gather_state by wait_for_unshard; every block's saved
    # activations, not yet the head's) and the loss's end (the last block resharded unless
    # reshard_after_forward is False; its flat output kept until the root's post-forward, which
    # runs after the loss: GPT2LMHeadModel / LlamaForCausalLM compute it inside forward)
    last_block = max(blocks_kept, block_gathered)
    out.forward_extra = {P: root_gathered + blocks_kept, C: flat}
    out.forward_last_block_extra = {P: root_gathered + last_block, C: flat}
    if layers > 1 and flat:
        # the last block's pre-forward (FSDPParamGroup.wait_for_unshard, _fsdp_param_group.py): its
        # copy-out fills its unsharded parameters while the previous block's flat output is still
        # held in comm_ctx.all_gather_state (freed only after this copy-out) beside its own; the
        # previous block already resharded by its post_forward (unless reshard_after_forward is
        # False). Under checkpointing the activations then are small (each block's checkpointed
        # input), so this moment can top the end of the last block (tests/test_fsdp2.py ckpt)
        out.forward_copy_out_extra = {P: root_gathered + last_block, C: 2 * flat}
        out.forward_copy_out_blocks = layers
    return last_block


def _block_state(n: int, layers: int, root_grads: int, root_gathered: int, block_gathered: int, flat: int,
                 block_trained: int, block_numel: int, e_o: int, e_p: int, e_r: int, kept: bool, offload: bool | None,
                 accumulated: int | None) -> Callable[[int, int | None], dict[str, int]]:
    """``StateLayout.backward_block_state`` for FSDP2: beyond ``rest`` at a backward moment of block
    i = layers-1-done, from torch 2.13 _fully_shard/ (``_fsdp_param_group.py`` = pg,
    ``_fsdp_collectives.py`` = coll). In-block, ``own`` of its parameters' elements with a .grad:

    * params: the root gathered (never resharded after forward) and block i (gathered in its
      pre_backward, pg:576-585); with reshard_after_forward False every block not yet through its
      post-backward too (pg:637-638 reshards a block once its backward ran: reshard_after_backward);
    * comm_buffers: block i-1's flat all-gather output, prefetched by block i's pre_backward
      (pg:795-830 ``_backward_prefetch``: curr_index > 0; block 0 prefetches nothing) and freed only
      at block i-1's copy-out (pg:417-425), unless the blocks stayed gathered (pg:372-375, ``unshard``
      a no-op); block i+1's reduce-scatter input (N x its trainable padded shards, reduce_dtype),
      kept in ``comm_ctx.reduce_scatter_states`` (pg:717) until block i's post-backward pops it
      (pg:647-658, ``reduce_scatter_max_input_buffers`` 1);
    * grads: block i's own unsharded gradients, ``unsharded_param.grad`` in the compute dtype,
      unpadded, until its post-backward (pg:627-630, coll:597-606); the root's gradients from the
      loss's backward (``root_grads``), its reduce coming last; each finished block's sharded
      gradient (coll:612, 696, 704, 754: a view of its padded reduce-scatter output, cast to the
      parameter dtype; copied to the host under offload: coll:711-740), or every sharded gradient
      when an earlier micro-step left them (``accumulated``: added into in place, coll:749).

    ``own`` None: block i's post-backward copy-in, its highest moment (coll:597-606): the block
    resharded (pg:637-638), block i+1's reduce-scatter input popped (pg:647-658), and the block's
    own reduce-scatter input allocated beside all its unsharded gradients (``block_numel``
    elements), which are freed only once copied into it."""
    def state(done: int, own: int | None) -> dict[str, int]:
        i = layers - 1 - done
        sharded = 0 if offload else (accumulated if accumulated is not None else done * block_trained * e_o)
        prefetch = flat if not kept and i > 0 else 0
        gathered = (layers - done if kept else 1) * block_gathered
        rs_input = n * block_trained * e_r
        if own is None:
            return {P: root_gathered + gathered - block_gathered, G: root_grads + block_numel * e_p + sharded,
                    C: prefetch + rs_input}
        return {P: root_gathered + gathered, G: root_grads + own * e_p + sharded,
                C: prefetch + (rs_input if done else 0)}
    return state


def _note(inp: EstimateInputs, root_shard: int, block_shard: int, layers: int, trained: int) -> str:
    f = inp.fsdp2
    frozen = (f"; frozen parameters (LoRA's backbone) sharded and gathered like the others, with no gradient, "
              f"reduce-scatter space or optimizer state: {trained:,} trainable shard elements per rank"
              if root_shard + layers * block_shard != trained else "")
    return (f"FSDP2: fully_shard on each of {layers} blocks and the root, {inp.world_size} ranks, dim-0 chunks padded "
            f"to chunk 0 (root {root_shard:,} + {layers} x {block_shard:,} elements per rank){frozen}; reshard_after_forward "
            f"{f.reshard_after_forward} (the root stays gathered after forward either way); MixedPrecisionPolicy "
            f"param_dtype {f.param_dtype or 'none'}, reduce_dtype {f.reduce_dtype or 'none'}"
            + ("; CPUOffloadPolicy: shards, their gradients and optimizer state on the host (the step runs there: its "
               "temporaries are host memory, not in the host figure); the gathered copies, all-gather and reduce-scatter "
               "buffers stay on the device; on CUDA each shard's transient device copy for the all-gather "
               "(FSDPParam.all_gather_inputs) and each reduce-scatter output before its copy to the host are not at the "
               "modelled peaks" if f.offload_params else "")
            + "; backward's block moments: each block's own unsharded gradients (compute dtype) until its post-backward "
            "reduce-scatter, beside the finished blocks' sharded gradients and the previous block's reduce-scatter input "
            "(N x its trainable padded shards, reduce_dtype), and its post-backward copy-in (its unsharded gradients and its "
            "reduce-scatter input at once), its activations taken as its lowest traced in-block moment's less the block's "
            "saved tensors (no later moment is traced; errs low); not at the modelled peaks: "
            "the mixed-precision all-gather's copy-in buffer (one block's shards, transient)")


def describe_fsdp2(inp: EstimateInputs) -> str:
    return f"torch FSDP2 (fully_shard, torch 2.13 _fully_shard/), world size {inp.world_size}, compute {inp.precision}"


def describe_fsdp2_buffers(inp: EstimateInputs) -> str:
    return ("FSDP2 has no gradient buckets: one all-gather and one reduce-scatter per fully_shard group, sized by "
            "the group's padded shards (comm_buffers)")


def describe_fsdp2_ranks(inp: EstimateInputs) -> str:
    return ("parameters and gradients alike on every rank: each pads its dim-0 chunks to chunk 0's size "
            "(_fsdp_param.py: FSDPParam._init_sharded_param; foreach_reduce's padded reduce-scatter output), so no "
            "rank carries more padding than another; optimizer state follows each rank's unpadded chunk (torch.optim's "
            "zeros_like of the sharded parameter's local tensor), so the later ranks of an uneven dim 0 hold less: "
            "rank 0 (the most) and the last rank modelled")


FSDP2_LAYOUT = EngineLayout(fsdp2_layout, describe_fsdp2, describe_fsdp2_buffers, describe_fsdp2_ranks)
