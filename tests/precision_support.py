"""Which precisions DeepSpeed's CPU accelerator supports on this machine, for tests that launch
CPU ranks in fp16 or bf16: such a case skips, with the reason, where the accelerator lacks the
precision (DeepSpeed's engine would refuse it: "Type fp16 is not supported on your device"), and
runs where it has it.

DeepSpeed 0.19.8 ``accelerator/cpu_accelerator.py``: ``is_fp16_supported()`` is
``torch.ops.mkldnn._is_mkldnn_fp16_supported()`` (oneDNN fp16 kernels: AVX512-FP16 or AMX-FP16),
``is_bf16_supported()`` is always true. Asked once, in a subprocess with DS_ACCELERATOR=cpu as the
launched ranks have it (the test process's own accelerator may be another one).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import Any

import pytest

_ASK = ("import json; from deepspeed.accelerator import get_accelerator as g; a = g(); "
        "print(json.dumps({'device': a.device_name(), 'fp16': bool(a.is_fp16_supported()), 'bf16': bool(a.is_bf16_supported())}))")


@functools.lru_cache(maxsize=1)
def cpu_accelerator_precisions() -> dict[str, Any]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", _ASK], capture_output=True, text=True, env=env, timeout=120, check=True)
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["device"] == "cpu", answer
    return {"fp32": True, **answer}


def precision_of(ds_config: dict[str, Any]) -> str:
    """fp16, bf16 or fp32, as DeepSpeed reads the blocks (bf16 before the legacy bfloat16)."""
    if (ds_config.get("fp16") or {}).get("enabled") is True:
        return "fp16"
    bf16 = ds_config.get("bf16") if ds_config.get("bf16") is not None else ds_config.get("bfloat16")
    return "bf16" if (bf16 or {}).get("enabled") is True else "fp32"


def unsupported_reason(precision: str) -> str | None:
    """Why a CPU launch in ``precision`` cannot run here, or None when it can."""
    if cpu_accelerator_precisions()[precision]:
        return None
    return (f"DeepSpeed's CPU accelerator lacks {precision} on this machine "
            f"(is_{precision}_supported() is false; fp16 needs oneDNN's AVX512-FP16/AMX-FP16 kernels)")


def skip_unless_cpu_supports(precision: str) -> None:
    reason = unsupported_reason(precision)
    if reason is not None:
        pytest.skip(reason)
