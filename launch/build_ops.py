"""Compile DeepSpeed's ops for this accelerator once, before any launch (why: memprof/train/deepspeed_ops.py),
and memprof's own CPU allocation hook (memprof/measure/native/).

  DS_ACCELERATOR=cpu python launch/build_ops.py      # what `make install` runs
"""

import sys

from memprof.train.deepspeed_ops import build_allocation_hook, build_ops

if __name__ == "__main__":
    build_ops()
    build_allocation_hook()
    sys.exit(0)
