"""Entry point of ``launch/train.py``: validate, then train; bad input is one line and exit 2."""

from __future__ import annotations

import sys

from memprof.errors import MemprofError


def main(argv: list[str] | None = None) -> int:
    """Parse and validate ``argv`` (no torch import yet), then run the training loop.

    Returns the process exit code: 0 success, 2 bad input (one line on stderr, nothing trained),
    3 out of memory (see :data:`memprof.train.loop.EXIT_OUT_OF_MEMORY`).
    """
    from memprof.train.config import check_precision_supported, parse_args
    from memprof.train.deepspeed_ops import remember_cpu_info, use_venv_extensions_dir

    use_venv_extensions_dir()  # before DeepSpeed is imported: the ops `make install` compiled
    remember_cpu_info()  # and the CPU facts their build asked for (2.4 s of each rank's start-up)
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        from memprof.train.config import build_arg_parser

        build_arg_parser().print_help()
        return 0
    try:
        config = parse_args(argv, check_precision=check_precision_supported)
        from memprof.train.loop import run_training

        return run_training(config)
    except MemprofError as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
