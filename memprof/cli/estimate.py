"""``memprof estimate``: predicted per-rank memory by category, at rest and at each phase's peak."""

from __future__ import annotations

import json

from memprof.argparsing import MemprofArgumentParser, positive_int
from memprof.categories import CATEGORIES, PHASES
from memprof.cli.cli_args import add_setup_flags, inputs_from_args
from memprof.display.console import output_console
from memprof.display.tables import Column, print_tables
from memprof.engines import Engine
from memprof.estimate import Estimate, estimate
from memprof.estimate.inputs import EstimateInputs
from memprof.units import format_bytes

SUMMARY = "predict per-rank memory by category for a model and DeepSpeed setup"


def build_parser() -> MemprofArgumentParser:
    p = MemprofArgumentParser(prog="memprof estimate", description=f"{SUMMARY}.")
    add_setup_flags(p)
    p.add_argument("--world-size", type=positive_int("--world-size"),
                   help="number of ranks (default 1, or nodes x gpus-per-node)")
    p.add_argument("--compare-engines", action="store_true",
                   help="print DeepSpeed ZeRO-3 and torch FSDP2 side by side for the same model, batch and world size")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.compare_engines:
        from memprof.cli.compare_engines import main_compare

        return main_compare(inputs_from_args(args, args.world_size), as_json=args.json, torch_adam=bool(args.torch_adam))
    est = estimate(inputs_from_args(args, args.world_size))
    if args.json:
        print(json.dumps(est.to_json(), indent=1))
    else:
        render(est)
    return 0


def engine_label(inp: EstimateInputs) -> str:
    """``ZeRO-<stage>`` (DeepSpeed; DDP runs at stage 0), or ``FSDP2``."""
    return "FSDP2" if inp.engine == Engine.FSDP2 else f"ZeRO-{inp.zero_stage}"


def fits_line(est: Estimate) -> str | None:
    """The verdict on the GPU, or why there is none; None when no GPU size was given and the
    activations are estimated (nothing to say)."""
    inp = est.inputs
    missing = est.activations_not_estimated
    if inp.gpu_memory_bytes is None:
        return None if missing is None else f"[bold]{missing}[/bold]: the peaks below hold model states only"
    head = (f"fits {format_bytes(inp.gpu_memory_bytes)} with {inp.headroom:.0%} headroom "
            f"(usable {format_bytes(est.usable_gpu_bytes)})")
    if missing is not None:
        return f"{head}: [bold]unknown[/bold] ({missing}; the peaks below hold model states only)"
    return f"{head}: [bold]{'yes' if est.fits else 'no'}[/bold]"


def render(est: Estimate) -> None:
    console = output_console()
    inp = est.inputs
    shape = est.shape
    counted = (f"{shape.model_n_params:,} params, {sum(shape.quantized_numels):,} of them in 4 bits"
               if shape.quantization is not None else f"{shape.n_params:,} params")
    model = f"{inp.model_name} ({counted})" if inp.model_name else f"{shape.n_params:,} parameters"
    console.print(f"[bold]memprof estimate[/bold]: {model}, {engine_label(inp)}, "
                  f"{inp.precision}, {inp.optimizer}, world size {inp.world_size}, layout {inp.layout}")
    verdict = fits_line(est)
    if est.activations_not_estimated is not None and verdict is not None:
        console.print(verdict)  # first: a missing activation model changes how every number reads
    columns = [Column("category"), Column("device at rest", numeric=True), Column("host at rest", numeric=True),
               *(Column(f"{ph} peak", numeric=True) for ph in PHASES)]
    for r in est.ranks:
        rows = [[cat, format_bytes(r.rest["device"][cat]), format_bytes(r.rest["host"][cat]),
                 *(format_bytes(r.phases[ph]["device"][cat]) for ph in PHASES)] for cat in CATEGORIES]
        rows.append(["[bold]total[/bold]", format_bytes(sum(r.rest["device"].values())),
                     format_bytes(sum(r.rest["host"].values())), *(format_bytes(r.phase_total(ph)) for ph in PHASES)])
        title = f"rank {r.rank}" + (" (and every rank but the last)" if r.rank == 0 and inp.world_size > 2 else "")
        print_tables(console, columns, rows, title)
    console.print(f"device at rest (max over ranks): {format_bytes(est.device_total_bytes)}; "
                  f"peak device: {format_bytes(est.peak_device_bytes)} ({est.peak_device_bytes:,} bytes)")
    console.print(f"host (offloaded states, DeepSpeed's host buffers): {format_bytes(est.host_bytes_per_rank)} per rank, "
                  f"{format_bytes(est.host_bytes_per_node)} per node ({est.ranks_per_node} ranks)"
                  + ("" if est.host_fits is None else
                     f"; fits {format_bytes(inp.host_memory_bytes)} per node: [bold]{'yes' if est.host_fits else 'no'}[/bold]"))
    if est.activations_not_estimated is None and verdict is not None:
        console.print(verdict)
    pc = est.paper_comparison or {}
    if inp.layout == "zero-paper":
        console.print(f"model states (ZeRO paper accounting): [bold]{pc['paper_model_states_gb']} GB[/bold] per rank")
    elif pc and inp.engine != Engine.FSDP2:  # the ZeRO paper's accounting is DeepSpeed's
        ds = pc.get("deepspeed_model_states_bytes", 0)
        console.print(f"model states at rest: DeepSpeed layout {ds / 1e9:.1f} GB vs ZeRO paper {pc['paper_model_states_gb']} GB: "
                      "DeepSpeed holds no gradients at rest (they exist in backward/step only), pads partitions, "
                      "and adds reduce buckets and (stage 3) persistent parameters")
    ov = est.overhead
    console.print(f"overhead: {ov['explanation']}; this setup holds {ov['this_setup_bytes_per_param']:g} bytes/param "
                  f"of weights + optimizer state per rank ({ov['this_setup_ratio']:g}x the weights)")
    console.print("[bold]assumptions[/bold]:")
    for a in est.assumptions:
        console.print(f"  - {a}", soft_wrap=True)
