"""Worker health over gRPC: TensorFlow's `GetStatus` call with a deadline, and whom we connected to.

Design: a worker is alive and responsive when it answers TensorFlow's own
`WorkerService/GetStatus` within a deadline (a TCP connect proves nothing for a stopped
process: the kernel still accepts on its socket). Whatever else answers on a worker's port
is reported in words, which is how an out-of-memory sentinel's error status
(`tfpipe.sentinel`, RESOURCE_EXHAUSTED with its report) reaches the client. This module holds
no TensorFlow, so that the translation of a failed step's error (`tfpipe.oom`, below the
front layer) asks workers the same way `tfpipe.cluster` and `tfpipe.Watchdog` do, and it
keeps the addresses the latest `tfpipe.cluster(...)` connected to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

STATUS_METHOD = "/tensorflow.WorkerService/GetStatus"
"""TensorFlow's worker status call: any TensorFlow server answers it."""

_connected: list[str] = []


def connected_addresses() -> list[str]:
    """The worker addresses the latest `tfpipe.cluster(...)` call connected to (task order)."""
    return list(_connected)


def set_connected(addresses: Sequence[str]) -> None:
    """Records the cluster this process connected to (`tfpipe.cluster` calls it).

    Args:
        addresses: the workers' `host:port`, task 0 first.
    """
    _connected[:] = list(addresses)


def probe(address: str, timeout_s: float, channel: Any = None) -> str | None:
    """Asks a worker for its status (TensorFlow's `WorkerService/GetStatus`) within a deadline.

    A stopped or hung process does not answer, even though its listening socket still
    accepts TCP connections.

    Args:
        address: the worker's `host:port`.
        timeout_s: the deadline in seconds.
        channel: an open `grpc.Channel` to `address` to reuse; None opens and closes one.

    Returns:
        None when the worker answered; otherwise what went wrong, in words (a failed call
        gives its status code and details, which is where a sentinel's report travels).
    """
    import grpc

    own = channel is None
    if own:
        channel = grpc.insecure_channel(address)
    try:
        channel.unary_unary(STATUS_METHOD)(b"", timeout=max(timeout_s, 0.001))
        return None
    except grpc.RpcError as err:
        code = err.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return (f"no answer to a status call within {timeout_s:.1f} s (the process may be "
                    "stopped, hung or overloaded)")
        if code == grpc.StatusCode.UNAVAILABLE:
            return f"unreachable ({(err.details() or 'unavailable').splitlines()[0]})"
        return f"status call failed: {code.name} {err.details()}"
    finally:
        if own:
            channel.close()
