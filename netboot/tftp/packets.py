"""TFTP packets: parse and build every packet type (RFC 1350, options RFC 2347), without any I/O.

Parsing is strict about what the protocol needs and tolerant only where real clients require it; every
refusal is a `PacketError` whose message is fit to send back in an ERROR packet.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from netboot.core.logtext import clip

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6
MODES = ("octet", "netascii")  # "mail" (RFC 1350) is obsolete and refused
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464  # RFC 2348
DEFAULT_BLKSIZE = 512  # RFC 1350
# RFC 2347 caps a whole request at 512 octets, so no client needs a longer name; one that is
# longer comes from an attack (a name padded with "./" to 64 KiB), and is refused.
MAX_FILENAME = 512
# Options: the first few, each short, are read; the rest are ignored as unknown options are (RFC 2347), so that
# a request's size never reaches what the server keeps or passes on.
MAX_OPTIONS = 16
MAX_OPTION_TEXT = 64
MAX_ERROR_MESSAGE = 200  # bytes of an ERROR packet's message that is sent

_HEADER = struct.Struct("!HH")
_OPCODE = struct.Struct("!H")


class ErrorCode(IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8  # RFC 2347


class PacketError(ValueError):
    """A datagram that is not a valid TFTP packet; the message says why."""


@dataclass(frozen=True, slots=True)
class Request:
    """RRQ or WRQ. `options` keeps the request order, names lower-cased, first occurrence of a name only."""

    opcode: int
    filename: str
    mode: str
    options: tuple[tuple[str, str], ...] = ()

    @property
    def is_write(self) -> bool:
        return self.opcode == WRQ


@dataclass(frozen=True, slots=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    block: int


@dataclass(frozen=True, slots=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class OptionAck:
    options: tuple[tuple[str, str], ...]


Packet = Request | Data | Ack | Error | OptionAck


def _strings(body: bytes) -> tuple[list[bytes], bytes]:
    """NUL-terminated strings of `body`, and whatever trails the last NUL."""
    *strings, tail = body.split(b"\0")
    return strings, tail


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace")


def parse_request(datagram: bytes) -> Request:
    """An RRQ or WRQ: filename NUL mode NUL [option NUL value NUL]..."""
    opcode = _opcode(datagram)
    if opcode not in (RRQ, WRQ):
        raise PacketError(f"expected a read or write request, got opcode {opcode}")
    strings, tail = _strings(datagram[2:])
    if not strings:
        raise PacketError("request without a NUL-terminated filename")
    if len(strings) == 1:
        # Some clients omit the final NUL; accept a complete, known mode as the last bytes.
        strings.append(tail)
        tail = b""
    if len(strings[0]) > MAX_FILENAME:
        raise PacketError(f"file name of {len(strings[0])} bytes, longer than {MAX_FILENAME}")
    # Filenames are bytes on the wire; surrogateescape keeps them byte-exact down to the filesystem.
    filename = strings[0].decode("utf-8", "surrogateescape")
    mode = _text(strings[1]).lower()
    if mode not in MODES:
        raise PacketError(f"unsupported transfer mode '{clip(mode, 16)}'")
    options: dict[str, str] = {}
    # Old PXE ROMs append garbage (0xFF padding, half an option) after the last option: pairs are read
    # while they are complete and NUL-terminated, and anything after them is ignored (tftp-hpa does the same).
    pairs = strings[2:]
    for i in range(0, len(pairs) - 1, 2):
        if len(options) >= MAX_OPTIONS:
            break
        if len(pairs[i]) > MAX_OPTION_TEXT or len(pairs[i + 1]) > MAX_OPTION_TEXT:
            continue  # no option the server knows is that long
        name = _text(pairs[i]).lower()  # RFC 2347: option names are case-insensitive
        options.setdefault(name, _text(pairs[i + 1]))
    return Request(opcode, filename, mode, tuple(options.items()))


def _opcode(datagram: bytes) -> int:
    if len(datagram) < 2:
        raise PacketError("datagram shorter than an opcode")
    return (datagram[0] << 8) | datagram[1]


def parse(datagram: bytes) -> Packet:
    """Any TFTP packet."""
    opcode = _opcode(datagram)
    if opcode in (RRQ, WRQ):
        return parse_request(datagram)
    if opcode in (DATA, ACK, ERROR) and len(datagram) < 4:
        raise PacketError(f"opcode {opcode} packet shorter than its 4-byte header")
    if opcode == DATA:
        return Data(_HEADER.unpack_from(datagram)[1], bytes(datagram[4:]))
    if opcode == ACK:
        return Ack(_HEADER.unpack_from(datagram)[1])
    if opcode == ERROR:
        message = datagram[4:].split(b"\0", 1)[0]  # tolerate a missing terminator
        return Error(_HEADER.unpack_from(datagram)[1], _text(message))
    if opcode == OACK:
        strings, _ = _strings(datagram[2:])
        if len(strings) % 2:
            raise PacketError("option acknowledgement with an option lacking its value")
        pairs = range(0, len(strings), 2)
        return OptionAck(tuple((_text(strings[i]).lower(), _text(strings[i + 1])) for i in pairs))
    raise PacketError(f"unknown opcode {opcode}")


def build_data(block: int, payload: bytes) -> bytes:
    return _HEADER.pack(DATA, block & 0xFFFF) + payload


def build_ack(block: int) -> bytes:
    return _HEADER.pack(ACK, block & 0xFFFF)


def build_error(code: int, message: str) -> bytes:
    """An ERROR; its message (which may quote what a client sent) is cut to MAX_ERROR_MESSAGE bytes."""
    return _HEADER.pack(ERROR, code) + message.encode("ascii", "replace")[:MAX_ERROR_MESSAGE] + b"\0"


def _pairs(options: tuple[tuple[str, str], ...]) -> bytes:
    return b"".join(f"{name}\0{value}\0".encode("ascii") for name, value in options)


def build_oack(options: tuple[tuple[str, str], ...]) -> bytes:
    return _OPCODE.pack(OACK) + _pairs(options)


def build_request(filename: str, mode: str = "octet", options: tuple[tuple[str, str], ...] = (), *,
                  opcode: int = RRQ) -> bytes:
    name = filename.encode("utf-8", "surrogateescape")
    return _OPCODE.pack(opcode) + name + b"\0" + mode.encode("ascii") + b"\0" + _pairs(options)
