"""The client side: a `ccr` of a user other than root runs each command in the node service.

The client passes its argv, its environment (the job's, never ccr's own settings: the
service keeps its own) and, as file descriptors, its working directory and stdin, stdout and
stderr; the service runs the very same command line with those as its stdio, so output
(text, --json, progress bars on a terminal), errors and exit codes are what ccr in-process
gives.  SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 are forwarded as they come.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

from ccr import config
from ccr.errors import PermissionDeniedError
from ccr.service import protocol

DEFAULT_SOCKET = "/run/ccr/ccr.sock"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

# Commands that never need the service (and must work when it is down).
LOCAL_FIRST = {"--version", "--help", "-h", "--install-completion", "--show-completion", "daemon"}


def socket_path() -> Path:
    return Path(config.service_socket() or DEFAULT_SOCKET)


class ServiceUnavailable(PermissionDeniedError):
    """A user other than root without a reachable node service (exit 9)."""


def connect(path: Path | None = None) -> socket.socket:
    path = path or socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ServiceUnavailable(
            f"the ccr node service is not reachable at {path} ({exc.strerror}); "
            "as root, start it with `ccr daemon` (or `systemctl start ccr-daemon`)"
        ) from None
    _, uid, _ = protocol.peer_credentials(sock)
    if uid != 0:
        sock.close()
        raise ServiceUnavailable(f"{path} is served by uid {uid}, not by root: not a ccr service")
    return sock


def wants_service(argv: list[str]) -> bool:
    """Whether this command line goes to the service: always for a user other than root
    (but --help, --version and bare `ccr`), for root only when CCR_SOCKET names a live one."""
    head = argv[: argv.index("--")] if "--" in argv else argv
    if not argv or argv[0] in LOCAL_FIRST or "--help" in head:
        return False
    if os.geteuid() != 0:
        return True
    path = config.service_socket()
    if not path:
        return False
    try:
        connect(Path(path)).close()
    except ServiceUnavailable:
        return False
    return True


def call(argv: list[str]) -> int:
    """Run argv in the service; return its exit code."""
    sock = connect()
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        protocol.send(sock, {"op": "cli", "argv": argv, "env": dict(os.environ)}, [cwd, 0, 1, 2])
    finally:
        os.close(cwd)

    def forward(signum: int, _frame: object) -> None:
        try:
            protocol.send(sock, {"op": "signal", "signum": signum})
        except OSError:
            pass

    old = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        while True:
            try:
                message, _ = protocol.recv(sock)
            except protocol.Disconnected:
                print("ccr: error: the node service ended the request", file=sys.stderr)
                return 1
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            if message.get("op") == "exit":
                return int(message.get("code", 1))
            if message.get("op") == "error":
                print(f"ccr: error: {message.get('message')}", file=sys.stderr)
                return int(message.get("code", 1))
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        sock.close()
