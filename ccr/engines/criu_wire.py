"""The few CRIU messages ccr exchanges, in protobuf's wire format, encoded by hand.

ccr sends one criu_req (rpc.proto) per dump or restore, acknowledges notifications, reads
criu_resp, and reads the dump's stats_entry (stats.proto).  pycriu's generated modules do
the same through google.protobuf, whose import (its message builder and descriptor pool)
costs ~30 ms a call here: a tenth of what ccr adds to a 64 MiB checkpoint.  The field
numbers below are CRIU's (criu/images/rpc.proto, stats.proto);
tests/test_config_errors.py checks every message byte for byte against pycriu's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# criu_req_type
DUMP = 1
RESTORE = 2
NOTIFY = 6

# criu_opts: the fields ccr sets, by name (CriuOptions.rpc_fields), and their numbers.
OPTS_FIELDS: dict[str, int] = {
    "images_dir_fd": 1,
    "pid": 2,
    "leave_running": 3,
    "tcp_established": 5,
    "file_locks": 8,
    "log_level": 9,
    "log_file": 10,
    "notify_scripts": 12,
    "root": 13,
    "work_dir_fd": 17,
    "rst_sibling": 26,
    "auto_ext_mnt": 28,
    "ghost_limit": 35,
    "lazy_pages": 48,
    "network_lock": 64,  # criu_network_lock_method: IPTABLES 1, NFTABLES 2, SKIP 3
    "unprivileged": 67,
    "leave_stopped": 69,
}

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5

# A message's fields by number (parse): varints as ints, the rest as bytes.
Fields = dict[int, list[int | bytes]]


def _varint(value: int) -> bytes:
    if value < 0:  # int32/int64: ten bytes of two's complement
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, value: int | bool | str | bytes) -> bytes:
    if isinstance(value, (str, bytes)):
        data = value.encode() if isinstance(value, str) else value
        return _varint(number << 3 | _BYTES) + _varint(len(data)) + data
    return _varint(number << 3 | _VARINT) + _varint(int(value))


def encode_opts(fields: dict[str, int | bool | str]) -> bytes:
    """A criu_opts with these fields set (and no other), in field-number order as protobuf
    writes them."""
    ordered = sorted(fields.items(), key=lambda item: OPTS_FIELDS[item[0]])
    return b"".join(_field(OPTS_FIELDS[name], value) for name, value in ordered)


def encode_req(kind: int, opts: bytes | None = None, notify_success: bool | None = None) -> bytes:
    """A criu_req: its type, its options, or (a notification's answer) notify_success."""
    out = _field(1, kind)
    if opts is not None:
        out += _field(2, opts)
    if notify_success is not None:
        out += _field(3, notify_success)
    return out


def read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def parse(data: bytes) -> dict[int, list[int | bytes]]:
    """A message's fields by number: varints as (unsigned) ints, the rest as bytes."""
    fields: dict[int, list[int | bytes]] = {}
    at = 0
    while at < len(data):
        key, at = read_varint(data, at)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == _VARINT:
            value, at = read_varint(data, at)
        elif wire == _BYTES:
            size, at = read_varint(data, at)
            if at + size > len(data):
                raise ValueError("truncated field")
            value, at = data[at : at + size], at + size
        elif wire in (_FIXED32, _FIXED64):
            size = 4 if wire == _FIXED32 else 8
            if at + size > len(data):
                raise ValueError("truncated field")
            value, at = data[at : at + size], at + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _int(fields: dict[int, list[int | bytes]], number: int, signed: bool = False) -> int:
    values = fields.get(number)
    value = values[-1] if values else 0  # protobuf: the last occurrence wins
    if not isinstance(value, int):
        raise ValueError(f"field {number} is not a varint")
    if signed and value >= 1 << 63:
        value -= 1 << 64
    return value


def _bytes(fields: dict[int, list[int | bytes]], number: int) -> bytes:
    values = fields.get(number)
    value = values[-1] if values else b""
    if not isinstance(value, bytes):
        raise ValueError(f"field {number} is not length-delimited")
    return value


@dataclass(frozen=True)
class Response:
    """The fields of a criu_resp that ccr reads."""

    type: int
    success: bool
    cr_errno: int = 0
    cr_errmsg: str = ""
    restore_pid: int = 0  # restore: the restored tree's root
    notify_script: str = ""  # notification: its name ("post-dump", ...)
    notify_pid: int = 0


def decode_resp(data: bytes) -> Response:
    """A criu_resp; ValueError when data is not one."""
    fields = parse(data)
    if 1 not in fields or 2 not in fields:
        raise ValueError("not a criu_resp (no type or success)")
    restore = parse(_bytes(fields, 4))
    notify = parse(_bytes(fields, 5))
    return Response(
        type=_int(fields, 1),
        success=bool(_int(fields, 2)),
        cr_errno=_int(fields, 7, signed=True),
        cr_errmsg=_bytes(fields, 9).decode(errors="replace"),
        restore_pid=_int(restore, 1, signed=True),
        notify_script=_bytes(notify, 1).decode(errors="replace"),
        notify_pid=_int(notify, 2, signed=True),
    )


# dump_stats_entry (stats_entry's field 1): the counters ccr reports, by number.
DUMP_STATS_FIELDS = {
    "freezing_time": 1,
    "frozen_time": 2,
    "memdump_time": 3,
    "memwrite_time": 4,
    "pages_scanned": 5,
    "pages_written": 7,
}


def dump_stats(entry: Fields) -> dict[str, int]:
    """The counters of one stats_entry, parsed (times in CRIU's microseconds)."""
    dump = parse(_bytes(entry, 1))
    return {name: _int(dump, number) for name, number in DUMP_STATS_FIELDS.items()}


# CRIU image files (criu/include/magic.h, criu/protobuf.c): an optional leading magic
# (IMG_COMMON or IMG_SERVICE), the image's own magic, then entries of (u32 size, message).
_LEADING_MAGICS = (0x54564319, 0x55105940)


def image_entries(path: Path) -> list[Fields] | None:
    """Each entry of a CRIU image file, its fields by number (parse); None if the file is
    missing or not laid out as expected (the caller then decodes it with pycriu).

    For the few questions a restore asks of every image (which fd types, which external
    mounts): pycriu's decoder takes ~30-50 ms to import and decode here.
    """
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < 4:
        return None
    at = 8 if int.from_bytes(data[:4], "little") in _LEADING_MAGICS else 4
    entries: list[Fields] = []
    try:
        while at < len(data):
            size = int.from_bytes(data[at : at + 4], "little")
            body = data[at + 4 : at + 4 + size]
            if len(body) != size or at + 4 > len(data):
                return None
            entries.append(parse(body))
            at += 4 + size
    except ValueError:
        return None
    return entries


def field_str(fields: Fields, number: int) -> str:
    """A string field's value (the last occurrence), "" when absent."""
    return _bytes(fields, number).decode(errors="surrogateescape")


def fd_types(path: Path) -> set[int] | None:
    """The fd types in a files.img (each file_entry's field 1, images/fdinfo.proto); None
    if the file is missing or not as expected (then a full decode decides)."""
    entries = image_entries(path)
    if entries is None or any(1 not in e for e in entries):
        return None
    return {_int(e, 1) for e in entries}
