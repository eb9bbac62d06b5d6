"""The download's hand-encoded messages are exactly what protobuf itself would send."""

from __future__ import annotations

import pytest

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup import codec

SIZES = [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 4 * 1024 * 1024]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("with_backup", [False, True])
def test_download_response_is_protobufs_own_encoding(size: int, with_backup: bool) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    backup = pb.Backup(id="aperture-backup-20261128T010000Z.sql.gz", size_bytes=123, sha256="ab" * 32)
    expected = pb.StreamDownloadResponse(offset=size * 3, data=data, backup=backup if with_backup else None)

    encoded = codec.download_response(size * 3, data, backup if with_backup else None)

    assert encoded == expected.SerializeToString()
    assert pb.StreamDownloadResponse.FromString(encoded) == expected


def test_pass_encoded_leaves_bytes_and_serializes_messages() -> None:
    serialize = codec.pass_encoded(pb.Backup.SerializeToString)
    assert serialize is not None
    assert serialize(b"\x0a\x01x") == b"\x0a\x01x"
    assert serialize(pb.Backup(id="x")) == pb.Backup(id="x").SerializeToString()
    assert codec.pass_encoded(None) is None
