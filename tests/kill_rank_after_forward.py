"""launch/train.py with a fault injected from outside the shipped loop (tests/test_launch_kill.py).

Used as the training script under the deepspeed launcher. It wraps the profiler's public
``StepContext.phase`` so that rank ``MEMPROF_KILL_RANK`` SIGKILLs itself as soon as the forward
phase of step ``MEMPROF_KILL_AT_STEP`` has been measured, then hands argv to ``launch/train.py``'s
entry point unchanged.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

from memprof.measure.profiler import StepContext
from memprof.train.cli import main

KILL_RANK = int(os.environ["MEMPROF_KILL_RANK"])
KILL_AT_STEP = int(os.environ["MEMPROF_KILL_AT_STEP"])
_measured_phase = StepContext.phase


def _phase_then_maybe_die(self: StepContext, name):  # type: ignore[no-untyped-def]
    @contextmanager
    def phase():
        with _measured_phase(self, name):
            yield
        if name == "forward" and self.step == KILL_AT_STEP and int(os.environ.get("RANK", "0")) == KILL_RANK:
            os.kill(os.getpid(), signal.SIGKILL)

    return phase()


StepContext.phase = _phase_then_maybe_die  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
