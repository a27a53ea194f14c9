"""Helpers of the multi-process tests (spawned gloo groups on the loopback)."""

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
