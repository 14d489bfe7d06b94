"""Tell systemd when the server is ready or stopping (``Type=notify`` services).

The protocol is one datagram with ``KEY=value`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (see sd_notify(3)); no library needed. Outside systemd (no such
variable) every call is a no-op that returns False, so callers need not check.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; True when it was sent.

    Never raises: a service manager that went away must not stop the server.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        # Abstract namespace socket: the name starts with a NUL byte.
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # unset, or a transport we do not speak (e.g. vsock)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def notify_ready(status: str = "") -> bool:
    """The server listens and serves: systemd finishes ``systemctl start`` and starts
    units ordered after this one."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def notify_stopping(status: str = "") -> bool:
    """Graceful shutdown has begun (systemd shows the unit as deactivating)."""
    return notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))
