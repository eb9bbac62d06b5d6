"""The hand-written wire format of the bulk messages is exactly protobuf's, both ways."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup.rpc_errors import pass_encoded
from aperture_backup_client import wire

SIZES = [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 4 * 1024 * 1024]
BACKUP = pb.Backup(id="aperture-backup-20261128T010000Z.sql.gz", size_bytes=123, sha256="ab" * 32)


def _data(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


def _decoded(message: bytes) -> pb.StreamDownloadResponse:
    """What the hand decoder read, as the generated message, for comparing with protobuf's own parse."""
    chunk = wire.decode_download_response(message)
    return pb.StreamDownloadResponse(offset=chunk.offset, data=bytes(chunk.data), backup=chunk.backup)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("with_backup", [False, True])
def test_download_response_is_protobufs_own_encoding(size: int, with_backup: bool) -> None:
    backup = BACKUP if with_backup else None
    expected = pb.StreamDownloadResponse(offset=size * 3, data=_data(size), backup=backup)

    encoded = wire.encode_download_response(size * 3, _data(size), backup)

    assert encoded == expected.SerializeToString()
    assert pb.StreamDownloadResponse.FromString(encoded) == expected
    assert _decoded(encoded) == expected


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("offset", [0, 1, 300, 5 * 1024**3])
def test_upload_chunk_is_protobufs_own_encoding(size: int, offset: int) -> None:
    expected = pb.UploadAndRestoreRequest(chunk=pb.UploadChunk(offset=offset, data=_data(size)))

    encoded = wire.encode_upload_chunk(offset, _data(size))

    assert encoded == expected.SerializeToString()
    assert pb.UploadAndRestoreRequest.FromString(encoded) == expected


def test_decoded_data_is_a_view_into_the_message_not_a_copy() -> None:
    encoded = wire.encode_download_response(7, b"x" * 1000)
    chunk = wire.decode_download_response(encoded)
    assert chunk.data.obj is encoded
    assert (chunk.offset, bytes(chunk.data), chunk.backup) == (7, b"x" * 1000, None)


def _key(field: int, wire_type: int) -> bytes:
    return bytes([(field << 3) | wire_type])


# Encodings another protobuf writer may produce: any field order, repeated fields (the last scalar wins,
# messages merge), unknown fields of every wire type, a negative int64.
OFFSET_5 = _key(2, 0) + b"\x05"
DATA_ABC = _key(3, 2) + b"\x03abc"
BACKUP_ID = _key(1, 2) + bytes([len(pb.Backup(id="a").SerializeToString())]) + pb.Backup(id="a").SerializeToString()
BACKUP_SIZE = _key(1, 2) + b"\x02" + pb.Backup(size_bytes=9).SerializeToString()
UNKNOWN = _key(9, 0) + b"\x96\x01" + _key(10, 1) + b"12345678" + _key(11, 5) + b"1234" + _key(12, 2) + b"\x02zz"
ENCODINGS = {
    "data first, offset last": DATA_ABC + BACKUP_ID + OFFSET_5,
    "two data fields": DATA_ABC + OFFSET_5 + _key(3, 2) + b"\x02de",
    "two backups merge": BACKUP_ID + OFFSET_5 + BACKUP_SIZE,
    "unknown fields": UNKNOWN + OFFSET_5 + UNKNOWN + DATA_ABC + UNKNOWN,
    "negative offset": pb.StreamDownloadResponse(offset=-2, data=b"q").SerializeToString(),
    "known fields of the wrong wire type": _key(3, 0) + b"\x01" + _key(2, 2) + b"\x01A" + OFFSET_5,
    "empty": b"",
}


@pytest.mark.parametrize("encoded", ENCODINGS.values(), ids=ENCODINGS.keys())
def test_decode_reads_what_protobuf_reads(encoded: bytes) -> None:
    expected = pb.StreamDownloadResponse.FromString(encoded)
    expected.DiscardUnknownFields()  # protobuf keeps them for re-serializing; the decoder has no use for them
    assert _decoded(encoded) == expected


def test_decode_fails_on_every_prefix_that_protobuf_refuses() -> None:
    encoded = wire.encode_download_response(1_000_000, _data(300), BACKUP)
    for end in range(len(encoded)):
        prefix = encoded[:end]
        try:
            expected = pb.StreamDownloadResponse.FromString(prefix)
        except DecodeError:
            with pytest.raises(ValueError, match="ends inside"):
                wire.decode_download_response(prefix)
        else:
            assert _decoded(prefix) == expected, end


def test_pass_encoded_leaves_bytes_and_serializes_messages() -> None:
    serialize = pass_encoded(pb.Backup.SerializeToString)
    assert serialize is not None
    assert serialize(b"\x0a\x01x") == b"\x0a\x01x"
    assert serialize(pb.Backup(id="x")) == pb.Backup(id="x").SerializeToString()
    assert pass_encoded(None) is None
