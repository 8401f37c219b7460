"""What a run records about PEFT adapters (memprof.run.facts.peft_facts), read back as the estimate
reads it: a real peft.PeftModel, its recorded config plain JSON values."""

from __future__ import annotations

import json

import pytest

peft = pytest.importorskip("peft")

from memprof.models import preset_config  # noqa: E402
from memprof.peft_config import lora_setup_from_dict  # noqa: E402
from memprof.run.facts import peft_facts  # noqa: E402
from memprof.train.model import build_model  # noqa: E402


def _lora_model():
    model = build_model(preset_config("gpt2-tiny"), seed=0)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"]))


def test_recorded_peft_config_is_plain_json_that_the_estimate_reads() -> None:
    facts = peft_facts(_lora_model())
    cfg = facts["peft_config"]
    # peft's PeftType is a str subclass: recorded as the plain string, not the enum (whose str() is
    # "PeftType.LORA" and was refused by the reader, so a LoRA launch saved no estimate)
    assert type(cfg["peft_type"]) is str and cfg["peft_type"] == "LORA"
    assert json.loads(json.dumps(facts)) == facts
    setup = lora_setup_from_dict(cfg)
    assert setup is not None
    # gpt2-tiny: 2 blocks, c_attn 64 -> 192; LoRA r=4 adds A (4 x 64) and B (192 x 4) per block
    assert facts["n_trainable_params"] == 2 * (4 * 64 + 192 * 4)
