"""The shm segment name memprof unlinks is the one DeepSpeed's shm.cpp creates, and only that one."""

from __future__ import annotations

from pathlib import Path

from memprof.run.deepspeed_shm import release_own_segment, segment_path

ENV = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}


def test_name_follows_shm_cpp() -> None:
    # shm.cpp: snprintf("%s_%d_%s_%s", SHM_BUFFER_NAME, getuid(), addr, port) then "%s_%d" with the rank
    assert segment_path(1, ENV, uid=0, shm_dir=Path("/dev/shm")) == Path(
        "/dev/shm/deepspeed_allreduce_buffer_0_127.0.0.1_29517_1"
    )


def test_release_removes_only_this_ranks_segment(tmp_path: Path) -> None:
    mine = segment_path(1, ENV, shm_dir=tmp_path)
    peer = segment_path(0, ENV, shm_dir=tmp_path)
    other_run = segment_path(1, {**ENV, "MASTER_PORT": "29518"}, shm_dir=tmp_path)
    for path in (mine, peer, other_run):
        path.write_bytes(b"x")
    assert release_own_segment(1, ENV, shm_dir=tmp_path) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([peer.name, other_run.name])
    assert release_own_segment(1, ENV, shm_dir=tmp_path) is False  # nothing left to remove: no error
