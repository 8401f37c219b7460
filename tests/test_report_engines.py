"""An FSDP2 run beside a DeepSpeed ZeRO-3 run of the same model, as a sweep (issue 19).

The two run documents are REAL: 2 gloo CPU ranks each, gpt2-tiny, micro-batch 2 x 64 tokens, torch /
DeepSpeed AdamW, 3 steps (tests/fixtures/make_engine_fixtures.py made them): a user's FSDP2 loop under
MemoryProfiler (``fully_shard`` on each block and the root; no stored estimate, as README's own loop)
and the launcher at ZeRO-3 with its buckets set. Expected bytes are derived here from gpt2-tiny's
layer shapes and each engine's partition rule, or read from the raw JSON with ``json`` (not memprof).
"""

from __future__ import annotations

import copy
import json
import re
from math import ceil
from pathlib import Path

import pytest

from memprof.cli import main as memprof_main
from memprof.report import write_report
from memprof.report.data import build_report_data
from memprof.run.files import load_run

FIX = Path(__file__).parent / "fixtures" / "report" / "engines"
FSDP2, ZERO3 = "fsdp2_gpt2_tiny.json", "zero3_gpt2_tiny.json"
CATS = ["params", "master_params", "grads", "optimizer_state", "comm_buffers", "activations", "other"]
N = 2
H, V, POS, I, LAYERS = 64, 512, 256, 256, 2  # gpt2-tiny (memprof/models.py PRESETS)
# GPT2LMHeadModel.parameters() (lm_head tied to wte): Conv1D weights are (in, out)
BLOCK = [(H,), (H,), (H, 3 * H), (3 * H,), (H, H), (H,), (H,), (H,), (H, I), (I,), (I, H), (H,)]
SHAPES = [(V, H), (POS, H)] + BLOCK * LAYERS + [(H,), (H,)]
NUMELS = [s[0] * (s[1] if len(s) > 1 else 1) for s in SHAPES]
P = sum(NUMELS)
Z3_PERSISTENCE = 256  # the fixture's stage3_param_persistence_threshold


def raw(name: str) -> dict:
    return json.loads((FIX / name).read_text())


def rest(name: str, rank: int) -> dict:
    return raw(name)["ranks"][rank]["steps"][-1]["phases"]["step"]["end"]


def fsdp2_shard_bytes() -> int:
    """fp32 dim-0 shards: ceil(rows / N) rows of every parameter (torch _fsdp_param.py pads dim 0)."""
    return 4 * sum(ceil(s[0] / N) * (s[1] if len(s) > 1 else 1) for s in SHAPES)


def zero3_partition() -> int:
    """Elements of one rank's ZeRO-3 partitions: ceil(numel / N) of every parameter
    (partition_parameters.py _partition_param: each parameter's flat tensor split N ways, padded)."""
    return sum(ceil(m / N) for m in NUMELS)


def zero3_persistent() -> int:
    """Elements kept whole on every rank besides the partitions: parameters of at most the
    persistence threshold stay gathered (ds_persist), as N padded partitions."""
    return sum(N * ceil(m / N) for m in NUMELS if m <= Z3_PERSISTENCE)


@pytest.fixture(scope="module")
def sweep() -> dict:
    docs = [load_run(FIX / FSDP2), load_run(FIX / ZERO3)]
    return build_report_data(docs, [FSDP2, ZERO3], estimate_missing=True)


def test_the_fixtures_are_what_they_claim():
    f, z = raw(FSDP2), raw(ZERO3)
    assert P == 149_248
    assert f["run"]["fsdp2"]["reshard_after_forward"] is True and f["run"]["fsdp2"]["sharded_dtype"] == "float32"
    assert "deepspeed_config" not in f["run"] and f["estimate"] is None  # a user loop: profiler.finish()
    assert z["run"]["zero_stage"] == 3 and z["estimate"] is not None
    for key in ("model", "world_size", "micro_batch", "seq_len", "optimizer"):
        assert f["run"][key] == z["run"][key], key
    # resident states derived from the layer shapes and each engine's partition rule
    for rank in range(N):
        fr, zr = rest(FSDP2, rank)["device"], rest(ZERO3, rank)["device"]
        assert fr["params"] == fsdp2_shard_bytes() == 4 * P // 2
        # torch AdamW: exp_avg and exp_avg_sq shaped like the shards, plus a 4-byte step per tensor
        assert fr["optimizer_state"] == 2 * fsdp2_shard_bytes() + 4 * len(SHAPES)
        assert zr["params"] == 4 * (zero3_partition() + zero3_persistent())
        assert zr["master_params"] == 4 * zero3_partition() and zr["optimizer_state"] == 8 * zero3_partition()


