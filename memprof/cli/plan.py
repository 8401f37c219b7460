"""``memprof plan``: the cheapest DeepSpeed configuration that fits a GPU memory size."""

from __future__ import annotations

import json

from memprof.argparsing import MemprofArgumentParser, positive_int
from memprof.cli.cli_args import add_setup_flags, inputs_from_args
from memprof.display.console import output_console
from memprof.display.tables import Column, print_tables
from memprof.errors import MemprofError
from memprof.estimate import plan
from memprof.units import format_bytes

SUMMARY = "find the cheapest configuration that fits a GPU memory size"


def build_parser() -> MemprofArgumentParser:
    p = MemprofArgumentParser(prog="memprof plan", description=f"{SUMMARY}: ZeRO stage and offload, cheapest first "
                              "(--engine fsdp2: reshard_after_forward and CPU offload).")
    add_setup_flags(p)
    p.add_argument("--gpus", type=positive_int("--gpus"), help="GPUs available (the cluster size)")
    p.add_argument("--max-gpus", type=positive_int("--max-gpus"),
                   help="largest GPU count to consider for 'fewest GPUs' (default --gpus)")
    p.add_argument("--model-states-only", action="store_true",
                   help="plan a model whose activations memprof does not estimate (a --params count, a model_type "
                        "without an activation model) on its model states alone")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    gpus = args.gpus
    if gpus is None:
        raise MemprofError("plan needs the cluster size: pass --gpus N")
    if args.zero_stage is not None or args.offload_optimizer is not None or args.offload_param is not None:
        raise MemprofError("plan chooses the ZeRO stage and offload itself: drop --zero-stage/--offload-*")
    if args.reshard_after_forward is not None:
        raise MemprofError("plan chooses FSDP2's reshard_after_forward itself: drop --reshard-after-forward")
    inputs = inputs_from_args(args, gpus)
    result = plan(inputs, gpus, args.max_gpus, model_states_only=args.model_states_only)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
        return 0
    console = output_console()
    usable = int(inputs.gpu_memory_bytes * (1 - inputs.headroom))
    title = "[bold]memprof plan[/bold]"
    if result.model_states_only:
        title += f" [bold](model states only: {result.activations_not_estimated})[/bold]"
    console.print(f"{title}: {inputs.model_name or inputs.n_params}, {inputs.precision}, {inputs.optimizer}, "
                  f"{gpus} GPUs of {format_bytes(inputs.gpu_memory_bytes)} (usable {format_bytes(usable)}), "
                  f"micro-batch {inputs.micro_batch}")
    fsdp2 = any(r.fsdp2 is not None for r in result.rows)
    columns = [Column("FSDP2 reshard after forward" if fsdp2 else "ZeRO stage"), Column("offload"), Column("peak per GPU", numeric=True),
               Column("host per node", numeric=True), Column("fits"),
               Column("largest micro-batch", numeric=True), Column(f"fewest GPUs (<= {result.max_gpus})", numeric=True)]
    # "opt->cpu" in the table (the row's label says "optimizer->cpu"): the 80-column table keeps one line per row
    rows = [[str(r.fsdp2.reshard_after_forward) if r.fsdp2 else str(r.zero_stage),
             r.offload_label.replace("optimizer->", "opt->") or "-", format_bytes(r.peak_device_bytes),
             format_bytes(r.host_bytes_per_node), "yes" if r.fits else "no",
             str(r.largest_micro_batch or "-"), str(r.fewest_gpus or "-")] for r in result.rows]
    print_tables(console, columns, rows)
    reasons: dict[str, list[str]] = {}
    for label, reason in result.refused:
        reasons.setdefault(reason, []).append(label)
    for reason, labels in reasons.items():
        console.print(f"not planned: {'; '.join(labels)} ({reason})", soft_wrap=True)
    best = result.cheapest
    if best is None:
        console.print("nothing fits" + (", even on model states alone" if result.model_states_only else "")
                      + ": use more GPUs (--max-gpus), a smaller micro-batch or sequence, or activation checkpointing"
                      + (", or more host memory per node (--host-memory)" if inputs.host_memory_bytes else ""))
    else:
        what = "whose model states fit" if result.model_states_only else "that fits"
        console.print(f"cheapest {what}: [bold]{best.label}[/bold]")
    return 0
