"""Is a Ray cluster there? `--address HOST:PORT` is probed before anything starts: Ray itself
retries an unreachable address for minutes with only its own warnings."""

from __future__ import annotations

from typing import Optional


ADDRESS_TIMEOUT_S = 10.0  # seconds: how long --address HOST:PORT may take to accept a TCP connection


def address_problem(address: Optional[str], timeout_s: float = ADDRESS_TIMEOUT_S) -> Optional[str]:
    """Why --address HOST:PORT (or ray://HOST:PORT) cannot be a Ray cluster: nothing accepts a TCP
    connection there within timeout_s (Ray itself retries for minutes). None when it answers, and
    for auto, local and addresses that are not HOST:PORT (Ray says what is wrong with those)."""
    import socket

    if not address or address in ("auto", "local"):
        return None
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return None
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        why = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or type(exc).__name__)
        return (f"--address: no Ray cluster answers at {address!r} (tried a TCP connection to {host}:{port} for up to "
                f"{timeout_s:g} s: {why}); start the head with `ray start --head`, check the address and port "
                "(GCS 6379, Ray client 10001) and the firewall, or leave --address out to run locally")