def test_each_run_is_named_by_its_own_engine(sweep):
    f, z = sweep["runs"]
    assert f["label"] == "gpt2-tiny · FSDP2 reshard_after_forward=True · adamw · fp32 · N=2"
    assert z["label"] == "gpt2-tiny · ZeRO-3 · adamw · fp32 · N=2"
    assert (f["engine"]["name"], z["engine"]["name"]) == ("fsdp2", "deepspeed")
    fs = {s["name"]: s["value"] for s in f["engine"]["settings"]}
    assert fs["reshard_after_forward"] == "True"
    assert fs["param_dtype"].startswith("none") and fs["reduce_dtype"].startswith("none")
    assert fs["sharded parameters"] == "fp32, dim-0 shards over 2 ranks"
    assert fs["communication"].startswith(f"{1 + LAYERS} fully_shard groups")  # each block and the root
    zs = {s["name"]: s["value"] for s in z["engine"]["settings"]}
    assert zs["ZeRO stage"] == "3"
    assert zs["reduce_bucket_size"] == "50,000 elements"
    assert zs["stage3_prefetch_bucket_size"] == "50,000 elements"
    assert zs["stage3_param_persistence_threshold"] == "256 elements"
    assert zs["stage3_max_live_parameters"] == "1,000,000,000 elements (DeepSpeed's default)"
    assert zs["overlap_comm"] == "True (DeepSpeed's default at stage 3)"
    assert "allgather_bucket_size" not in zs  # a stage-1/2 size: not a ZeRO-3 setting
    summary = {r["field"]: r["value"] for r in f["summary"]}
    assert summary["ZeRO stage"].startswith("none: FSDP2")
    assert summary["Engine"].startswith("FSDP2 (torch fully_shard): reshard_after_forward True")
    assert summary["Precision"] == "fp32"
    # the FSDP2 page shows the run's fsdp2 record where a DeepSpeed page shows its config
    assert f["engine"]["record"] == raw(FSDP2)["run"]["fsdp2"]


def test_the_fsdp2_estimate_is_computed_and_said_so(sweep):
    f, z = sweep["runs"]
    assert f["estimate_origin"]["kind"] == "computed" and z["estimate_origin"]["kind"] == "stored"
    assert f["has_estimate"] and f["check"] is not None
    for rank in f["ranks"]:
        cells = {(c["location"], c["category"]): c for c in rank["cells"]}
        assert cells[("device", "params")]["estimated"] == fsdp2_shard_bytes()
        assert cells[("device", "optimizer_state")]["estimated"] == 2 * fsdp2_shard_bytes() + 4 * len(SHAPES)
    # without estimate_missing the same document shows measurements only
    alone = build_report_data([load_run(FIX / FSDP2)])["runs"][0]
    assert not alone["has_estimate"] and alone["estimate_origin"] == {"kind": None, "why": None}


