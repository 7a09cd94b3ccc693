"""Ports on this machine: a free one to serve on, and a one-line error for a taken one."""

from __future__ import annotations

import socket

from skinml.core.errors import SkinmlError


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """SkinmlError at once if another program holds host:port (the server would say so only
    after loading the model, buried in a traceback)."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SkinmlError(f"cannot serve on {host}:{port}: {exc.strerror or exc} (another "
                              "program holds the port; choose one with --port)") from None
