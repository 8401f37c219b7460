"""``memprof plan``: the cheapest DeepSpeed configuration that fits a GPU memory size."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from memprof.estimate.cli_args import OneLineParser, _int, add_setup_flags, inputs_from_args
from memprof.errors import MemprofError
from memprof.estimate import plan
from memprof.units import format_bytes


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="memprof plan", description="Find the cheapest ZeRO/offload setup that fits.")
    add_setup_flags(p)
    p.add_argument("--gpus", help="GPUs available (the cluster size)")
    p.add_argument("--max-gpus", help="largest GPU count to consider for 'fewest GPUs' (default --gpus)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    gpus = _int(args.gpus, "--gpus")
    if gpus is None:
        raise MemprofError("plan needs the cluster size: pass --gpus N")
    if args.zero_stage is not None or args.offload_optimizer is not None or args.offload_params is not None:
        raise MemprofError("plan chooses the ZeRO stage and offload itself: drop --zero-stage/--offload-*")
    inputs = inputs_from_args(args, gpus)
    result = plan(inputs, gpus, _int(args.max_gpus, "--max-gpus"))
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
        return 0
    console = Console(highlight=False)
    usable = int(inputs.gpu_memory_bytes * (1 - inputs.headroom))
    console.print(f"[bold]memprof plan[/bold]: {inputs.model_name or inputs.n_params}, {inputs.precision}, {inputs.optimizer}, "
                  f"{gpus} GPUs of {format_bytes(inputs.gpu_memory_bytes)} (usable {format_bytes(usable)}), micro-batch {inputs.micro_batch}")
    t = Table()
    for col in ("configuration", "peak per GPU", "host per node", "fits", "largest micro-batch", f"fewest GPUs (<= {result.max_gpus})"):
        t.add_column(col)
    for r in result.rows:
        t.add_row(r.label, format_bytes(r.peak_device_bytes), format_bytes(r.host_bytes_per_node), "yes" if r.fits else "no",
                  str(r.largest_micro_batch or "-"), str(r.fewest_gpus or "-"))
    console.print(t)
    best = result.cheapest
    console.print(f"cheapest that fits: [bold]{best.label}[/bold]" if best else
                  "nothing fits: use more GPUs (--max-gpus), a smaller micro-batch or sequence, or activation checkpointing"
                  + (", or more host memory per node (--host-memory)" if inputs.host_memory_bytes else ""))
    return 0
