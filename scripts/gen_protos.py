"""Generate the Python stubs (grpcio-tools + mypy-protobuf) from protos/, or check that the committed ones
are what the .proto produces (`--check`), so that the stubs cannot silently drift from the contract."""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "service"
DESCRIPTOR_SET = Path("aperture/backup/v1/descriptor_set.binpb")


def generate(out: Path) -> list[Path]:
    """Run protoc into `out`; returns the generated files."""
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    bin_dir = Path(sys.executable).parent
    (out / DESCRIPTOR_SET).parent.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        # The mypy-protobuf plugins live beside this interpreter, which need not be on PATH.
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        # A descriptor set with the .proto comments, served by reflection so that `grpcurl describe`
        # shows the documentation (the _pb2 modules carry no comments).
        f"--descriptor_set_out={out / DESCRIPTOR_SET}",
        "--include_source_info",
        "--include_imports",
        *files,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    generated = [out / DESCRIPTOR_SET]
    for proto in files:
        stem = out / Path(proto).with_suffix("")
        generated += [Path(f"{stem}{suffix}") for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")]
    return generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when the committed stubs are out of date")
    args = parser.parse_args()
    if not args.check:
        for path in generate(OUT):
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [
            path.relative_to(Path(tmp))
            for path in generate(Path(tmp))
            if not (OUT / path.relative_to(Path(tmp))).exists()
            or not filecmp.cmp(path, OUT / path.relative_to(Path(tmp)), shallow=False)
        ]
    if stale:
        print("generated stubs are out of date; run `make protos` and commit:", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print("generated stubs match protos/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
