"""``memprof advise``: what to change in this setup so it fits, what each change saves and costs."""

from __future__ import annotations

import json
from typing import Any

from memprof.argparsing import MemprofArgumentParser, positive_int
from memprof.cli.cli_args import add_setup_flags, inputs_from_args
from memprof.display.console import output_console
from memprof.display.tables import Column, print_tables
from memprof.engines import Engine
from memprof.errors import MemprofError
from memprof.estimate.advise import COST_ORDER_TEXT, Advice, Change, advise
from memprof.estimate.config_writer import recommended_config
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.model_shapes import shape_of
from memprof.run.files import write_json_atomic
from memprof.units import format_bytes

SUMMARY = "say what to change so a setup fits a GPU, what each change saves and what it costs"


def build_parser() -> MemprofArgumentParser:
    p = MemprofArgumentParser(prog="memprof advise", description=f"{SUMMARY}. Takes the setup flags of "
                              "'memprof estimate' plus --gpu-memory (required).")
    add_setup_flags(p)
    p.add_argument("--max-gpus", type=positive_int("--max-gpus"),
                   help="largest GPU count you could use (default: the setup's own; more GPUs are never assumed)")
    p.add_argument("--write-config", metavar="PATH",
                   help="write the recommended setup as a DeepSpeed JSON (from --deepspeed-config when given)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.gpu_memory is None:
        raise MemprofError("advise needs the GPU memory size: pass --gpu-memory, e.g. --gpu-memory 80GiB")
    inputs = inputs_from_args(args, None)
    if args.write_config and inputs.engine == Engine.FSDP2:
        raise MemprofError("--write-config writes a DeepSpeed JSON, which --engine fsdp2 has none of: drop --write-config "
                           "and set the recommended fully_shard arguments in the script")
    _refuse_hopeless(inputs, args.max_gpus or inputs.world_size)
    result = advise(inputs, args.max_gpus)
    written = None
    if args.write_config:
        if result.best is None:
            raise MemprofError(f"nothing fits {format_bytes(result.usable_bytes)}, so there is no config to write: "
                               "drop --write-config, or raise --gpu-memory / --max-gpus")
        config, training_args = recommended_config(args.deepspeed_config, inputs, result.best.inputs)
        write_json_atomic(args.write_config, config)
        written = (args.write_config, training_args)
    if args.json:
        doc = result.to_json()
        if written:
            doc["written_config"] = {"path": written[0], "training_arguments": written[1]}
        print(json.dumps(doc, indent=1))
        return 0
    _render(result, written)
    return 0


def _refuse_hopeless(inp: EstimateInputs, max_gpus: int) -> None:
    """Exit 2 when the GPU cannot even hold its share of the parameters on every stage."""
    n_params = shape_of(inp).n_params
    share = n_params * (4 if inp.precision == "fp32" else 2) // max_gpus
    usable = int(inp.gpu_memory_bytes * (1 - inp.headroom))
    if usable < share:
        raise MemprofError(f"--gpu-memory {format_bytes(inp.gpu_memory_bytes)} (usable {format_bytes(usable)}) is below the "
                           f"model's own parameters even fully partitioned over {max_gpus} GPUs ({format_bytes(share)} each): "
                           "raise --gpu-memory or --max-gpus")


def _engine_words(inp: EstimateInputs) -> str:
    if inp.engine == Engine.FSDP2:
        return (f"FSDP2 reshard_after_forward {inp.fsdp2.reshard_after_forward}"
                + (", CPU offload" if inp.fsdp2.offload_params else ""))
    return f"ZeRO-{inp.zero_stage}"


def _render(result: Advice, written: tuple[str, list[str]] | None) -> None:
    console = output_console()
    inp, peak = result.base, result.base_peak
    console.print(f"[bold]memprof advise[/bold]: {inp.model_name or inp.n_params}, {_engine_words(inp)}, {inp.precision}, "
                  f"{inp.optimizer}, {inp.world_size} GPUs of {format_bytes(inp.gpu_memory_bytes)} "
                  f"(usable {format_bytes(result.usable_bytes)})")
    verdict = (f"fits, margin {format_bytes(result.margin_bytes)}" if result.base_fits
               else f"does not fit: {format_bytes(-result.margin_bytes)} over")
    console.print(f"1. the setup as given peaks at [bold]{format_bytes(peak.bytes)}[/bold] on rank {peak.rank} in "
                  f"{peak.phase}: {verdict}")
    rows = [[cat, format_bytes(b), f"{b / peak.bytes:.0%}"] for cat, b in peak.categories.items() if b]
    print_tables(console, [Column("category"), Column("at the peak", numeric=True), Column("share", numeric=True)], rows)
    console.print("2. one change at a time" + (" (the changes that buy the most room first)" if result.base_fits else ""))
    changes = sorted(result.changes, key=lambda c: -(c.saved_bytes or 0)) if result.base_fits else result.changes
    rows = [[str(i), c.description, _peak_cell(c), _saved_cell(c), _fits_cell(c)] for i, c in enumerate(changes, 1)]
    print_tables(console, [Column("#", numeric=True), Column("change"), Column("peak", numeric=True),
                           Column("saves", numeric=True), Column("fits")], rows)
    for i, c in enumerate(changes, 1):
        console.print(f"  #{i} cost: {c.cost}" if c.unknown is None else f"  #{i} unknown: {c.unknown}", soft_wrap=True)
    _render_best(console, result)
    surprises = [c for c in changes if c.why_not and c.unknown is None]
    if surprises:
        console.print("4. changes that do not help here, and why:")
        for c in surprises:
            console.print(f"  - {c.why_not}", soft_wrap=True)
    for note in result.notes:
        console.print(f"note: {note}", soft_wrap=True)
    if written:
        console.print(f"recommended DeepSpeed config written to {written[0]}"
                      + (f"; set TrainingArguments {', '.join(written[1])}" if written[1] else ""), soft_wrap=True)


def _render_best(console: Any, result: Advice) -> None:
    if result.base_fits and result.base_host_fits is not False:
        console.print(f"3. the setup fits as given, margin {format_bytes(result.margin_bytes)}: no change needed")
        if result.runner_up is not None:
            c = result.runner_up
            console.print(f"  cheapest other setup that fits ({COST_ORDER_TEXT}): {c.description}, peak "
                          f"{format_bytes(c.peak.bytes)}; cost: {c.cost}", soft_wrap=True)
        return
    console.print(f"3. cheapest combination that fits ({COST_ORDER_TEXT}):", soft_wrap=True)
    if result.best is None:
        near = result.closest
        console.print("  nothing fits" + (f"; closest: {near.description}, peak {format_bytes(near.peak.bytes)}, "
                                          f"{format_bytes(near.peak.bytes - result.usable_bytes)} over" if near else ""),
                      soft_wrap=True)
        return
    for label, c in (("best", result.best), ("runner-up", result.runner_up)):
        if c is not None:
            console.print(f"  {label}: [bold]{c.description}[/bold]: peak {format_bytes(c.peak.bytes)} on rank "
                          f"{c.peak.rank} in {c.peak.phase}, margin {format_bytes(result.usable_bytes - c.peak.bytes)}; "
                          f"cost: {c.cost}", soft_wrap=True)


def _peak_cell(c: Change) -> str:
    return "unknown" if c.peak is None else format_bytes(c.peak.bytes)


def _saved_cell(c: Change) -> str:
    if c.saved_bytes is None:
        return "-"
    return format_bytes(c.saved_bytes) if c.saved_bytes >= 0 else "-" + format_bytes(-c.saved_bytes)


def _fits_cell(c: Change) -> str:
    if c.fits is None:
        return "unknown"
    return ("yes" if c.fits else "no") + ("" if c.host_fits in (None, True) else " (host)")