def test_side_by_side_every_category_per_rank_measured_and_estimated(sweep):
    sb = sweep["sweep"]["side_by_side"]
    assert [(c["run"], c["rank"], c["engine"]) for c in sb["columns"]] == [
        (0, 0, "fsdp2"), (0, 1, "fsdp2"), (1, 0, "deepspeed"), (1, 1, "deepspeed")]
    assert [h["scheme"] for h in sb["runs"]] == ["FSDP2", "ZeRO-3"]
    assert [h["estimate_origin"] for h in sb["runs"]] == ["computed", "stored"]
    assert sb["same_model"] and sb["models"] == [{"model": "gpt2-tiny", "n_params": P}]
    rows = {(r["moment"], r["location"], r["category"]): r["cells"] for r in sb["rows"]}
    assert len(rows) == 4 * 8  # at rest + 3 phase peaks, 7 categories + total, device only (no host bytes)
    docs = [raw(FSDP2), raw(ZERO3)]
    for j, col in enumerate(sb["columns"]):
        doc = docs[col["run"]]
        last = doc["ranks"][col["rank"]]["steps"][-1]["phases"]
        for cat in CATS:
            assert rows[("rest", "device", cat)][j]["measured"] == last["step"]["end"]["device"][cat]
            for phase in ("forward", "backward", "step"):
                assert rows[(phase, "device", cat)][j]["measured"] == last[phase]["peak"]["device"][cat]
        assert rows[("rest", "device", "total")][j]["measured"] == sum(last["step"]["end"]["device"].values())
        for phase in ("forward", "backward", "step"):
            assert rows[(phase, "device", "total")][j]["measured"] == last[phase]["peak_total"]
    # the stored ZeRO-3 estimate, cell by cell
    est = raw(ZERO3)["estimate"]["ranks"]
    for j in (2, 3):
        e = next(r for r in est if r["rank"] == sb["columns"][j]["rank"])
        for cat in CATS:
            cell = rows[("rest", "device", cat)][j]
            assert cell["estimated"] == e["device"][cat]
            m = cell["measured"]
            assert cell["error"] == (None if m == 0 and e["device"][cat] == 0 else pytest.approx((e["device"][cat] - m) / m))
        assert rows[("backward", "device", "total")][j]["estimated"] == e["phases"]["backward"]["peak_total"]
    # the two engines' resident params, side by side: FSDP2's shards beside ZeRO-3's partitions + persistent
    assert [c["measured"] for c in rows[("rest", "device", "params")]] == (
        [fsdp2_shard_bytes()] * 2 + [4 * (zero3_partition() + zero3_persistent())] * 2)


def test_sharding_saving_names_fsdp2_not_a_zero_stage(sweep):
    (group,) = sweep["sweep"]["zero"]
    pts = {p["scheme"]: p for p in group["points"]}
    assert set(pts) == {"ZeRO-3", "FSDP2"} and pts["FSDP2"]["stage"] is None and pts["ZeRO-3"]["stage"] == 3
    # the paper's stage 3 in fp32 with AdamW: (4 + 4 + 8) Ψ / N, for both (FSDP2 keeps fp32 shards and grads)
    assert pts["FSDP2"]["formula"] == pts["ZeRO-3"]["formula"] == 16 * P // N
    assert pts["FSDP2"]["formula_saving"] == pytest.approx(1 - 1 / N)
    worst = max(sum(rest(FSDP2, r)[loc][c] for loc in ("device", "host") for c in CATS[:4]) for r in range(N))
    assert pts["FSDP2"]["measured"] == worst
    assert pts["FSDP2"]["measured_saving"] is None  # no measured ZeRO-0 run in the sweep


def _fsdp2_variant(**record) -> dict:
    doc = copy.deepcopy(raw(FSDP2))
    doc["run"]["fsdp2"].update(record)
    return doc


def test_fsdp2_knobs_in_the_label_and_settings():
    doc = _fsdp2_variant(reshard_after_forward=False, param_dtype="bfloat16", reduce_dtype="float32",
                         offload_params="cpu")
    run = build_report_data([doc])["runs"][0]
    assert run["label"] == ("gpt2-tiny · FSDP2 reshard_after_forward=False, param bf16, reduce fp32 · adamw · bf16 · "
                            "N=2 · param offload cpu")
    s = {x["name"]: x["value"] for x in run["engine"]["settings"]}
    assert (s["reshard_after_forward"], s["param_dtype"], s["reduce_dtype"]) == ("False", "bf16", "fp32")
    assert s["offload"] == "params cpu (CPUOffloadPolicy)"
    summary = {r["field"]: r["value"] for r in run["summary"]}
    assert summary["Offload"].startswith("params: cpu (CPUOffloadPolicy")
    # a run that also records a precision (accelerate's mixed_precision): the fsdp2 record decides, as
    # inputs_from_run does
    doc["run"]["precision"] = "fp32"
    assert " · bf16 · " in build_report_data([doc])["runs"][0]["label"]
    groups_differ = build_report_data([_fsdp2_variant(reshard_after_forward=None)])["runs"][0]
    assert "reshard_after_forward=mixed" in groups_differ["label"]


