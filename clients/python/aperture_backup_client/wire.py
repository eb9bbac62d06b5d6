"""Protobuf's wire format by hand, for the two messages that carry the bytes of an archive.

A `StreamDownloadResponse` or an upload's `UploadChunk` is a chunk of an archive (1 MiB by default) and a
field or two. Through the generated classes that chunk is copied again and again: building and serializing
a fresh 1 MiB message cost 2.0 ms here (upb allocates and copies it twice; 40 times a plain copy), and
parsing one and reading its `.data` copies the chunk twice more (58 + 82 us). That was more than gRPC
itself spends sending the chunk. So both ends encode and decode these two messages here: the small fields
go through protobuf, and the bytes field is written in the wire format every protobuf parser reads as the
same message (tag, length as a varint, the bytes), once, and read without a copy (a memoryview into the
message gRPC received). Everything else uses the generated classes.

Shared by the service (which sends downloads) and this client (which reads them and sends uploads), so
that the one encoding lives in one place; `tests/test_wire.py` holds it to protobuf's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from aperture.backup.v1 import backup_pb2 as pb

__all__ = [
    "DownloadChunk",
    "decode_download_response",
    "encode_download_response",
    "encode_upload_chunk",
    "length_delimited_head",
]

_VARINT = 0
_FIXED64 = 1
_LENGTH_DELIMITED = 2
_FIXED32 = 5
_FIXED_SIZES = {_FIXED64: 8, _FIXED32: 4}


@dataclass(frozen=True, slots=True)
class DownloadChunk:
    """One decoded `StreamDownloadResponse`. `data` is a view into the received message (no copy): write
    it, hash it, or `bytes()` it to keep it apart from the message."""

    offset: int
    data: memoryview
    #: Set on the first message of a download only.
    backup: pb.Backup | None


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _bytes_field(field: int, data: bytes) -> tuple[bytes, bytes]:
    """The two pieces in front of `data` in a length-delimited field: its key and its length."""
    return _key(field, _LENGTH_DELIMITED), _varint(len(data))


def length_delimited_head(field: int, size: int) -> bytes:
    """What precedes `size` bytes of a length-delimited field (bytes, string, an embedded message) in a
    message: the field's key and the length. The service frames each backup of a List page with it once,
    and answers List by joining the framed backups (convert.BackupMessages)."""
    return _key(field, _LENGTH_DELIMITED) + _varint(size)


_DOWNLOAD_DATA = pb.StreamDownloadResponse.DATA_FIELD_NUMBER
_DOWNLOAD_OFFSET = pb.StreamDownloadResponse.OFFSET_FIELD_NUMBER
_DOWNLOAD_BACKUP = pb.StreamDownloadResponse.BACKUP_FIELD_NUMBER
_UPLOAD_CHUNK = pb.UploadAndRestoreRequest.CHUNK_FIELD_NUMBER
_CHUNK_DATA = pb.UploadChunk.DATA_FIELD_NUMBER


def encode_download_response(offset: int, data: bytes, backup: pb.Backup | None = None) -> bytes:
    """`StreamDownloadResponse(backup=backup, offset=offset, data=data).SerializeToString()`, copying `data`
    once."""
    head = pb.StreamDownloadResponse(offset=offset, backup=backup).SerializeToString()
    if not data:
        return head
    return b"".join((head, *_bytes_field(_DOWNLOAD_DATA, data), data))


def encode_upload_chunk(offset: int, data: bytes) -> bytes:
    """`UploadAndRestoreRequest(chunk=UploadChunk(offset=offset, data=data)).SerializeToString()`, copying
    `data` once."""
    chunk_head = pb.UploadChunk(offset=offset).SerializeToString()
    data_head = b"".join(_bytes_field(_CHUNK_DATA, data)) if data else b""
    chunk_size = len(chunk_head) + len(data_head) + len(data)
    return b"".join((_key(_UPLOAD_CHUNK, _LENGTH_DELIMITED), _varint(chunk_size), chunk_head, data_head, data))


def _read_varint(buffer: memoryview, position: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if position >= len(buffer) or shift > 63:
            raise ValueError("a protobuf message ends inside a varint, or has one longer than 10 bytes")
        byte = buffer[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _fields(buffer: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) for each field of a serialized message: an int for a varint, a view for a
    length-delimited field. Fixed-size fields are skipped: the messages read here have none."""
    position = 0
    while position < len(buffer):
        key, position = _read_varint(buffer, position)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, position = _read_varint(buffer, position)
            yield field, value
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _read_varint(buffer, position)
            if position + length > len(buffer):
                raise ValueError("a protobuf message ends inside a length-delimited field")
            yield field, buffer[position : position + length]
            position += length
        elif wire_type in _FIXED_SIZES:
            position += _FIXED_SIZES[wire_type]
            if position > len(buffer):
                raise ValueError("a protobuf message ends inside a fixed-size field")
        else:
            raise ValueError(f"protobuf wire type {wire_type} (field {field}) is not one these messages use")


def decode_download_response(message: bytes) -> DownloadChunk:
    """Parse a serialized `StreamDownloadResponse` as protobuf does (a later field wins, message fields
    merge, unknown fields and known ones of the wrong wire type are skipped), leaving `data` in place."""
    offset = 0
    data = memoryview(b"")
    backup: pb.Backup | None = None
    for field, value in _fields(memoryview(message)):
        if field == _DOWNLOAD_DATA and isinstance(value, memoryview):
            data = value
        elif field == _DOWNLOAD_OFFSET and isinstance(value, int):
            # int64: negative values travel as their 64-bit two's complement.
            offset = value - (1 << 64) if value >= 1 << 63 else value
        elif field == _DOWNLOAD_BACKUP and isinstance(value, memoryview):
            if backup is None:
                backup = pb.Backup()
            backup.MergeFromString(bytes(value))  # small; the stubs type it as bytes
    return DownloadChunk(offset=offset, data=data, backup=backup)
