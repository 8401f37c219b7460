"""The model-family registry (memprof/families/): every preset has a family, every family's HF
class names are real transformers classes the launcher builds, the estimator reads the family's
wording, and the family files stay torch-free."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from memprof.estimate import EstimateInputs, estimate
from memprof.families import FAMILIES, SUPPORTED_MODEL_TYPES, family_of
from memprof.families.common import ActivationQuery
from memprof.models import PRESETS, preset_config
from memprof.train.model import model_classes

REPO = Path(__file__).resolve().parents[1]


def test_every_preset_has_a_family_and_types_are_registered_once() -> None:
    assert all(family_of(cfg["model_type"]) is not None for cfg in PRESETS.values())
    types = [t for family in FAMILIES for t in family.model_types]
    assert len(types) == len(set(types)) and tuple(types) == SUPPORTED_MODEL_TYPES
    assert family_of("opt") is None and family_of(None) is None and family_of(["gpt2"]) is None


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_the_launcher_builds_the_classes_the_family_names(model_type: str) -> None:
    config_cls, model_cls = model_classes(model_type)
    assert (config_cls.__name__, model_cls.__name__) == family_of(model_type).hf_classes[model_type]


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "qwen2-tiny"])
def test_the_estimate_names_the_family_class_and_dropout(preset: str) -> None:
    config = preset_config(preset)
    family = family_of(config["model_type"])
    first = estimate(EstimateInputs(model_config=config, seq_len=64)).assumptions[0]
    assert first.startswith(f"activations of {family.causal_lm_class(config['model_type'])}, ")
    assert f"train mode ({family.train_mode})" in first


def test_the_activation_query_is_frozen() -> None:
    query = ActivationQuery(micro_batch=2, seq_len=64, element_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        query.seq_len = 128  # type: ignore[misc]


def test_family_files_import_without_torch() -> None:
    code = "import sys, memprof.families, memprof.models, memprof.estimate.activations; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