def test_fsdp2_formula_only_for_float32_shards():
    docs = [_fsdp2_variant(param_dtype="bfloat16"), _fsdp2_variant(sharded_dtype="bfloat16")]
    data = build_report_data(docs, estimate_missing=True)  # the parameter count: the computed estimate's
    assert [r["parameters"]["n_params"] for r in data["runs"]] == [P, P]
    pts = [p for g in data["sweep"]["zero"] for p in g["points"]]
    by_label = {p["label"]: p for p in pts}
    # bf16 compute, fp32 shards: the shards are what the formula counts
    assert by_label[data["runs"][0]["label"]]["formula"] == 16 * P // N
    assert by_label[data["runs"][1]["label"]]["formula"] is None  # bf16 shards: no row of the paper


def test_a_run_without_a_model_name_or_estimable_setup():
    doc = copy.deepcopy(raw(FSDP2))
    del doc["run"]["model"]
    doc["run"]["fsdp2"]["param_dtype"] = "float8_e4m3fn"  # a dtype memprof does not model
    run = build_report_data([doc], estimate_missing=True)["runs"][0]
    assert run["label"].startswith("gpt2 · FSDP2")  # the config's model_type
    assert run["estimate_origin"]["kind"] is None and not run["has_estimate"]
    assert "float8_e4m3fn" in run["estimate_origin"]["why"] and "\n" not in run["estimate_origin"]["why"]


def _cell(html: str, run: int, rank: int, moment: str, category: str) -> int:
    row = re.search(rf'<tr data-moment="{moment}" data-location="device" data-category="{category}".*?</tr>', html, re.S)
    assert row, (moment, category)
    cell = re.search(rf'<td class="num" data-run="{run}" data-rank="{rank}" data-bytes="(\d+)"', row.group(0))
    return int(cell.group(1))


def test_the_page_shows_the_side_by_side_cells(tmp_path, sweep):
    html = write_report([load_run(FIX / FSDP2), load_run(FIX / ZERO3)], tmp_path / "s.html",
                        estimate_missing=True).read_text()
    sb = sweep["sweep"]["side_by_side"]
    rows = {(r["moment"], r["category"]): r["cells"] for r in sb["rows"] if r["location"] == "device"}
    for j, col in enumerate(sb["columns"]):
        for moment in ("rest", "forward", "backward", "step"):
            for cat in (*CATS, "total"):
                assert _cell(html, col["run"], col["rank"], moment, cat) == rows[(moment, cat)][j]["measured"]
    assert 'data-engine="fsdp2"' in html and 'data-engine="deepspeed"' in html
    assert '<li data-setting="reshard_after_forward">reshard_after_forward: True</li>' in html
    assert '<li data-setting="stage3_param_persistence_threshold">stage3_param_persistence_threshold: 256 elements</li>' in html
    assert 'data-estimate-origin="computed"' in html and "estimate computed now" in html
    assert '<tr data-scheme="FSDP2" data-engine="fsdp2">' in html
    assert "ZeRO-None" not in html and "ZeRO-?" not in html
    assert '<pre class="engine-record">' in html and "The run records no DeepSpeed config" not in html


def test_memprof_report_takes_an_fsdp2_and_a_zero3_run(tmp_path, capsys):
    out = tmp_path / "sweep.html"
    assert memprof_main(["report", str(FIX / FSDP2), str(FIX / ZERO3), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    html = out.read_text()
    assert "Side by side: every category, per run and rank" in html and 'data-estimate-origin="computed"' in html
