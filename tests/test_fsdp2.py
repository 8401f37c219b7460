"""torch FSDP2 (``fully_shard``): measured (MemoryProfiler around a user's own 2-rank gloo CPU loop),
estimated (``--engine fsdp2``, the layout in memprof/estimate/layout/fsdp2.py) and side by side
(``--compare-engines``).

One torchrun launch (tests/fsdp2_harness/fsdp2_loop.py) runs every setup in turn: reshard_after_forward
True and False, MixedPrecisionPolicy(param_dtype=bf16), a dim-1 ``shard_placement_fn`` that memprof
must refuse in one line, and the first in an accelerate loop under ``profile_accelerate``.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import sys
from dataclasses import replace
from math import ceil
from pathlib import Path

import pytest
from launch_helpers import REPO, free_port, run_group

from memprof.cli.estimate import main as estimate_main
from memprof.engines import Engine
from memprof.errors import MemprofError
from memprof.estimate import EstimateInputs, estimate, plan
from memprof.estimate.advise import advise, step_costs
from memprof.estimate.from_run import inputs_from_run
from memprof.estimate.layout import model_state_layout
from memprof.estimate.layout.fsdp2 import fsdp2_units, padded_shard_numel
from memprof.estimate.layout.state import C, G, P
from memprof.estimate.model_shapes import model_shape, shape_of
from memprof.models import preset_config
from memprof.peft_config import LoraSetup

HARNESS = REPO / "tests" / "fsdp2_harness" / "fsdp2_loop.py"
sys.path.insert(0, str(HARNESS.parent))
from fsdp2_loop import BATCH, CKPT_LAYERS, CONFIG, LLAMA_CONFIG, LORA, SEQ  # noqa: E402

WORLD = 2


def _estimate_json(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert estimate_main([*argv, "--json"]) == 0
    return json.loads(out.getvalue())


# ---- the sharding rule and the estimate (no launch) ----------------------------------------------

def test_dim0_chunks_pad_to_chunk_zero() -> None:
    # torch.chunk(1001 rows, 2) -> 501 + 500 rows: both ranks keep 501 (chunks[0].size())
    assert padded_shard_numel(1001, 1001 * 256, 2) == 501 * 256
    assert padded_shard_numel(65, 65, 8) == 9  # 8 full chunks of 9, the last one of 2: padded to 9
    assert padded_shard_numel(256, 256 * 768, 2) == 128 * 768


@pytest.mark.parametrize("preset", ["gpt2-tiny", "gpt2", "llama-tiny", "qwen2-tiny"])
def test_units_cover_every_parameter(preset: str) -> None:
    shape = model_shape(preset_config(preset))
    root, block = fsdp2_units(shape, preset_config(preset))
    assert sum(u.numel for u in root) + shape.n_layer * sum(u.numel for u in block) == shape.n_params
    assert all(u.trains for u in root + block) and not any(u.late for u in block)
    # forward's order: the embeddings before the blocks, the final norm (and an untied head) after
    late = {"gpt2-tiny": 2 * 64, "gpt2": 2 * 768, "llama-tiny": 64 + 512 * 64, "qwen2-tiny": 64}[preset]
    assert sum(u.numel for u in root if u.late) == late


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_lora_units_put_each_adapter_in_its_block_and_freeze_the_rest(preset: str) -> None:
    cfg = preset_config(preset)
    lora = LoraSetup(r=3, target_modules="all-linear", modules_to_save=())
    shape = model_shape(cfg, lora=lora)
    root, block = fsdp2_units(shape, cfg)
    assert not any(u.trains for u in root)  # embeddings, final norm, head: frozen, no adapter
    linears = 4 if preset == "gpt2-tiny" else 7  # c_attn, c_proj, c_fc, mlp.c_proj / q, k, v, o, gate, up, down
    adapters = [(u.d0, u.numel) for u in block if u.trains]
    assert len(adapters) == 2 * linears and sum(n for _, n in adapters) * shape.n_layer == shape.trainable.n_params
    assert [d0 for d0, _ in adapters[::2]] == [3] * linears  # lora_A: nn.Linear(in, r).weight is (r, in)
    h = cfg.get("n_embd") or cfg["hidden_size"]
    assert adapters[1] == ((3 * h, 3 * 3 * h) if preset == "gpt2-tiny" else (h, h * 3))  # lora_B (out, r) of c_attn / q_proj


def test_lora_shards_frozen_params_but_grads_and_state_only_the_adapters() -> None:
    base = ["--model", "llama-tiny", "--engine", "fsdp2", "--world-size", "2", "--seq-len", "64"]
    full = _estimate_json(base)["ranks"][0]
    lora = _estimate_json([*base, "--lora-r", "8", "--lora-target-modules", "q_proj,v_proj"])
    rank = lora["ranks"][0]
    # r=8 on q (64 -> 64) and v (64 -> 32) per layer, 2 layers; every dim 0 (8, 64, 32) even on 2 ranks
    adapters = 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)
    assert rank["device"]["params"] == full["device"]["params"] + adapters // 2 * 4  # the backbone still sharded
    assert rank["device"]["optimizer_state"] == 2 * adapters // 2 * 4 + 4 * 8
    assert rank["phases"]["step"]["peak"]["device"]["grads"] == adapters // 2 * 4
    assert any("no gradient, reduce-scatter space or optimizer state" in a for a in lora["assumptions"])
    assert not any("DeepSpeed's engine" in a for a in lora["assumptions"])


def test_bare_parameter_count_is_refused_in_one_line() -> None:
    with pytest.raises(MemprofError, match="per-parameter shapes"):
        _estimate_json(["--params", "1e9", "--engine", "fsdp2"])


def test_fsdp2_flags_need_the_engine_and_no_zero_stage() -> None:
    with pytest.raises(MemprofError, match="--engine fsdp2 only"):
        _estimate_json(["--model", "gpt2-tiny", "--param-dtype", "bf16"])
    with pytest.raises(MemprofError, match="no DeepSpeed config or ZeRO stage"):
        _estimate_json(["--model", "gpt2-tiny", "--engine", "fsdp2", "--zero-stage", "3"])


def test_mixed_precision_keeps_fp32_shards_and_casts_the_gathered_copies() -> None:
    base = ["--model", "gpt2-tiny", "--engine", "fsdp2", "--world-size", "2", "--seq-len", "64"]
    fp32 = _estimate_json(base)["ranks"][0]
    bf16 = _estimate_json([*base, "--param-dtype", "bf16"])["ranks"][0]
    assert bf16["device"]["params"] == fp32["device"]["params"]
    assert bf16["device"]["optimizer_state"] == fp32["device"]["optimizer_state"]
    comm = [r["phases"]["forward"]["peak"]["device"]["comm_buffers"] for r in (bf16, fp32)]
    assert comm[0] * 2 == comm[1]


def test_offload_puts_shards_and_optimizer_state_on_the_host() -> None:
    doc = _estimate_json(["--model", "gpt2-tiny", "--engine", "fsdp2", "--world-size", "2", "--offload-params", "cpu"])
    rank = doc["ranks"][0]
    assert rank["device"]["params"] == rank["device"]["optimizer_state"] == 0
    assert rank["host"]["params"] and rank["host"]["optimizer_state"] and rank["host"]["grads"]


def _harness_inputs(setup: str) -> EstimateInputs:
    """The estimate's inputs for a harness setup, from the run record MemoryProfiler writes for it
    (tests/fsdp2_harness/fsdp2_loop.py: the model's config, batch, sequence, AdamW; the fsdp2 record)."""
    from transformers import GPT2Config

    fsdp2 = {"reshard_after_forward": setup != "keep", "param_dtype": "bfloat16" if setup == "bf16" else None,
             "reduce_dtype": None, "offload_params": None, "sharded_dtype": "float32", "param_groups": 1 + CONFIG["n_layer"]}
    return inputs_from_run({"model_config": GPT2Config(**CONFIG).to_dict(), "micro_batch": BATCH, "seq_len": SEQ,
                            "optimizer": "adamw", "device_type": "cpu", "world_size": WORLD, "fsdp2": fsdp2})


def _root_and_block() -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """GPT-2's root parameters (wte, wpe, ln_f's two) and one block's, as shapes."""
    shapes = _gpt2_shapes()
    return shapes[:2] + shapes[-2:], shapes[2:2 + len(shapes[2:-2]) // CONFIG["n_layer"]]


def _numel(shape: tuple[int, ...]) -> int:
    return shape[0] * (shape[1] if len(shape) > 1 else 1)


@pytest.mark.parametrize("setup", ["keep", "reshard", "bf16"])
def test_backward_peak_is_the_last_blocks_moment_after_its_mlp_out_gradient(setup: str) -> None:
    """Issue 17: the backward peak the 2-rank runs measure (every setup: ``.grad of gathered
    transformer.h.1.mlp.c_proj.weight`` the only gradient) is inside the last block's backward, once
    mlp.c_proj's backward returned: FSDP2 keeps each unsharded gradient (the gathered copy's .grad,
    in param_dtype, unpadded) until the block's post-backward reduce-scatter
    (_fsdp_param_group.py:627-630), while GELU's backward still holds most activations. The estimate's
    composition there: that weight's and bias's gradients and ln_f's (the root's, since the loss's
    backward; its reduce comes last); the root and the block gathered (every block with
    reshard_after_forward False); block 0's all-gather prefetched by the last block's pre-backward
    (_backward_prefetch), none when the blocks stayed gathered."""
    e = 2 if setup == "bf16" else 4  # the gathered copies and their gradients: param_dtype
    h, i = CONFIG["n_embd"], 4 * CONFIG["n_embd"]
    root, block = _root_and_block()

    def gathered(shapes: list[tuple[int, ...]]) -> int:  # N x the padded fp32 shards, cast to param_dtype
        return WORLD * sum(map(_padded, shapes)) * e // 4

    peak = estimate(_harness_inputs(setup)).ranks[0].phases["backward"]["device"]
    assert peak["grads"] == (i * h + h + 2 * h) * e
    blocks = CONFIG["n_layer"] if setup == "keep" else 1
    assert peak["params"] == sum(map(_padded, _gpt2_shapes())) + gathered(root) + blocks * gathered(block)
    assert peak["comm_buffers"] == (0 if setup == "keep" else gathered(block))


@pytest.mark.parametrize("setup", ["keep", "reshard"])
def test_backward_moments_follow_fsdp2s_reduce_order(setup: str) -> None:
    """The layout's other backward moments, as torch 2.13's code path orders them (fp32, 2 blocks):
    block 0's first moment (block 1 reduced: its sharded gradient and its reduce-scatter input, kept
    in reduce_scatter_states until block 0's post-backward; block 1 resharded after its backward;
    block 0 prefetches nothing), block 1's post-backward copy-in (the block resharded, all its
    unsharded gradients beside its reduce-scatter input: _fsdp_collectives.py foreach_reduce) and
    the root's in the final callback (block 0's input popped; the root resharded; every block's
    sharded gradient, the root's unsharded ones and its reduce-scatter input)."""
    inp = _harness_inputs(setup)
    lay = model_state_layout(inp, shape_of(inp), 0, "cpu")
    root, block = _root_and_block()
    root_g, block_g = (WORLD * sum(map(_padded, s)) for s in (root, block))  # gathered, padded
    block_shard, ln_f = sum(map(_padded, block)), 2 * CONFIG["n_embd"] * 4
    keep = setup == "keep"
    assert lay.backward_block_count == CONFIG["n_layer"]
    assert lay.backward_block_state(1, 0) == {P: root_g + block_g, G: ln_f + block_shard, C: WORLD * block_shard}
    assert lay.backward_block_state(0, None) == {
        P: root_g + (block_g if keep else 0), G: ln_f + sum(map(_numel, block)) * 4,
        C: (0 if keep else block_g) + WORLD * block_shard}
    assert lay.backward_end_extra == {G: CONFIG["n_layer"] * block_shard + sum(map(_numel, root)) * 4,
                                      C: WORLD * sum(map(_padded, root))}


def test_accelerate_fsdp_version_2_sets_the_engine(tmp_path: Path) -> None:
    yaml = tmp_path / "fsdp2.yaml"
    yaml.write_text("distributed_type: FSDP\nmixed_precision: bf16\nnum_processes: 4\n"
                    "fsdp_config:\n  fsdp_version: 2\n  fsdp_reshard_after_forward: false\n")
    doc = _estimate_json(["--model", "gpt2-tiny", "--accelerate-config", str(yaml)])
    assert doc["inputs"]["engine"] == "fsdp2" and doc["inputs"]["world_size"] == 4
    assert doc["inputs"]["fsdp2"] == {"reshard_after_forward": False, "param_dtype": "bf16", "reduce_dtype": "bf16",
                                      "offload_params": False}


def test_compare_engines_prints_both_side_by_side() -> None:
    doc = _estimate_json(["--model", "gpt2-tiny", "--precision", "bf16", "--world-size", "4", "--compare-engines"])
    assert doc["zero3"]["inputs"]["zero_stage"] == 3 and doc["fsdp2"]["inputs"]["engine"] == "fsdp2"
    assert doc["zero3"]["ranks"][0]["device"]["master_params"] > 0
    assert doc["fsdp2"]["ranks"][0]["device"]["master_params"] == 0
    assert any("fp32 master partitions" in line for line in doc["differences"])


@pytest.mark.parametrize("kind", ["allocator", "dispatch"])
def test_trackers_follow_storages_fsdp2_resizes_that_were_made_before_tracking(kind: str) -> None:
    # FSDP2 frees and re-gathers an unsharded parameter with UntypedStorage.resize_, which goes through
    # the allocator the storage was made with: for one made before tracking started, not the hook's
    import torch

    from memprof.measure.allocation_hook_tracker import NativeAllocationTracker
    from memprof.measure.dispatch_tracker import AllocationTracker, label_of
    from memprof.measure.native import HookUnavailable

    params = label_of("device", "params")
    gathered = torch.zeros(2**18).untyped_storage()  # 1 MiB, made before tracking: seeded
    empty = torch.zeros(2**18).untyped_storage()
    empty.resize_(0)  # resharded at rest when tracking starts: nothing to seed
    try:
        tracker = NativeAllocationTracker() if kind == "allocator" else AllocationTracker()
    except HookUnavailable:
        pytest.skip("allocation hook unavailable here")
    tracker.seed([gathered, empty], params)
    with tracker:
        base = tracker.device_total
        gathered.resize_(0)
        tracker.resync(gathered, params)
        assert tracker.device_total == base - 2**20
        tracker.reset_peak()
        for st in (gathered, empty):
            st.resize_(2**20)
            tracker.resync(st, params)
        assert tracker.device_total == base + 2**20 and tracker.peak_total == base + 2**20
        assert tracker.tally[params] == 2 * 2**20
        for st in (gathered, empty):
            st.resize_(0)
            tracker.resync(st, params)
        assert tracker.device_total == base - 2**20 and tracker.peak_total == base + 2**20


# ---- measured: one launch, every setup -------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # offload first: its device step peak is ~1 KB (everything else on the host), and the setups share
    # one process, so what earlier ones leave in it (each fully_shard's default DeviceMesh stays in
    # torch's global mesh registry: 16 B after `reshard`, 160 B after `lora`) would be `other` there,
    # 16% of that peak; run alone or first it is 0 (the other setups' peaks are MBs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(free_port()), str(HARNESS), str(out), "offload", "reshard", "keep", "bf16", "dim1", "accelerate", "lora", "ckpt"]
    proc = run_group(cmd, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return out


def _padded(shape: tuple[int, ...]) -> int:
    """fp32 bytes one rank keeps of a parameter: torch.chunk's ceil(d0 / N) rows, every rank padded to chunk 0."""
    return ceil(shape[0] / WORLD) * (shape[1] if len(shape) > 1 else 1) * 4


def _unpadded(shape: tuple[int, ...], rank: int) -> int:
    """fp32 bytes of ``rank``'s own rows of a parameter (chunk r of torch.chunk, unpadded): what
    torch.optim's zeros_like state of the sharded parameter's local tensor holds."""
    rows = ceil(shape[0] / WORLD)
    return min(rows, max(0, shape[0] - rank * rows)) * (shape[1] if len(shape) > 1 else 1) * 4


def _gpt2_shapes() -> list[tuple[int, ...]]:
    """GPT2LMHeadModel's parameter shapes (Conv1D weights stored (in, out)), the tied head once."""
    h, v, p, i = CONFIG["n_embd"], CONFIG["vocab_size"], CONFIG["n_positions"], 4 * CONFIG["n_embd"]
    block = [(h,), (h,), (h, 3 * h), (3 * h,), (h, h), (h,), (h,), (h,), (h, i), (i,), (i, h), (h,)]
    return [(v, h), (p, h)] + block * CONFIG["n_layer"] + [(h,), (h,)]


def _ranks_last_step(run_dir: Path) -> list[dict]:
    doc = json.loads((run_dir / "memprof.json").read_text())
    return [rank["steps"][-1]["phases"] for rank in doc["ranks"]]


@pytest.mark.parametrize("setup", ["reshard", "keep", "bf16", "accelerate"])
def test_resident_states_are_the_padded_shards(runs: Path, setup: str) -> None:
    shapes = _gpt2_shapes()
    shards = sum(map(_padded, shapes))
    for rank, phases in enumerate(_ranks_last_step(runs / setup)):
        end = phases["step"]["end"]["device"]
        assert end["params"] == shards  # fp32 shards (bf16: only the gathered copies are cast)
        # exp_avg, exp_avg_sq like the rank's own rows (rank 1: 500 of wte's 1001, 32 of wpe's 65), step tensors
        assert end["optimizer_state"] == 2 * sum(_unpadded(s, rank) for s in shapes) + 4 * len(shapes)
        assert phases["step"]["peak"]["device"]["grads"] == shards  # the reduce-scatter outputs, padded


def _lora_shapes() -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """(every parameter's shape, the adapters'), from LlamaForCausalLM's layer shapes and PEFT's
    adapter shapes: lora_A is nn.Linear(in, r) (weight (r, in)), lora_B nn.Linear(r, out) (weight (out, r))."""
    c, r = LLAMA_CONFIG, LORA["r"]
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    linear = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # (out, in)
    block = [(h,), *linear.values(), (h,)]  # two RMSNorm weights and seven Linear weights, no biases
    adapters = [shape for name in LORA["target_modules"] for shape in ((r, linear[name][1]), (linear[name][0], r))]
    layers = c["num_hidden_layers"]
    frozen = [(v, h), (h,), (v, h)] + block * layers  # embed_tokens, norm, lm_head (untied)
    return frozen + adapters * layers, adapters * layers


def test_lora_resident_states_are_sharded_backbone_and_adapter_only_grads_and_state(runs: Path) -> None:
    doc = json.loads((runs / "lora" / "memprof.json").read_text())
    everything, adapters = _lora_shapes()
    head_dim = LLAMA_CONFIG["hidden_size"] // LLAMA_CONFIG["num_attention_heads"]
    rotary = 2 * head_dim // 2 * 4  # LlamaRotaryEmbedding's inv_freq and original_inv_freq buffers (fp32)
    for rank in doc["ranks"]:
        phases = rank["steps"][-1]["phases"]
        end = phases["step"]["end"]["device"]
        assert end["params"] == sum(map(_padded, everything)) + rotary  # the frozen backbone is sharded too
        # AdamW over the adapters only, like the rank's own rows (rank 1: 2 of each lora_A's 5)
        assert end["optimizer_state"] == 2 * sum(_unpadded(a, rank["rank"]) for a in adapters) + 4 * len(adapters)
        # the reduce-scatter outputs of the adapters only, padded
        assert phases["step"]["peak"]["device"]["grads"] == sum(map(_padded, adapters))
        assert end["grads"] == 0  # zero_grad(set_to_none)
    assert doc["run"]["peft_config"]["r"] == LORA["r"]


def test_cpu_offload_puts_shards_grads_and_optimizer_state_on_the_host(runs: Path) -> None:
    """CPUOffloadPolicy on 2 CPU ranks. On a CPU-only machine "host" and "device" are the same memory:
    FSDP2's copies between them are no-ops there (``.to(cpu)`` of a CPU tensor returns it; nothing is
    pinned), so what a CPU run can check is the split by ownership and what stays on the compute side:
    the shards, their gradients and the optimizer state named host (derived from GPT-2's shapes), and
    the device peaks of forward and backward (gathered copies, all-gather buffers, activations) lower
    than the same model's without offload by exactly the shards and the optimizer state, and within
    3% of the estimate. Not checkable here: the transfers themselves, pinned buffers, and the step's
    temporaries (host memory under offload: the step runs on the CPU shards; the optimizer's step is a
    labelled region, host optimizer_state here (memprof/measure/regions.py): the step peak is not
    compared to the estimate, only checked to hold no model state on the device)."""
    shapes = _gpt2_shapes()
    shards = sum(map(_padded, shapes))
    doc = json.loads((runs / "offload" / "memprof.json").read_text())
    assert doc["run"]["fsdp2"]["offload_params"] == "cpu"
    est = {r.rank: r for r in estimate(inputs_from_run(doc["run"])).ranks}
    for rank, (phases, plain) in enumerate(zip(_ranks_last_step(runs / "offload"), _ranks_last_step(runs / "reshard"))):
        state = 2 * sum(_unpadded(s, rank) for s in shapes) + 4 * len(shapes)  # AdamW over the rank's own rows
        end = phases["step"]["end"]
        assert end["host"]["params"] == shards and end["device"]["params"] == 0
        assert end["host"]["optimizer_state"] == state and end["device"]["optimizer_state"] == 0
        step_peak = phases["step"]["peak"]
        assert step_peak["host"]["grads"] == shards  # the reduce-scatter outputs, "copied" to the host
        assert not any(step_peak["device"][c] for c in ("params", "grads", "optimizer_state", "comm_buffers"))
        for phase in ("forward", "backward"):
            measured = phases[phase]["peak_total"]
            assert abs(plain[phase]["peak_total"] - measured - (shards + state)) <= 1024, phase  # (a few bytes of other)
            err = (est[rank].phase_total(phase) - measured) / measured
            assert abs(err) <= TOLERANCE, (phase, measured, f"{err:+.1%}")


def test_run_records_fsdp2_settings(runs: Path) -> None:
    assert json.loads((runs / "keep" / "memprof.json").read_text())["run"]["fsdp2"]["reshard_after_forward"] is False
    bf16 = json.loads((runs / "bf16" / "memprof.json").read_text())["run"]["fsdp2"]
    assert bf16["param_dtype"] == "bfloat16" and bf16["sharded_dtype"] == "float32"


# measured peak vs estimate, |error| within 3% at every phase of every setup: forward's two moments
# (the last block's end, the loss's end), backward's start apart from its first block's, and gloo's
# freed backward buffers released before the next peak (ownership.fsdp2.Fsdp2GroupWatch)
TOLERANCE = 0.03


# accelerate's loop (issue 19: +6.1% at backward under the allocation hook, now closed): the estimate
# was right, the measurement short by the root's gathered parameters (2 x its 547,840 B padded fp32
# shard), because profile_accelerate starts the profiler inside the first forward, after FSDP2's root
# pre-forward hook had gathered the root with the default allocator, whose later re-gathers
# (UntypedStorage.resize_) the hook did not see (ownership.fsdp2.StorageResizeWatch now follows them).
@pytest.mark.parametrize("setup", ["reshard", "keep", "bf16", "accelerate", "lora", "ckpt"])
def test_peaks_match_the_estimate(runs: Path, setup: str) -> None:
    doc = json.loads((runs / setup / "memprof.json").read_text())
    inp = inputs_from_run(doc["run"])
    assert inp.engine == Engine.FSDP2
    est = {r.rank: r for r in estimate(inp).ranks}  # rank 0 and the last: every rank on 2
    for rank, phase in itertools.product(doc["ranks"], ("forward", "backward", "step")):
        measured, estimated = rank["steps"][-1]["phases"][phase]["peak_total"], est[rank["rank"]].phase_total(phase)
        err = (estimated - measured) / measured
        assert abs(err) <= TOLERANCE, (phase, measured, estimated, f"{err:+.1%}")


# issue 17: at the backward peak every category, not only the total, within 3% of the peak; the peak
# is the moment the estimate models from FSDP2's code path: the last block's, once mlp.c_proj's weight
# gradient exists (I x H in param_dtype, the only gradient then; LoRA freezes that weight); with
# checkpointing (ckpt: 4 blocks) block 1's, once blocks 3 and 2 were reduced: their sharded gradients,
# block 2's reduce-scatter input (kept until block 1's post-backward) and block 0's prefetched
# all-gather output beside that weight's gradient (the estimate without block moments was 15% short
# there, its grads by 10% of the peak)
@pytest.mark.parametrize("setup", ["reshard", "keep", "bf16", "accelerate", "offload", "lora", "ckpt"])
def test_backward_peak_categories_match_the_estimate(runs: Path, setup: str) -> None:
    doc = json.loads((runs / setup / "memprof.json").read_text())
    est = {r.rank: r for r in estimate(inputs_from_run(doc["run"])).ranks}
    e = 2 if setup == "bf16" else 4
    block_shard = sum(map(_padded, _root_and_block()[1]))  # fp32 bytes of one block's padded shards
    for rank in doc["ranks"]:
        phase = rank["steps"][-1]["phases"]["backward"]
        measured, peak = phase["peak"]["device"], phase["peak_total"]
        mlp_out_weight = 4 * CONFIG["n_embd"] * CONFIG["n_embd"] * e
        if setup == "ckpt":
            assert measured["grads"] == (CKPT_LAYERS - 2) * block_shard + mlp_out_weight
            assert measured["comm_buffers"] == WORLD * block_shard * 2  # all-gather output, reduce-scatter input
        elif setup != "lora":
            assert measured["grads"] == mlp_out_weight
        estimated = est[rank["rank"]].phases["backward"]["device"]
        for cat in set(measured) | set(estimated):
            err = (estimated.get(cat, 0) - measured.get(cat, 0)) / peak
            assert abs(err) <= TOLERANCE, (rank["rank"], cat, measured.get(cat, 0), estimated.get(cat, 0), f"{err:+.1%}")


def test_profile_accelerate_records_fsdp2(runs: Path) -> None:
    run = json.loads((runs / "accelerate" / "memprof.json").read_text())["run"]
    assert run["integration"] == "accelerate"
    assert run["fsdp2"]["reshard_after_forward"] is True and run["fsdp2"]["param_groups"] == 1 + CONFIG["n_layer"]


def test_unsupported_sharding_is_refused_in_one_line(runs: Path) -> None:
    message = (runs / "dim1" / "refused.txt").read_text()
    assert "\n" not in message and "dim 1" in message and "dim-0" in message


def test_every_rank_alike_wording_is_fsdp2s_own() -> None:
    doc = _estimate_json(["--model", "gpt2-tiny", "--engine", "fsdp2", "--world-size", "4"])
    assert not any("last rank's partition carries padding" in a for a in doc["assumptions"])
    assert any("parameters and gradients alike on every rank" in a for a in doc["assumptions"])


# ---- plan and advise sweep FSDP2's own knobs ---------------------------------------------------

def _fsdp2_inputs(**kw) -> EstimateInputs:
    return EstimateInputs(model_config=preset_config("gpt2-large"), engine=Engine.FSDP2, torch_adam=True, world_size=2,
                          seq_len=1024, gpu_memory_bytes=12 * 2**30, **kw)


def test_plan_sweeps_reshard_and_offload() -> None:
    result = plan(_fsdp2_inputs(micro_batch=1), gpus=2, max_gpus=8)
    assert [(r.fsdp2.reshard_after_forward, r.fsdp2.offload_params) for r in result.rows] == [
        (False, False), (True, False), (False, True), (True, True)]
    assert all(r.zero_stage == 0 and r.label.startswith("FSDP2") for r in result.rows)
    keep, reshard = result.rows[0], result.rows[1]
    assert keep.peak_device_bytes > reshard.peak_device_bytes  # every block stays gathered
    assert result.to_json()["rows"][2]["fsdp2"] == {"reshard_after_forward": False, "offload_params": True}


def test_advise_offers_fsdp2_knobs_with_torchs_traffic() -> None:
    base = _fsdp2_inputs(micro_batch=8)
    result = advise(base, max_gpus=4)
    changes = {c.change for c in result.changes}
    assert {"reshard_after_forward=false", "offload_params=cpu", "precision=bf16"} <= changes
    assert not any(c.startswith("zero_stage") for c in changes)
    bf16 = next(c for c in result.changes if c.change == "precision=bf16")
    assert bf16.inputs.fsdp2.param_dtype == "bf16"  # MixedPrecisionPolicy: fp32 shards, bf16 gathers
    n = model_shape(preset_config("gpt2-large")).n_params
    costs = step_costs(base, n)
    keep = step_costs(base.with_(fsdp2=replace(base.fsdp2, reshard_after_forward=False)), n)
    assert costs.comm_bytes * 2 == keep.comm_bytes * 3  # 2 all-gathers + reduce-scatter against 1 + 1
    assert result.best is not None and result.best.inputs.engine == Engine.FSDP2


def test_advise_and_plan_take_lora_under_fsdp2_and_reduce_only_the_adapters() -> None:
    lora = LoraSetup(r=8, target_modules=("c_attn",))
    base = _fsdp2_inputs(micro_batch=2, peft=lora)
    shape = model_shape(preset_config("gpt2-large"), lora=lora)
    costs = step_costs(base, shape.n_params, shape.trainable.n_params)
    # fp32, reshard_after_forward: two all-gathers of every parameter, one reduce-scatter of the adapters
    assert costs.comm_bytes == (2 * shape.n_params + shape.trainable.n_params) * 4
    assert costs.lora == "r=8 on c_attn"
    result = advise(base, max_gpus=4)
    assert result.best is not None and result.best.inputs.peft == lora
    assert plan(base, gpus=2, max_gpus=8).rows


def test_advise_refuses_write_config_for_fsdp2(tmp_path: Path) -> None:
    from memprof.cli.advise import main as advise_main

    with pytest.raises(MemprofError, match="DeepSpeed JSON"):
        advise_main(["--model", "gpt2-tiny", "--engine", "fsdp2", "--gpu-memory", "80GiB",
                     "--write-config", str(tmp_path / "ds.json")])


# issue 17: under checkpointing (ckpt: 4 blocks) the forward peak is the last block's all-gather
# copy-out (FSDPParamGroup.wait_for_unshard): the previous block's flat output, still held in
# comm_ctx.all_gather_state, beside this block's, and this block's unsharded parameters; the
# activations then are each block's checkpointed input only, so this moment tops the end of the last
# block, which holds one flat output (the estimate without it: comm_buffers -9.9% of the peak)
def test_checkpointed_forward_peak_is_the_last_blocks_copy_out(runs: Path) -> None:
    doc = json.loads((runs / "ckpt" / "memprof.json").read_text())
    est = {r.rank: r for r in estimate(inputs_from_run(doc["run"])).ranks}
    root, block = _root_and_block()
    flat = WORLD * sum(map(_padded, block))  # one block's flat all-gather output, fp32 padded shards
    gathered = WORLD * sum(map(_padded, root)) + flat  # the root and the last block, unsharded
    for rank in doc["ranks"]:
        phase = rank["steps"][-1]["phases"]["forward"]
        measured, peak = phase["peak"]["device"], phase["peak_total"]
        estimated = est[rank["rank"]].phases["forward"]["device"]
        assert measured["comm_buffers"] == estimated["comm_buffers"] == 2 * flat
        shards = sum(map(_padded, _gpt2_shapes()[:2] + _gpt2_shapes()[-2:])) + CKPT_LAYERS * sum(map(_padded, block))
        assert measured["params"] == estimated["params"] == shards + gathered
        for cat in set(measured) | set(estimated):
            err = (estimated.get(cat, 0) - measured.get(cat, 0)) / peak
            assert abs(err) <= TOLERANCE, (rank["rank"], cat, measured.get(cat, 0), estimated.get(cat, 0), f"{err:+.1%}")


# issue 17, what `memprof compare --check` now gates by default: at every phase peak of every setup
# `other` is at most 1% of the peak, and every category within 3% of it
@pytest.mark.parametrize("setup", ["offload", "reshard", "keep", "bf16", "accelerate", "lora", "ckpt"])
def test_every_category_at_every_phase_peak(runs: Path, setup: str) -> None:
    from memprof.compare import compare_run

    doc = json.loads((runs / setup / "memprof.json").read_text())
    for rank in doc["ranks"]:
        for name, phase in rank["steps"][-1]["phases"].items():
            assert phase["peak"]["device"]["other"] <= 0.01 * phase["peak_total"], (rank["rank"], name, phase["peak"]["device"])
    cmp = compare_run(doc, estimate(inputs_from_run(doc["run"])).to_json())
    assert cmp.check_categories and not [r for r in cmp.rows if r.what == "category" and r.ok is False]
