"""Trainable and frozen parameters and the adapter config in the report (issue 16).

The LoRA run document is REAL: ``launch/train.py --peft-config`` on 2 gloo CPU ranks, gpt2-tiny,
LoRA r=4 on c_attn (lora_dropout 0.05), ZeRO-2, AdamW, fp32, 2 steps
(tests/fixtures/make_engine_fixtures.py). Expected counts are derived here from gpt2-tiny's layer
shapes and PEFT's adapter shapes (lora_A: r x in, lora_B: out x r per target), not read from memprof.

The launcher stored no estimate in it ("train.py: warning: no estimate recorded (MemprofError: the
run's peft_config: peft_type <PeftType.LORA: 'LORA'> is not modelled (only LORA))": at the end of the
run ``run["peft_config"]["peft_type"]`` is still peft's str-enum, which memprof.run.facts._json_value
passes through; in the written JSON it is "LORA"), so the report shows the estimate of the recorded
setup computed now (``estimate_missing``, what ``memprof report`` does) and says so.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

from memprof.cli import main as memprof_main
from memprof.report import write_report
from memprof.report.data import build_report_data
from memprof.run.files import load_run

FIX = Path(__file__).parent / "fixtures" / "report"
LORA = FIX / "lora" / "lora_gpt2_tiny_z2.json"
sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
from make_report_fixtures import synthetic_run  # noqa: E402

H, LAYERS, R = 64, 2, 4
P_TINY = 149_248  # gpt2-tiny (derived in test_report_data.py)
# c_attn (a Conv1D, in H, out 3H) in each block: lora_A r x H, lora_B 3H x r
ADAPTERS = LAYERS * (R * H + 3 * H * R)
N = 2


def raw() -> dict:
    return json.loads(LORA.read_text())


@pytest.fixture(scope="module")
def lora_run() -> dict:
    return build_report_data([load_run(LORA)], [LORA.name], estimate_missing=True)["runs"][0]


def test_the_fixture_is_what_it_claims():
    run = raw()["run"]
    assert ADAPTERS == 2048
    assert run["peft_config"]["r"] == R and run["peft_config"]["target_modules"] == ["c_attn"]
    assert run["peft_config"]["lora_dropout"] == 0.05 and run["zero_stage"] == 2 and run["world_size"] == N
    assert (run["n_trainable_params"], run["n_frozen_params"]) == (ADAPTERS, P_TINY)
    assert run["n_params"] == ADAPTERS + P_TINY and raw()["estimate"] is None


def test_without_an_estimate_the_split_is_the_recorded_one_only():
    run = build_report_data([load_run(LORA)])["runs"][0]
    p = run["parameters"]
    assert p["estimated"] is None and p["recorded"]["trainable"] == ADAPTERS and p["split"]
    assert not run["has_estimate"] and run["overhead"]["estimated"]["opt_bytes_per_trainable_param"] is None


def test_trainable_and_frozen_counts_recorded_and_estimated(lora_run):
    p = lora_run["parameters"]
    want = {"trainable": ADAPTERS, "frozen": P_TINY, "total": ADAPTERS + P_TINY,
            "trainable_share": pytest.approx(ADAPTERS / (ADAPTERS + P_TINY))}
    assert p["recorded"] == want  # requires_grad, counted by the launcher
    assert p["estimated"] == want  # ModelShape.trainable_mask, from the adapter config
    assert lora_run["estimate_origin"]["kind"] == "computed"
    assert p["split"] and "bytes are not split" in p["bytes_note"]
    rows = {r["field"]: r["value"] for r in lora_run["summary"]}
    assert rows["Parameters"].endswith(f"({ADAPTERS:,} trainable, {P_TINY:,} frozen; recorded)")
    assert rows["Adapters"] == "LoRA r=4, alpha 8 on c_attn, dropout 0.05, bias none"


def test_adapter_summary_and_label(lora_run):
    a = lora_run["parameters"]["adapter"]
    assert (a["type"], a["r"], a["lora_alpha"], a["targets"], a["dropout"], a["bias"]) == (
        "LORA", 4, 8, "c_attn", 0.05, "none")
    assert lora_run["label"] == "gpt2-tiny · ZeRO-2 · adamw · fp32 · N=2 · LoRA r=4 on c_attn"


def test_optimizer_state_per_trainable_parameter(lora_run):
    """AdamW keeps two fp32 moments for trainable parameters only: 8 bytes per trainable parameter
    over all ranks (ZeRO-2 partitions of the 2,048 adapter elements: 1,024 per rank, no padding)."""
    measured = sum(r["steps"][-1]["phases"]["step"]["end"][loc]["optimizer_state"]
                   for r in raw()["ranks"] for loc in ("device", "host"))
    assert measured == 8 * ADAPTERS
    o = lora_run["overhead"]
    assert o["n_trainable_params"] == ADAPTERS
    assert o["measured"]["opt_bytes_per_trainable_param"] == 8.0
    assert o["estimated"]["opt_bytes_per_trainable_param"] == 8.0
    # per parameter of the whole model the same bytes read as almost nothing
    assert o["measured"]["opt_bytes_per_param"] == pytest.approx(8 * ADAPTERS / raw()["run"]["n_params"])


def test_full_fine_tuning_records_no_split():
    run = build_report_data([synthetic_run(world_size=2, steps=2)])["runs"][0]
    p = run["parameters"]
    assert p["recorded"] is None and p["estimated"] is None and p["adapter"] is None and not p["split"]
    assert p["bytes_note"] is None and run["overhead"]["n_trainable_params"] is None
    assert {r["field"]: r["value"] for r in run["summary"]}["Parameters"] == f"{P_TINY:,}"


def test_frozen_parameters_without_adapters_and_other_target_forms():
    doc = synthetic_run(world_size=2, steps=2)
    doc["run"].update(n_trainable_params=1000, n_frozen_params=P_TINY - 1000)  # the user froze layers
    run = build_report_data([doc])["runs"][0]
    assert run["parameters"]["recorded"]["trainable"] == 1000 and run["parameters"]["adapter"] is None
    assert {r["field"]: r["value"] for r in run["summary"]}["Adapters"] == "none recorded"
    for targets, words in (("all-linear", "all-linear"), (r".*\.c_attn", "modules matching '.*\\\\.c_attn'"),
                           (["c_attn", "c_proj"], "c_attn, c_proj")):
        doc["run"]["peft_config"] = {"peft_type": "LORA", "r": 8, "target_modules": targets, "lora_dropout": 0.0,
                                     "bias": "none", "modules_to_save": ["lm_head"]}
        a = build_report_data([doc])["runs"][0]["parameters"]["adapter"]
        assert a["targets"] == words
        assert a["words"] == f"LoRA r=8 on {words}, dropout 0.0, bias none, modules_to_save lm_head"


def test_sweep_of_lora_beside_full_fine_tuning():
    full = synthetic_run(world_size=2, steps=2, stage=2)
    data = build_report_data([load_run(LORA), full], [LORA.name, "full"], estimate_missing=True)
    table = data["sweep"]["parameters"]
    assert [t["label"] for t in table] == [r["label"] for r in data["runs"]]
    assert table[0]["recorded"]["trainable"] == ADAPTERS and table[0]["adapter"].startswith("LoRA r=4")
    assert table[0]["estimated"]["frozen"] == P_TINY and table[0]["opt_bytes_per_trainable_param"] == 8.0
    assert table[1]["recorded"] is None and table[1]["adapter"] is None
    # a sweep without adapters or frozen parameters has no such table
    assert build_report_data([full, copy.deepcopy(full)])["sweep"]["parameters"] is None


def test_the_page_shows_the_counts_and_the_adapters(tmp_path):
    html = write_report([load_run(LORA)], tmp_path / "r.html", estimate_missing=True).read_text()
    for kind, (recorded, estimated) in {"trainable": (ADAPTERS, ADAPTERS), "frozen": (P_TINY, P_TINY)}.items():
        row = html[html.index(f'<tr data-kind="{kind}">'):]
        row = row[:row.index("</tr>")]
        assert row.count(f'data-count="{recorded}"') == 2 and recorded == estimated
    assert '<p class="adapter" data-r="4">Adapters: LoRA r=4, alpha 8 on c_attn, dropout 0.05, bias none.</p>' in html
    assert "bytes are not split" in html
    assert '<td class="num" data-kind="measured-opt-bptp">8.000</td>' in html


def test_the_sweep_page_has_the_parameters_table(tmp_path, capsys):
    full = tmp_path / "full.json"
    full.write_text(json.dumps(synthetic_run(world_size=2, steps=2)))
    out = tmp_path / "s.html"
    assert memprof_main(["report", str(LORA), str(full), "-o", str(out)]) == 0
    html = out.read_text()
    table = html[html.index('<table id="sweep-parameters">'):]
    table = table[:table.index("</table>")]
    assert f'<td class="num" data-kind="trainable-recorded">{ADAPTERS:,}</td>' in table
    assert f'<td class="num" data-kind="frozen-estimated">{P_TINY:,}</td>' in table
    assert "LoRA r=4, alpha 8 on c_attn" in table
