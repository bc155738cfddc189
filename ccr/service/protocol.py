"""The node service's wire format: length-prefixed JSON frames over a Unix stream socket.

A frame is a 4-byte big-endian length and that many bytes of one JSON object, which carries
the protocol version `v`.  File descriptors (the client's working directory and stdio) go
with the first frame as SCM_RIGHTS.  A frame over MAX_FRAME bytes, a malformed or truncated
one, or another version is refused with ProtocolError and the connection dropped: nothing
a client sends makes the service read without bound or act on what it cannot parse.

client -> service   {"v": 1, "op": "cli", "argv": [...], "env": {...}} + fds [cwd, 0, 1, 2]
client -> service   {"v": 1, "op": "signal", "signum": N}   (Ctrl-C, SIGTERM: forwarded)
service -> client   {"v": 1, "op": "exit", "code": N}       (the command's exit code)
service -> client   {"v": 1, "op": "error", "message": "...", "code": N}  (refused request)
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from ccr.errors import CcrError, UsageError

VERSION = 1
# An environment and argv of a batch job fit many times over (Linux caps argv+env at 2 MiB
# by default, but a real job's are a few KiB); the service reads nothing larger.
MAX_FRAME = 1 << 20
MAX_FDS = 4
_HEADER = struct.Struct("!I")


class ProtocolError(UsageError):
    """A frame the service (or client) cannot accept: bad size, JSON, version or shape."""


class Disconnected(CcrError):
    """The peer closed the connection."""


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    body = json.dumps({"v": VERSION, **message}).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"request of {len(body)} bytes exceeds {MAX_FRAME}")
    data = _HEADER.pack(len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [data], fds)
        data = data[sent:]
    if data:
        sock.sendall(data)


def _read_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ProtocolError(f"truncated frame ({len(buf)} of {size} bytes)")
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """One frame and the fds that came with it; the caller owns (closes) the fds."""
    head, fds, flags, _ = socket.recv_fds(sock, _HEADER.size, max(max_fds, 1))
    if not head:
        for fd in fds:
            os.close(fd)
        raise Disconnected("connection closed")
    try:
        if max_fds == 0 and fds:
            raise ProtocolError("unexpected file descriptors")
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError(f"more than {max_fds} file descriptors")
        if len(head) < _HEADER.size:
            head += _read_exact(sock, _HEADER.size - len(head))
        (size,) = _HEADER.unpack(head)
        if size > MAX_FRAME:
            raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME}")
        try:
            message = json.loads(_read_exact(sock, size))
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError("frame is not JSON") from None
        if not isinstance(message, dict):
            raise ProtocolError("frame is not a JSON object")
        if message.get("v") != VERSION:
            raise ProtocolError(f"protocol version {message.get('v')!r} (this ccr: {VERSION})")
        return message, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED), not from what it says."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid
