"""Compile DeepSpeed's ops for this accelerator once, before any launch (why: memprof/train/deepspeed_ops.py).

  DS_ACCELERATOR=cpu python launch/build_ops.py      # what `make install` runs
"""

import sys

from memprof.train.deepspeed_ops import build_ops

if __name__ == "__main__":
    build_ops()
    sys.exit(0)
