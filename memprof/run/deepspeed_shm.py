"""Give back the shared-memory segment DeepSpeed's CPU communication backend leaves in /dev/shm.

Why this exists: under the ``deepspeed`` launcher on CPU (``LOCAL_SIZE`` equal to the world size),
``deepspeed.init_distributed`` builds the ``deepspeed_shm_comm`` op and every rank creates a
``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` segment of about
67 MB (deepspeed/ops/csrc/cpu/comm/shm.cpp, ``shm_initialize``). Only ``shared_close`` unlinks it,
and nothing calls that, so each CPU launch leaks 67 MB of RAM-backed tmpfs per rank until the machine
reboots: a few dozen launches fill a 24 GiB machine's memory. Training never uses the segment (only
``inference_all_reduce`` does), and unlinking a name keeps existing mappings valid, so each rank
removes its own name once every rank has mapped its peers' segments; the memory is then freed when
the last rank exits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "deepspeed_allreduce_buffer"


def segment_path(rank: int, env: Mapping[str, str], *, uid: int | None = None, shm_dir: Path = SHM_DIR) -> Path:
    """The path of ``rank``'s segment, named exactly as shm.cpp names it."""
    uid = os.getuid() if uid is None else uid
    addr = env.get("MASTER_ADDR", "")
    port = env.get("MASTER_PORT", "")
    return shm_dir / f"{SEGMENT_PREFIX}_{uid}_{addr}_{port}_{rank}"


def release_own_segment(rank: int, env: Mapping[str, str] | None = None, *, shm_dir: Path = SHM_DIR) -> bool:
    """Unlink this rank's segment if it exists; True when one was removed.

    Call it only after a barrier that follows ``deepspeed.init_distributed``: a peer still inside
    ``shm_initialize`` spins until it can open every other rank's segment, so removing the name
    before that would hang it.
    """
    path = segment_path(rank, os.environ if env is None else env, shm_dir=shm_dir)
    try:
        path.unlink()
    except FileNotFoundError:  # torchrun, plain python, GPUs, several nodes: no segment was made
        return False
    return True


def release_after_peers_mapped(rank: int, world_size: int) -> bool:
    """After ``deepspeed.init_distributed`` on CPU: a barrier (a sync point: past it every rank has
    mapped its peers' segments), then :func:`release_own_segment`. Every rank must call it."""
    if world_size > 1:
        import torch.distributed as torch_dist

        torch_dist.barrier()
    return release_own_segment(rank)


def release_cpu_shm_segment() -> bool:
    """For a run memprof did not start (the integrations): once the process group exists, the same
    barrier and release as :func:`release_after_peers_mapped`; False without a process group.
    Every rank must call it, and only on a CPU run."""
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return False
    return release_after_peers_mapped(torch_dist.get_rank(), torch_dist.get_world_size())
