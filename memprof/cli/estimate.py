"""``memprof estimate``: predicted per-rank memory by category, at rest and at each phase's peak."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from memprof.categories import CATEGORIES, PHASES
from memprof.estimate.cli_args import OneLineParser, _int, add_setup_flags, inputs_from_args
from memprof.estimate import Estimate, estimate
from memprof.units import format_bytes


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="memprof estimate", description="Predict per-rank training memory for a DeepSpeed setup.")
    add_setup_flags(p)
    p.add_argument("--world-size", help="number of ranks (default 1, or nodes x gpus-per-node)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    inputs = inputs_from_args(args, _int(args.world_size, "--world-size"))
    est = estimate(inputs)
    if args.json:
        print(json.dumps(est.to_json(), indent=1))
    else:
        render(est)
    return 0


def render(est: Estimate) -> None:
    console = Console(highlight=False)
    inp = est.inputs
    model = inp.model_name or f"{est.shape.n_params:,} parameters"
    console.print(f"[bold]memprof estimate[/bold]: {model} ({est.shape.n_params:,} params), ZeRO-{inp.zero_stage}, "
                  f"{inp.precision}, {inp.optimizer}, world size {inp.world_size}, layout {inp.layout}")
    for r in est.ranks:
        t = Table(title=f"rank {r.rank}" + (" (and every rank but the last)" if r.rank == 0 and inp.world_size > 2 else ""))
        t.add_column("category")
        t.add_column("device at rest", justify="right")
        t.add_column("host at rest", justify="right")
        for ph in PHASES:
            t.add_column(f"{ph} peak", justify="right")
        for cat in CATEGORIES:
            t.add_row(cat, format_bytes(r.rest["device"][cat]), format_bytes(r.rest["host"][cat]),
                      *(format_bytes(r.phases[ph]["device"][cat]) for ph in PHASES))
        t.add_row("[bold]total[/bold]", format_bytes(sum(r.rest["device"].values())), format_bytes(sum(r.rest["host"].values())),
                  *(format_bytes(r.phase_total(ph)) for ph in PHASES))
        console.print(t)
    console.print(f"device at rest (max over ranks): {format_bytes(est.device_total_bytes)}; "
                  f"peak device: {format_bytes(est.peak_device_bytes)} ({est.peak_device_bytes:,} bytes)")
    console.print(f"host (offloaded states, DeepSpeed's host buffers): {format_bytes(est.host_bytes_per_rank)} per rank, "
                  f"{format_bytes(est.host_bytes_per_node)} per node ({est.ranks_per_node} ranks)"
                  + ("" if est.host_fits is None else
                     f"; fits {format_bytes(inp.host_memory_bytes)} per node: [bold]{'yes' if est.host_fits else 'no'}[/bold]"))
    if est.fits is not None:
        console.print(f"fits {format_bytes(inp.gpu_memory_bytes)} with {inp.headroom:.0%} headroom "
                      f"(usable {format_bytes(est.usable_gpu_bytes)}): [bold]{'yes' if est.fits else 'no'}[/bold]")
    pc = est.paper_comparison or {}
    if inp.layout == "zero-paper":
        console.print(f"model states (ZeRO paper accounting): [bold]{pc['paper_model_states_gb']} GB[/bold] per rank")
    elif pc:
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
