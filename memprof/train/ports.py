"""A free TCP port on this machine, for a rendezvous (MASTER_PORT) that must not clash with another run."""

from __future__ import annotations

import socket


def free_local_port() -> int:
    """A port the OS reports free on 127.0.0.1 right now (another process may still take it later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
