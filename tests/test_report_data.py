"""The report's plain data: at-rest figures, errors, ZeRO formula, downsampling, gaps.

Expected numbers are derived here from the raw fixture JSON (read with json, not memprof) and from
the ZeRO paper's expressions written out by hand. The fixtures are synthetic (see
tests/fixtures/make_report_fixtures.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from memprof.estimate.paper import zero_paper_model_states
from memprof.report.data import build_report_data
from memprof.run.files import load_run

FIX = Path(__file__).parent / "fixtures" / "report"
sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_report_fixtures import synthetic_run  # noqa: E402

CATS = ["params", "master_params", "grads", "optimizer_state", "comm_buffers", "activations", "other"]
P_TINY = 149_248  # gpt2-tiny: 512*64 + 256*64 + 2*(4*64 + 64*192+192 + 64*64+64 + 64*256+256 + 256*64+64) + 2*64


def raw(name: str) -> dict:
    return json.loads((FIX / name).read_text())


@pytest.fixture(scope="module")
def one_run() -> dict:
    return build_report_data([load_run(FIX / "one_run.json")], ["one_run.json"])["runs"][0]


def test_gpt2_tiny_param_count_used_by_fixtures():
    v, e, t, layers = 512, 64, 256, 2
    per_layer = 2 * (2 * e) + (e * 3 * e + 3 * e) + (e * e + e) + (e * 4 * e + 4 * e) + (4 * e * e + e)
    assert v * e + t * e + layers * per_layer + 2 * e == P_TINY
    assert raw("one_run.json")["run"]["n_params"] == P_TINY


def test_at_rest_is_last_step_end_of_step_phase_every_category(one_run):
    doc = raw("one_run.json")
    for entry, rank in zip(doc["ranks"], one_run["ranks"]):
        last = entry["steps"][-1]
        assert rank["at_rest_step"] == last["step"] == 5
        shown = {(c["location"], c["category"]): c for c in rank["cells"]}
        assert len(shown) == 14  # 2 locations x 7 categories, "other" included even when small
        for loc in ("device", "host"):
            for cat in CATS:
                assert shown[(loc, cat)]["measured"] == last["phases"]["step"]["end"][loc][cat]
        assert rank["measured_device_total"] == sum(last["phases"]["step"]["end"]["device"].values())


def test_estimate_error_is_relative_to_measured(one_run):
    doc = raw("one_run.json")
    m = doc["ranks"][1]["steps"][-1]["phases"]["step"]["end"]["device"]["other"]
    e = doc["estimate"]["ranks"][1]["device"]["other"]  # the fixture's deterministic 50,000 + 10,000 x rank
    cell = next(c for c in one_run["ranks"][1]["cells"] if c["location"] == "device" and c["category"] == "other")
    assert cell["estimated"] == e == 60_000 and m > e
    assert cell["error"] == pytest.approx((e - m) / m)
    # an estimate of nothing where something was measured is -100%, relative to the measurement
    doc["estimate"]["ranks"][1]["device"]["other"] = 0
    zero = build_report_data([doc])["runs"][0]
    cell = next(c for c in zero["ranks"][1]["cells"] if c["location"] == "device" and c["category"] == "other")
    assert cell["estimated"] == 0 and cell["error"] == pytest.approx(-1.0)  # (0 - m) / m
    params = next(c for c in one_run["ranks"][0]["cells"] if c["category"] == "params" and c["location"] == "device")
    assert params["error"] == 0.0  # the fixture's estimate matches its params exactly: 4 bytes x P
    assert params["measured"] == 4 * P_TINY


def test_phase_peaks_and_highest_peak_exact(one_run):
    doc = raw("one_run.json")
    for entry, rank in zip(doc["ranks"], one_run["ranks"]):
        best = max((s["phases"][p]["peak_total"], s["step"], p) for s in entry["steps"] for p in s["phases"])
        assert (rank["peak"]["bytes"], rank["peak"]["step"], rank["peak"]["phase"]) == best
        last = entry["steps"][-1]["phases"]
        assert [pp["measured"] for pp in rank["phase_peaks"]] == [last[p]["peak_total"] for p in ("forward", "backward", "step")]


def test_zero_paper_figures_7_5b_on_64():
    # Figure 1 of the ZeRO paper: Ψ = 7.5e9, N = 64, mixed-precision Adam (K = 12):
    # 16Ψ = 120 GB, 4Ψ + 12Ψ/64 = 31.4 GB, 2Ψ + 14Ψ/64 = 16.6 GB, 16Ψ/64 = 1.9 GB
    psi = 7_500_000_000
    got = [zero_paper_model_states(psi, s, 64, "adam", "fp16") for s in range(4)]
    assert got == [120_000_000_000, 31_406_250_000, 16_640_625_000, 1_875_000_000]


def test_zero_formula_fp32_and_optimizers():
    # fp32: A = B = 4 and no master copy; K = 8 for AdamW, 0 for plain SGD, 12 for AMSGrad
    assert zero_paper_model_states(P_TINY, 0, 2, "adamw", "fp32") == 16 * P_TINY
    assert zero_paper_model_states(P_TINY, 2, 4, "adamw", "fp32") == 4 * P_TINY + 12 * P_TINY // 4
    assert zero_paper_model_states(P_TINY, 1, 4, "sgd", "fp32") == 8 * P_TINY
    assert zero_paper_model_states(P_TINY, 3, 4, "amsgrad", "fp32") == 20 * P_TINY // 4
    assert zero_paper_model_states(P_TINY, 2, 2, "lion", "fp32") is None


def _sweep():
    files = sorted((FIX / "sweep").glob("*.json"))
    data = build_report_data([load_run(f) for f in files], [f.name for f in files])
    return files, data


def test_sweep_zero_saving_measured_and_formula():
    files, data = _sweep()
    adamw = next(g for g in data["sweep"]["zero"] if g["optimizer"] == "adamw")
    points = {(p["stage"], p["world_size"]): p for p in adamw["points"]}
    assert set(points) == {(0, 2), (2, 1), (2, 2), (2, 4), (3, 1), (3, 2), (3, 4)}

    def measured(name: str) -> int:  # worst rank's model states at rest, from the raw file
        doc = json.loads((FIX / "sweep" / name).read_text())
        return max(sum(r["steps"][-1]["phases"]["step"]["end"][loc][c] for loc in ("device", "host")
                       for c in CATS[:4]) for r in doc["ranks"])

    assert points[(2, 4)]["measured"] == measured("adamw_z2_n4.json")
    assert points[(2, 2)]["measured_saving"] == pytest.approx(1 - measured("adamw_z2_n2.json") / measured("adamw_z0_n2.json"))
    assert points[(3, 4)]["formula"] == 16 * P_TINY // 4
    assert points[(3, 4)]["formula_saving"] == pytest.approx(1 - 4 / 16)
    assert points[(2, 2)]["formula_saving"] == pytest.approx(1 - (4 + 12 / 2) / 16)
    # no measured stage-0 run at N = 4: no measured saving rather than a made-up one
    assert points[(2, 4)]["measured_saving"] is None


def test_sweep_loss_vs_memory_per_optimizer_and_labels():
    files, data = _sweep()
    lvm = data["sweep"]["loss_vs_memory"]
    assert set(lvm) == {"adamw", "sgd", "momentum", "rmsprop"}
    sgd_doc = json.loads((FIX / "sweep" / "sgd_z2_n2.json").read_text())
    final = [r["steps"][-1]["loss"] for r in sgd_doc["ranks"]]
    peak = max(s["phases"][p]["peak_total"] for r in sgd_doc["ranks"] for s in r["steps"] for p in s["phases"])
    (point,) = lvm["sgd"]
    assert point["final_loss"] == pytest.approx(sum(final) / len(final))
    assert point["peak_bytes"] == peak
    assert len({r["label"] for r in data["runs"]}) == len(files)
    per_rank = sum(len(r["ranks"]) for r in data["sweep"]["model_states"])
    assert per_rank == sum(len(json.loads(f.read_text())["ranks"]) for f in files)


def test_downsampled_chart_keeps_the_peak_and_tables_exact():
    doc = synthetic_run(world_size=2, steps=1000, seed=3)
    doc["ranks"][1]["steps"][637]["phases"]["backward"]["peak_total"] = 10**9  # a lone spike
    data = build_report_data([doc], max_chart_steps=100)["runs"][0]
    assert data["downsampled"] and data["n_steps"] == 1000
    t1 = data["timeline"][1]
    assert len(t1["x"]) <= 3 * 100
    assert max(t1["y"]) == 10**9  # bucket maxima: the spike survives downsampling
    assert data["ranks"][1]["peak"] == {"bytes": 10**9, "step": 638, "phase": "backward"}
    t0 = data["timeline"][0]
    assert max(t0["y"]) == max(s["phases"][p]["peak_total"] for s in doc["ranks"][0]["steps"] for p in s["phases"])
    assert len(data["loss"]["x"]) <= 100


def test_missing_rank_gap_is_marked():
    data = build_report_data([load_run(FIX / "missing_rank")])["runs"][0]
    assert data["missing_ranks"] == [1]
    assert [r["rank"] for r in data["ranks"]] == [0, 2]
    hm = data["heatmap"]
    assert hm["ranks"] == [0, 1, 2] and hm["missing"] == [1]
    assert all(v is None for v in hm["bytes"][1]) and all(v is not None for v in hm["bytes"][0])


def test_no_estimate():
    data = build_report_data([load_run(FIX / "no_estimate.json")])["runs"][0]
    assert data["has_estimate"] is False and data["estimate"] is None
    assert all(c["estimated"] is None and c["error"] is None for r in data["ranks"] for c in r["cells"])


def test_overhead_measured_from_rest_breakdown(one_run):
    rest = raw("one_run.json")["ranks"][0]["steps"][-1]["phases"]["step"]["end"]["device"]
    held = rest["params"] + rest["master_params"] + rest["optimizer_state"]
    m = one_run["overhead"]["measured"]
    assert m["ratio"] == pytest.approx(held / rest["params"])
    # fixture: stage 2 fp32 AdamW on 2 ranks: 4P + (4P + 8P)/2 over 4P = 2.5 (3.0 without ZeRO)
    assert m["ratio"] == pytest.approx(2.5, rel=1e-4)
    assert m["bytes_per_param"] == pytest.approx(10, rel=1e-4)
    # AdamW keeps 2 fp32 moments: 8 bytes per parameter over all ranks (+ padding of the partitions)
    assert m["opt_bytes_per_param"] == pytest.approx(8, abs=8 * 2 / P_TINY)
    assert one_run["overhead"]["estimated"]["ratio"] == pytest.approx(2.5, rel=1e-4)


def test_offload_shows_host_categories():
    data = build_report_data([load_run(FIX / "offload.json")])["runs"][0]
    assert data["shows_host"]
    host_opt = next(c for c in data["ranks"][0]["cells"] if c["location"] == "host" and c["category"] == "optimizer_state")
    assert host_opt["measured"] == 8 * -(-P_TINY // 2) > 0
    assert "host/optimizer_state" in data["heatmap"]["columns"]


def test_rank_without_complete_step_is_shown_not_dropped(tmp_path):
    from memprof.report import write_report

    doc = synthetic_run(world_size=2, steps=2, with_estimate=False)
    doc["ranks"][1]["steps"] = doc["ranks"][1]["steps"][:1]
    del doc["ranks"][1]["steps"][0]["phases"]["step"]  # died in its first optimizer step
    doc["ranks"][1]["oom"] = {"step": 1, "phase": "step", "message": "simulated budget exceeded"}
    data = build_report_data([doc])["runs"][0]
    r1 = data["ranks"][1]
    assert r1["measured"] is None and r1["at_rest_step"] is None
    assert r1["peak"]["step"] == 1 and r1["peak"]["phase"] in ("forward", "backward")
    assert data["heatmap"]["missing"] == [1]
    html = write_report([doc], tmp_path / "r.html").read_text()
    assert "no complete step recorded (1 step record(s), out of memory at step 1 step)" in html


def test_run_with_no_complete_step_anywhere_still_reports(tmp_path):
    # e.g. a single rank whose first optimizer step ran out of the simulated budget
    from memprof.report import write_report

    doc = synthetic_run(world_size=1, steps=1, with_estimate=False)
    del doc["ranks"][0]["steps"][0]["phases"]["step"]
    at_death = doc["ranks"][0]["steps"][0]["phases"]["backward"]["peak"]
    doc["ranks"][0]["oom"] = {"step": 1, "phase": "step", "breakdown": at_death, "total_bytes": 3_000_000,
                              "budget_bytes": 2 * 2**20, "message": "simulated budget exceeded"}
    doc["ranks"][0]["complete"] = False
    html = write_report([doc], tmp_path / "r.html").read_text()
    assert "No rank has a complete step" in html
    assert 'data-chart="run0-timeline"' in html and 'data-chart="run0-bars"' not in html
    assert "Rank 0 ran out of memory at step 1, step: 2.9 MiB of a budget of 2.0 MiB" in html
    assert "simulated budget exceeded" in html
    assert f'data-bytes="{at_death["device"]["params"]}"' in html  # the breakdown at the OOM


# ---- the report builds on memprof.compare ----------------------------------------------------

def _with_estimate() -> list[Path]:
    files = [FIX / "one_run.json", FIX / "offload.json", FIX / "xss.json", *sorted((FIX / "sweep").glob("*.json"))]
    assert all(raw(str(f.relative_to(FIX)))["estimate"] for f in files)
    return files


def _assert_report_equals_compare(doc: dict) -> None:
    from memprof.compare import compare_run

    cmp = compare_run(doc, doc["estimate"])
    run = build_report_data([doc])["runs"][0]
    by_rank = {r["rank"]: r for r in run["ranks"]}
    assert {r.rank for r in cmp.rows} == set(by_rank)
    for row in cmp.rows:
        shown = by_rank[row.rank]
        if row.what == "rest":
            fig = next(c for c in shown["cells"] if (c["location"], c["category"]) == (row.location, row.name))
        elif row.what == "peak":
            fig = next(p for p in shown["phase_peaks"] if p["phase"] == row.name)
        else:  # a category at a phase peak: the peak-composition view's cell
            phase, category = row.name.split("/")
            b = next(b for b in shown["phase_breakdowns"] if b["phase"] == phase)
            assert b["step"] == row.step
            fig = next(c for c in b["cells"] if (c["location"], c["category"]) == (row.location, category))
        assert (fig["measured"], fig["estimated"], fig["error"], fig["ok"]) == (row.measured, row.estimated, row.error, row.ok)
    shown_categories = sum(1 for r in run["ranks"] for b in r["phase_breakdowns"] for c in b["cells"]
                           if c["location"] == "device" and c["estimated"] is not None)
    assert shown_categories == sum(1 for r in cmp.rows if r.what == "category")
    assert run["rank_differences"] == [d.to_json() for d in cmp.rank_differences]
    assert run["check"]["ok"] == cmp.ok
    assert [(f["rank"], f["what"], f["name"]) for f in run["check"]["failures"]] == [
        (r.rank, r.what, r.name) for r in cmp.failures()]


@pytest.mark.parametrize("path", _with_estimate(), ids=lambda p: p.name)
def test_report_errors_equal_compare_for_every_fixture(path):
    _assert_report_equals_compare(load_run(path))


def test_report_and_compare_agree_on_failures_and_the_rank_0_fallback():
    doc = load_run(FIX / "one_run.json")
    # the estimate lists rank 0 only (one entry per distinct layout): rank 1 is compared with it
    doc["estimate"]["ranks"] = doc["estimate"]["ranks"][:1]
    doc["estimate"]["ranks"][0]["device"]["optimizer_state"] = int(doc["estimate"]["ranks"][0]["device"]["optimizer_state"] * 1.01)
    _assert_report_equals_compare(doc)
    run = build_report_data([doc])["runs"][0]
    # 1% over on optimizer_state (tolerance 0.5%) on both ranks: compare --check would fail
    assert run["check"]["ok"] is False
    # (rank 1's phase peaks, compared with rank 0's estimate, may fail the 3% peak tolerance too)
    resident = [(f["rank"], f["name"]) for f in run["check"]["failures"] if f["name"] not in ("forward", "backward", "step")]
    assert resident == [(0, "optimizer_state"), (1, "optimizer_state")]
    r1 = next(c for c in run["ranks"][1]["cells"] if c["category"] == "optimizer_state" and c["location"] == "device")
    measured = raw("one_run.json")["ranks"][1]["steps"][-1]["phases"]["step"]["end"]["device"]["optimizer_state"]
    assert r1["error"] == pytest.approx(0.01, abs=1 / measured) and r1["ok"] is False


# ---- what each peak is made of -----------------------------------------------------------------

def test_phase_peak_breakdowns_of_the_last_step_beside_the_estimate(one_run):
    doc = raw("one_run.json")
    for entry, rank in zip(doc["ranks"], one_run["ranks"]):
        last = entry["steps"][-1]
        est = doc["estimate"]["ranks"][entry["rank"]]["phases"]
        assert [b["phase"] for b in rank["phase_breakdowns"]] == ["forward", "backward", "step"]
        for b in rank["phase_breakdowns"]:
            m, e = last["phases"][b["phase"]]["peak"], est[b["phase"]]["peak"]
            assert b["step"] == last["step"] == 5
            assert b["measured_total"] == last["phases"][b["phase"]]["peak_total"] == sum(m["device"].values())
            assert b["estimated_total"] == est[b["phase"]]["peak_total"]
            peak = last["phases"][b["phase"]]["peak_total"]
            for c in b["cells"]:
                mv, ev = m[c["location"]][c["category"]], e[c["location"]][c["category"]]
                assert (c["measured"], c["estimated"]) == (mv, ev)
                if c["location"] == "device":  # a share of the phase's measured peak, 3% allowed
                    assert c["error"] == (ev - mv) / peak and c["ok"] == (abs(ev - mv) <= 0.03 * peak)
                else:  # host bytes at a device peak: shown, no error
                    assert c["error"] is None
        # the fixture's activations at the forward peak: 1.1 x 900,000 + noise < 8192, estimate 1.05 x
        fwd = next(c for c in rank["phase_breakdowns"][0]["cells"] if c["category"] == "activations" and c["location"] == "device")
        assert 990_000 <= fwd["measured"] < 990_000 + 8192 and fwd["estimated"] == 945_000


def test_phase_breakdowns_without_an_estimate():
    data = build_report_data([load_run(FIX / "no_estimate.json")])["runs"][0]
    b = data["ranks"][0]["phase_breakdowns"][1]
    assert b["estimated"] is None and b["estimated_total"] is None and all(c["error"] is None for c in b["cells"])
    assert b["measured_total"] == raw("no_estimate.json")["ranks"][0]["steps"][-1]["phases"]["backward"]["peak_total"]
    assert data["check"] is None and data["stacked_timeline"]["estimate"] is None


def test_stacked_timeline_follows_the_rank_with_the_highest_peak(one_run):
    doc = raw("one_run.json")
    peaks = {e["rank"]: max(s["phases"][p]["peak_total"] for s in e["steps"] for p in s["phases"]) for e in doc["ranks"]}
    worst = max(peaks, key=lambda r: (peaks[r], -r))
    t = one_run["stacked_timeline"]
    assert t["rank"] == worst
    entry = doc["ranks"][worst]
    want_x, want = [], {c: [] for c in CATS}
    for s in entry["steps"]:
        for i, phase in enumerate(("forward", "backward", "step")):
            for k, dx in (("peak", 0), ("end", 1 / 6)):
                want_x.append(s["step"] + i / 3 + dx)
                for c in CATS:
                    want[c].append(s["phases"][phase][k]["device"][c])
    assert t["x"] == pytest.approx(want_x) and t["device"] == want
    assert t["total"] == [sum(want[c][i] for c in CATS) for i in range(len(want_x))]
    # the estimate at the moments it models: each phase's peak, and at rest after the step
    est = doc["estimate"]["ranks"][worst]
    per_step = [est["phases"]["forward"]["peak_total"], est["phases"]["backward"]["peak_total"],
                est["phases"]["step"]["peak_total"], sum(est["device"].values())]
    assert t["estimate"]["y"] == per_step * 5
    assert t["estimate"]["x"] == pytest.approx([s + dx for s in range(1, 6) for dx in (0, 1 / 3, 2 / 3, 2 / 3 + 1 / 6)])


def test_stacked_timeline_downsampled_keeps_the_spike_step_whole():
    doc = synthetic_run(world_size=2, steps=1000, seed=3)
    spike = doc["ranks"][1]["steps"][637]["phases"]["backward"]
    spike["peak"]["device"]["activations"] += 10**9
    spike["peak_total"] += 10**9
    t = build_report_data([doc], max_chart_steps=100)["runs"][0]["stacked_timeline"]
    assert t["rank"] == 1 and len(t["x"]) <= 6 * 100
    i = t["total"].index(max(t["total"]))
    assert (t["step"][i], t["phase"][i], t["kind"][i]) == (638, "backward", "peak")
    assert {c: t["device"][c][i] for c in CATS} == spike["peak"]["device"]
    assert {c: t["device"][c][i + 1] for c in CATS} == spike["end"]["device"]  # that step's end, not a mix


def test_a_bad_breakdown_the_stacked_timeline_reads_is_named():
    from memprof.errors import MemprofError

    doc = synthetic_run(world_size=2, steps=3, seed=0)
    worst = max(range(2), key=lambda r: max(s["phases"][p]["peak_total"] for s in doc["ranks"][r]["steps"] for p in s["phases"]))
    doc["ranks"][worst]["steps"][0]["phases"]["forward"]["end"]["device"]["grads"] = "big"  # not the last step
    with pytest.raises(MemprofError, match=rf"run 1: ranks\.{worst}\.steps\.0\.phases\.forward\.end\.device\.grads"):
        build_report_data([doc])


def test_summary_shows_the_launch_settings():
    doc = synthetic_run(world_size=2, steps=2)
    doc["run"].update(micro_batch=2, gradient_accumulation_steps=4, activation_checkpointing=True)
    rows = {r["field"]: r for r in build_report_data([doc])["runs"][0]["summary"]}
    assert rows["Gradient accumulation"]["value"] == "4"
    assert rows["Samples per optimizer step"]["value"] == "16 (2 x 4 x 2 ranks)"  # 2 x 4 x 2
    assert rows["Activation checkpointing"]["value"] == "True"
    assert rows["Micro-batch x sequence"]["value"] == "2 x 64"
    settings = [f for f, r in rows.items() if r["setting"]]
    assert settings == ["World size", "Engine", "ZeRO stage", "Precision", "Micro-batch x sequence",
                        "Gradient accumulation", "Samples per optimizer step", "Activation checkpointing", "Offload",
                        "Adapters"]
    # a DeepSpeed run names its stage, and the stage's ZeRO sizes: the config's (the fixture sets
    # reduce_bucket_size), else DeepSpeed 0.19.8's defaults (zero/config.py: 5e8 elements; overlap_comm
    # None becomes stage == 3)
    assert doc["run"]["deepspeed_config"]["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 500_000}
    assert rows["Engine"]["value"] == ("DeepSpeed ZeRO stage 2: reduce_bucket_size 500,000 elements; "
                                       "allgather_bucket_size 500,000,000 elements (DeepSpeed's default); "
                                       "overlap_comm False (DeepSpeed's default at stage 2)")
    assert rows["ZeRO stage"]["value"] == "2" and rows["Adapters"]["value"] == "none recorded"
