"""``memprof estimate --compare-engines``: DeepSpeed ZeRO-3 and torch FSDP2 for the same model,
batch and world size, category by category, and what makes them differ.

Not a subcommand: ``memprof.cli.estimate`` hands its inputs here. The two setups are the same
training in each engine's usual form: FSDP2 with ``MixedPrecisionPolicy(param_dtype=<precision>)``
under bf16/fp16 (fp32 shards, gathered copies cast) against DeepSpeed's bf16/fp16 (16-bit
partitions plus fp32 master partitions); FSDP2's ``CPUOffloadPolicy`` against ZeRO-3 offloading
both parameters and optimizer.
"""

from __future__ import annotations

import json
from dataclasses import replace

from memprof.categories import CATEGORIES, PHASES
from memprof.display.console import output_console
from memprof.display.tables import Column, print_tables
from memprof.engines import Engine, Fsdp2Settings
from memprof.estimate import Estimate, estimate
from memprof.estimate.inputs import EstimateInputs
from memprof.estimate.result import RankEstimate
from memprof.units import format_bytes


def engine_pair(inp: EstimateInputs, torch_adam: bool) -> tuple[EstimateInputs, EstimateInputs]:
    """(ZeRO-3, FSDP2) inputs for the setup ``inp`` describes (either engine)."""
    if inp.engine == Engine.FSDP2:
        offload = "cpu" if inp.fsdp2.offload_params else "none"
        zero = replace(inp.zero, offload_param=offload, offload_optimizer=offload)
        zero3 = inp.with_(engine=Engine.DEEPSPEED, zero_stage=3, fsdp2=Fsdp2Settings(), torch_adam=torch_adam, zero=zero)
        return zero3, inp
    mixed = None if inp.precision == "fp32" else inp.precision
    fsdp2 = Fsdp2Settings(param_dtype=mixed, offload_params=inp.zero.offload_param == "cpu")
    fsdp = inp.with_(engine=Engine.FSDP2, zero_stage=0, torch_adam=True, fsdp2=fsdp2,
                     zero=replace(inp.zero, offload_param="none", offload_optimizer="none"))
    return inp.with_(zero_stage=3), fsdp


def _worst(est: Estimate) -> tuple[RankEstimate, str]:
    """The rank and phase holding the estimate's peak device bytes."""
    return max(((r, ph) for r in est.ranks for ph in PHASES), key=lambda rp: rp[0].phase_total(rp[1]))


def differences(zero3: Estimate, fsdp2: Estimate) -> list[str]:
    """What makes the two differ, from the numbers (each line names the code path behind it)."""
    z, f = zero3.ranks[0].rest["device"], fsdp2.ranks[0].rest["device"]
    zr, zph = _worst(zero3)
    fr, fph = _worst(fsdp2)
    lines = []
    if z["master_params"]:
        lines.append(f"ZeRO-3 keeps fp32 master partitions ({format_bytes(z['master_params'])}) beside its "
                     f"{zero3.inputs.precision} partitions; FSDP2's shards are the fp32 parameters themselves "
                     "(MixedPrecisionPolicy casts only the gathered copies)")
    lines.append(f"params at rest: ZeRO-3 {format_bytes(z['params'])} (flat partitions, persistent small params gathered) vs "
                 f"FSDP2 {format_bytes(f['params'])} (every parameter's dim-0 chunk padded to chunk 0)")
    lines.append(f"at their peaks ({zph} / {fph}): ZeRO-3 gathers parameters by its prefetch bucket and reduces "
                 f"through its buckets (params {format_bytes(zr.phases[zph]['device']['params'])}, comm_buffers "
                 f"{format_bytes(zr.phases[zph]['device']['comm_buffers'])}); FSDP2 gathers whole blocks, the root "
                 f"and a prefetched block (params {format_bytes(fr.phases[fph]['device']['params'])}, comm_buffers "
                 f"{format_bytes(fr.phases[fph]['device']['comm_buffers'])})")
    lines.append(f"optimizer state: ZeRO-3 {format_bytes(z['optimizer_state'])} vs FSDP2 {format_bytes(f['optimizer_state'])} "
                 "(both fp32 over one rank's partition / shards; torch.optim keeps a step tensor per shard)")
    return lines


def main_compare(inp: EstimateInputs, *, as_json: bool, torch_adam: bool) -> int:
    zero3_inp, fsdp2_inp = engine_pair(inp, torch_adam)
    zero3, fsdp2 = estimate(zero3_inp), estimate(fsdp2_inp)
    if as_json:
        print(json.dumps({"zero3": zero3.to_json(), "fsdp2": fsdp2.to_json(), "differences": differences(zero3, fsdp2)},
                         indent=1))
        return 0
    console = output_console()
    model = inp.model_name or f"{zero3.shape.n_params:,} parameters"
    console.print(f"[bold]memprof estimate --compare-engines[/bold]: {model}, {inp.precision}, {inp.optimizer}, "
                  f"micro-batch {inp.micro_batch}, world size {inp.world_size}")
    zr, zph = _worst(zero3)
    fr, fph = _worst(fsdp2)
    columns = [Column("category"), Column("ZeRO-3 at rest", numeric=True), Column("FSDP2 at rest", numeric=True),
               Column(f"ZeRO-3 {zph} peak", numeric=True), Column(f"FSDP2 {fph} peak", numeric=True)]
    rows = [[cat, format_bytes(zr.rest["device"][cat]), format_bytes(fr.rest["device"][cat]),
             format_bytes(zr.phases[zph]["device"][cat]), format_bytes(fr.phases[fph]["device"][cat])] for cat in CATEGORIES]
    rows.append(["[bold]total[/bold]", format_bytes(sum(zr.rest["device"].values())), format_bytes(sum(fr.rest["device"].values())),
                 format_bytes(zr.phase_total(zph)), format_bytes(fr.phase_total(fph))])
    rows.append(["host at rest", format_bytes(zero3.host_bytes_per_rank), format_bytes(fsdp2.host_bytes_per_rank), "", ""])
    print_tables(console, columns, rows, "device bytes per rank (the rank with the highest peak)")
    console.print("[bold]why they differ[/bold]:")
    for line in differences(zero3, fsdp2):
        console.print(f"  - {line}", soft_wrap=True)
    return 0
