"""No input reaches UNKNOWN: hypothesis generates requests for every RPC from the .proto's own descriptors
(any field, any value its type allows, enum values the contract does not know, hostile strings) and sends
them to the real server; every answer is OK or a deliberate status with a message a person can read."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message as pb_message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aperture.backup.v1 import backup_pb2 as pb
from aperture_backup_client import method_path
from tests.support.fixtures import MakeDatabase
from tests.support.postgres import PgServer
from tests.support.service import RunningService, start_service

SERVICE = pb.DESCRIPTOR.services_by_name["BackupService"]
FieldDescriptor = pb_descriptor.FieldDescriptor
#: Statuses that mean the service did not decide what happened.
UNDECIDED = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
#: Inputs known to have broken services of this kind: paths, zones, tokens, ids, lengths, encodings.
HOSTILE_STRINGS = [
    "",
    "../../etc/passwd",
    "/etc/passwd",
    "aperture-backup-2026-11-28T01-00-00-123456Z-7f3a.sql.gz",
    "aperture-backup-x.manifest.json",
    ".state",
    "right/UTC",
    "posix/Europe/Berlin",
    "localtime",
    "Europe/Berlin",
    "24:00",
    "23:59",
    "00:00",
    "x" * 5000,
    "\x00",
    "é\u202e",
    "WyIyMDI2LTAxLTAxVDAwOjAwOjAwIiwgIngiXQ==",  # a page token with a naive timestamp
    "W10=",
]
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


def _value(field: FieldDescriptor, depth: int, known: list[str]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        return st.one_of(
            st.sampled_from([0, 1, -1, 7, 100, 101, 4 * 1024 * 1024 + 1, low, high]), st.integers(low, high)
        )
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(HOSTILE_STRINGS + known), st.text(max_size=80))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=512), st.just(gzip.compress(b"-- PostgreSQL database dump\nSELECT 1;\n")))
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        # proto3 enums are open: a caller may send a number the contract does not define.
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 50))
    if kind == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        return messages(field.message_type, depth + 1, known)
    raise AssertionError(f"no strategy for field type {kind} of {field.full_name}")


def messages(
    descriptor: pb_descriptor.Descriptor, depth: int = 0, known: list[str] | None = None
) -> st.SearchStrategy[pb_message.Message]:
    """Messages of `descriptor` with any subset of fields set (the last one of a oneof wins); strings are
    often one of `known` (real backup ids), so that calls get past validation into the domain."""
    known = known or []
    cls = GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    fields = {}
    for field in descriptor.fields:
        value = _value(field, depth, known)
        if field.is_repeated:
            value = st.lists(value, max_size=3)
        fields[field.name] = st.none() | value

    def build(values: dict[str, Any]) -> pb_message.Message:
        message = cls()
        for name, value in values.items():
            if value is None:
                continue
            field = descriptor.fields_by_name[name]
            if field.is_repeated:
                getattr(message, name).extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(message, name).CopyFrom(value)  # the last one set wins within a oneof
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(fields).map(build)


@pytest.fixture(scope="module")
def fuzzed_service(pg16: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """One service for every example (starting one per example would take the whole budget), with one real
    backup in it, on a small seeded database of its own."""
    from tests.support.fixtures import unique_database_name
    from tests.support.seed import seed

    name = unique_database_name("aperture_fuzz")
    pg16.create_database(name)
    uri = pg16.database_uri(name)
    seed(uri, pg16.extensions, rows=10)
    try:
        with start_service(uri, Path(tmp_path_factory.mktemp("fuzz")) / "backups") as service:
            service.client.create()
            yield service
    finally:
        pg16.drop_database(name)


def _send(channel: grpc.Channel, method: pb_descriptor.MethodDescriptor, requests: list[pb_message.Message]) -> None:
    serializers: dict[str, Any] = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": lambda b: b,
    }
    path = method_path(method.name)
    if method.client_streaming:
        list(channel.stream_stream(path, **serializers)(iter(requests), timeout=120))
    elif method.server_streaming:
        list(channel.unary_stream(path, **serializers)(requests[0], timeout=120))
    else:
        channel.unary_unary(path, **serializers)(requests[0], timeout=120)


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_no_input_reaches_unknown(method: str, fuzzed_service: RunningService, make_database: MakeDatabase) -> None:
    descriptor = SERVICE.methods_by_name[method]
    known = [b.id for b in fuzzed_service.client.list() if b.state == pb.BACKUP_STATE_READY]
    if not known:  # an earlier method's examples deleted them
        known = [fuzzed_service.client.create().id]
    requests = messages(descriptor.input_type, known=known)
    count = (0, 4) if descriptor.client_streaming else (1, 1)
    examples = 30 if method in {"Create", "Restore", "UploadAndRestore"} else 120

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(requests, min_size=count[0], max_size=count[1]))
    def check(batch: list[pb_message.Message]) -> None:
        with grpc.insecure_channel(fuzzed_service.target) as channel:
            try:
                _send(channel, descriptor, batch)
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
                assert code not in UNDECIDED, f"{method}({batch}) answered {code.name}: {details}"
                assert details.strip(), f"{method}({batch}) answered {code.name} without a message"
                assert "Traceback" not in details and "/site-packages/" not in details

    check()
