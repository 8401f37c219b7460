"""Trace a preset's backward in one process, plain torch, every param.grad kept (what ZeRO-0, and
ZeRO-1 without overlap_comm, do: no hook releases a gradient before backward returns), and print
the backward peak beside memprof's estimate for the same setup at ZeRO-0 on one rank.

    PYTHONPATH=$PWD python benchmarks/trace_backward_blocks.py llama-tiny --checkpointing

The trace counts the native allocation hook's device total (memprof.measure.native) beyond what
exists before forward (the parameters, the ids), op by op under a TorchDispatchMode; the estimate's
matching figure is its backward peak's grads + activations + comm buffers less the ids.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memprof.measure.allocation_hook_tracker import NativeAllocationTracker
from memprof.models import PRESETS
from memprof.train.model import build_model


class _Peak(TorchDispatchMode):
    def __init__(self, tracker: NativeAllocationTracker, base: int) -> None:
        super().__init__()
        self.tracker, self.base, self.peak, self.op = tracker, base, 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        now = self.tracker.device_total - self.base
        if now > self.peak:
            self.peak, self.op = now, str(func)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--layers", type=int, help="override the preset's layer count (n_layer / num_hidden_layers)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--gas", type=int, default=1, help="backward passes before the traced one (grads kept)")
    a = ap.parse_args()
    cfg = dict(PRESETS[a.model])
    if a.layers:
        cfg["n_layer" if "n_layer" in cfg else "num_hidden_layers"] = a.layers
    model = build_model(cfg, 0, activation_checkpointing=a.checkpointing)
    ids = torch.randint(0, 500, (a.micro_batch, a.seq_len))
    for _ in range(a.gas - 1):  # earlier micro-steps: their param.grad stay (no zero_grad before the boundary)
        model(input_ids=ids, labels=ids).loss.backward()
    tracker = NativeAllocationTracker().__enter__()
    base = tracker.device_total - sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    loss = model(input_ids=ids, labels=ids).loss
    tracer = _Peak(tracker, base)
    with tracer:
        loss.backward()
    cfg_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(cfg, cfg_file)
    cfg_file.close()
    flags = ["--model-config", cfg_file.name, "--zero-stage", "0", "--precision", "fp32", "--optimizer", "sgd", "--gpus-per-node", "1",
             "--micro-batch", str(a.micro_batch),
             "--gradient-accumulation-steps", str(a.gas), "--seq-len", str(a.seq_len), "--device-type", "cpu", "--json"]
    if a.checkpointing:
        flags.append("--activation-checkpointing")
    est = json.loads(subprocess.run([sys.executable, "-m", "memprof", "estimate", *flags], check=True,
                                    capture_output=True, text=True).stdout)
    dev = est["ranks"][0]["phases"]["backward"]["peak"]["device"]
    estimated = dev["grads"] + dev["activations"] + dev["comm_buffers"] - ids.numel() * 8
    print(f"{a.model} checkpointing={a.checkpointing}: traced backward peak {tracer.peak:,} B at {tracer.op}; "
          f"estimated {estimated:,} B ({(estimated - tracer.peak) / tracer.peak:+.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
