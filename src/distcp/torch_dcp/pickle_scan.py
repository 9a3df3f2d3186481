"""A pass over the opcodes of a pickle, before any of it is unpickled.

The restricted unpickler (:mod:`distcp.torch_dcp.safe_unpickle`) decides which
globals a pickle may name, but some harm is done by the C unpickler before any
global is looked up: ``LONG_BINPUT 0xffffffff`` makes it grow its memo table to
eight billion entries (and zero them: 64 GiB touched), and a counted opcode
(``BINBYTES8``, ``BINUNICODE8``, …) allocates the length it declares before
reading a byte. So every opcode is checked first, without building anything:

- the opcode is one torch's pickles can contain; the ones that reach outside
  the pickle (persistent ids, the copyreg extension registry, out-of-band
  buffers) or build objects the old way (``INST``, ``OBJ``) are refused;
- a declared length fits in the bytes that are left;
- a memo index is one the pickler could have written (at most the number of
  values memoized so far), so the memo never grows past the pickle's size;
- the pickle ends with ``STOP`` at the end of the data.

The pass costs one Python-level step per opcode; torch's metadata pickles have
about 70 opcodes per saved chunk.
"""

from __future__ import annotations

import pickletools
import struct

from distcp.errors import CheckpointFormatError

__all__ = ["check_opcodes"]

# How the argument of each opcode is laid out: a fixed byte count (>= 0) or one of these.
_LINE = -1  # up to a newline
_COUNT1 = -2  # a 1-byte length, then that many bytes
_COUNT4 = -3  # a signed 4-byte length, then that many bytes
_COUNT4U = -4  # an unsigned 4-byte length, then that many bytes
_COUNT8U = -5  # an unsigned 8-byte length, then that many bytes
_TWO_LINES = -6  # GLOBAL: a module line and a name line
_REFUSED = -7

#: Opcodes refused outright, and why (the message names the opcode).
_WHY_REFUSED = {
    "PERSID": "a persistent id (torch.save's reference to a tensor storage)",
    "BINPERSID": "a persistent id (torch.save's reference to a tensor storage)",
    "EXT1": "a copyreg extension code",
    "EXT2": "a copyreg extension code",
    "EXT4": "a copyreg extension code",
    "INST": "a protocol-0 object construction",
    "OBJ": "a protocol-1 object construction",
    "NEXT_BUFFER": "an out-of-band buffer",
    "READONLY_BUFFER": "an out-of-band buffer",
    "PUT": "a protocol-0 memo store with a free-form index",
}


def _layout_table() -> tuple[list[int], list[str]]:
    layout = [_REFUSED] * 256
    names = ["<unknown>"] * 256
    for opcode in pickletools.opcodes:
        code = ord(opcode.code)
        names[code] = opcode.name
        if opcode.name in _WHY_REFUSED:
            continue
        if opcode.name == "GLOBAL":
            layout[code] = _TWO_LINES
        elif opcode.arg is None:
            layout[code] = 0
        else:
            layout[code] = opcode.arg.n  # pickletools' own codes match ours
    return layout, names


_LAYOUT, _NAMES = _layout_table()
_CODES = {opcode.name: ord(opcode.code) for opcode in pickletools.opcodes}
_MEMOIZE = _CODES["MEMOIZE"]
_STOP = _CODES["STOP"]
_BINPUT = _CODES["BINPUT"]
_LONG_BINPUT = _CODES["LONG_BINPUT"]
_INST = _CODES["INST"]
_COUNT_FORMATS = {_COUNT1: "<B", _COUNT4: "<i", _COUNT4U: "<I", _COUNT8U: "<Q"}
_COUNT_SIZES = {_COUNT1: 1, _COUNT4: 4, _COUNT4U: 4, _COUNT8U: 8}


def check_opcodes(data: bytes, *, source: str) -> None:
    """Raise :class:`CheckpointFormatError` naming ``source`` unless ``data``
    is one pickle made only of opcodes that are safe to hand to the C unpickler."""
    end = len(data)
    position = 0
    memoized = 0
    layout = _LAYOUT
    while position < end:
        start = position
        code = data[position]
        position += 1
        kind = layout[code]
        if kind == 0:
            if code == _MEMOIZE:
                memoized += 1
            elif code == _STOP:
                if position != end:
                    raise _fail(source, f"{end - position} bytes follow the end of the pickle")
                return
            continue
        if kind > 0:
            if position + kind > end:
                raise _fail(source, f"the pickle is truncated (opcode at byte {start})")
            if code in (_BINPUT, _LONG_BINPUT):
                index = data[position] if code == _BINPUT else _unpack("<I", data, position)
                if index > memoized:
                    raise _fail(
                        source,
                        f"memo index {index} at byte {start} is past the {memoized} values "
                        "memoized so far (it would make the unpickler allocate a huge table)",
                    )
                memoized += 1
            position += kind
        elif kind in (_LINE, _TWO_LINES):
            for _ in range(2 if kind == _TWO_LINES else 1):
                newline = data.find(b"\n", position)
                if newline < 0:
                    raise _fail(source, f"the pickle is truncated (opcode at byte {start})")
                position = newline + 1
        elif kind in _COUNT_FORMATS:
            size = _COUNT_SIZES[kind]
            if position + size > end:
                raise _fail(source, f"the pickle is truncated (opcode at byte {start})")
            length = _unpack(_COUNT_FORMATS[kind], data, position)
            position += size
            if length < 0 or length > end - position:
                raise _fail(
                    source,
                    f"{_NAMES[code]} at byte {start} declares {length} bytes but only "
                    f"{end - position} are left (truncated, or a huge allocation)",
                )
            position += length
        else:
            raise _refused(data, code, start, source)
    raise _fail(source, "the pickle is truncated (no STOP opcode)")


def _unpack(fmt: str, data: bytes, position: int) -> int:
    value: int = struct.unpack_from(fmt, data, position)[0]
    return value


def _refused(data: bytes, code: int, start: int, source: str) -> CheckpointFormatError:
    name = _NAMES[code]
    why = _WHY_REFUSED.get(name, "an opcode no pickle protocol defines")
    detail = ""
    if code == _INST:
        lines = data[start + 1 : start + 200].split(b"\n")[:2]
        detail = " of " + ".".join(line.decode("latin-1") for line in lines)
    return CheckpointFormatError(
        f"torch DCP metadata {source}: opcode {name} at byte {start} ({why}{detail}) is "
        "refused; nothing in the file was imported or run"
    )


def _fail(source: str, message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"torch DCP metadata {source} is not a valid pickle: {message}")
