"""Rendezvous ports (MASTER_PORT) that do not clash with another run on the same machine.

A port found free and bound later can be taken in between by any other process (another test's
launch, an outgoing connection): so a port is taken at bind time where the code allows it
(:data:`ANY_FREE_PORT`), and elsewhere a launch that lost the race is recognised from its output
(:func:`lost_port_race`) and started again on a fresh port (tests/launch_helpers.py).
"""

from __future__ import annotations

import re
import socket

# MASTER_PORT for a world of one: torch's rendezvous store binds port 0, i.e. whatever port is free
# at bind time (torch/distributed/rendezvous.py _create_c10d_store -> TCPStore), and no other
# process needs to know it. Not for several ranks: they must all be told the same number.
ANY_FREE_PORT = 0

# What a rank prints when the rendezvous port was taken before its store bound it: torch's
# DistNetworkError "... failed to listen on any local network address ... EADDRINUSE" (c10d
# TCPStore / libuv), or the OS's message from a plain socket.
_ADDRESS_IN_USE = re.compile(r"EADDRINUSE|Address already in use|address already in use")


def free_local_port() -> int:
    """A port the OS reports free on 127.0.0.1 right now, for a launch command that must name one
    before any process binds it (another process may still take it first: see :func:`lost_port_race`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lost_port_race(output: str) -> bool:
    """Whether a failed launch's output says its rendezvous port was already in use."""
    return bool(_ADDRESS_IN_USE.search(output))
