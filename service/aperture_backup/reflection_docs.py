"""Server reflection that carries the .proto comments, so `grpcurl describe` shows the documentation.

The generated `_pb2` modules hold descriptors without source info, and the reflection service serialises
descriptors with `CopyToProto`, which drops it anyway. So reflection is given a pool whose file
descriptors copy out the protos of the committed descriptor set (built with `--include_source_info`).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from google.protobuf import descriptor, descriptor_pb2, descriptor_pool

DESCRIPTOR_SET = "descriptor_set.binpb"


class _DocumentedFile:
    """A FileDescriptor whose CopyToProto includes the comments."""

    def __init__(self, pool: DocumentedPool, file: descriptor.FileDescriptor):
        self._pool = pool
        self._file = file
        self.name = file.name

    @property
    def dependencies(self) -> list[_DocumentedFile]:
        return [self._pool.wrap(dep) for dep in self._file.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        documented = self._pool.documented.get(self.name)
        if documented is not None:
            proto.CopyFrom(documented)
        else:
            self._file.CopyToProto(proto)


class DocumentedPool:
    """The subset of DescriptorPool that grpc reflection calls."""

    def __init__(self, pool: descriptor_pool.DescriptorPool, documented: dict[str, descriptor_pb2.FileDescriptorProto]):
        self._pool = pool
        self.documented = documented

    def wrap(self, file: descriptor.FileDescriptor) -> _DocumentedFile:
        return _DocumentedFile(self, file)

    def FindFileByName(self, name: str) -> _DocumentedFile:
        return self.wrap(self._pool.FindFileByName(name))

    def FindFileContainingSymbol(self, symbol: str) -> _DocumentedFile:
        return self.wrap(self._pool.FindFileContainingSymbol(symbol))

    def FindMessageTypeByName(self, name: str) -> Any:
        return self._pool.FindMessageTypeByName(name)

    def FindExtensionByNumber(self, message: Any, number: int) -> Any:
        return self._pool.FindExtensionByNumber(message, number)

    def FindAllExtensions(self, message: Any) -> Any:
        return self._pool.FindAllExtensions(message)


def documented_pool() -> DocumentedPool:
    """The default pool (every service this server registers), with comments for our own files."""
    data = resources.files("aperture.backup.v1").joinpath(DESCRIPTOR_SET).read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data)
    documented = {f.name: f for f in files.file if f.source_code_info.location}
    return DocumentedPool(descriptor_pool.Default(), documented)
