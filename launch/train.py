"""Train a randomly initialised GPT-2 under DeepSpeed with memprof's memory profiler.

  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/train.py --deepspeed_config configs/demo.json \
      --model gpt2-tiny --steps 3 --out reports/demo
  torchrun --nproc_per_node 2 launch/train.py --deepspeed_config configs/demo.json --out DIR
  python launch/train.py --deepspeed_config configs/demo.json --out DIR      # one process

See docs/launcher.md. All the work is in memprof.train; this file only hands over argv.
"""

import sys

from memprof.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
