"""Generate the TypeScript stubs of clients/typescript (ts-proto for @grpc/grpc-js) from protos/, or check
that the committed ones are what the .proto produces and that the package type-checks (`--check`).

protoc is the one in grpcio-tools (the same as for the Python stubs); only the ts-proto plugin comes from
npm, installed with `npm ci` into clients/typescript/node_modules when package-lock.json changed. Without
node and npm, `--check` says so and passes, so that `make test` still runs on a Python-only machine;
APERTURE_REQUIRE_NODE=1 (for CI machines that have Node) turns that into a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import filecmp
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = ROOT / "clients" / "typescript"
# google/rpc/{status,error_details}.proto, copied verbatim from googleapis: callers decode the ErrorInfo
# detail with them. Vendored rather than read from the googleapis-common-protos wheel, whose unpinned
# version would otherwise make the drift check fail whenever Google edits a comment.
VENDORED_PROTOS = PACKAGE / "protos"
OUT = PACKAGE / "src" / "generated"
NODE_MODULES = PACKAGE / "node_modules"
PLUGIN = NODE_MODULES / ".bin" / "protoc-gen-ts_proto"
TSC = NODE_MODULES / ".bin" / "tsc"
# Written into node_modules after `npm ci`: the SHA-256 of the package-lock.json it installed.
INSTALL_STAMP = NODE_MODULES / ".aperture-lock-sha256"
REQUIRE_NODE_ENV = "APERTURE_REQUIRE_NODE"

TS_PROTO_OPTIONS = ",".join(
    [
        "outputServices=grpc-js",
        "esModuleInterop=true",
        # int64 as decimal strings: exact, JSON-friendly and without the `long` dependency.
        "forceLong=string",
        # bytes as Buffer, which a Node Writable takes as it is.
        "env=node",
        "useDate=true",
    ]
)


class NodeMissing(Exception):
    """node or npm is not on PATH."""


def node_tools() -> tuple[str, str]:
    """Paths of node and npm, or NodeMissing naming what is absent."""
    node, npm = shutil.which("node"), shutil.which("npm")
    missing = [name for name, path in (("node", node), ("npm", npm)) if path is None]
    if node is None or npm is None:
        raise NodeMissing(f"{' and '.join(missing)} not found on PATH (the TypeScript client needs Node 20+)")
    return node, npm


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    # Two test runs (or a test and `make ts-check`) must not run `npm ci` into one node_modules at once.
    with (PACKAGE / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_node_modules() -> None:
    """`npm ci` in clients/typescript unless node_modules already holds what package-lock.json pins."""
    _, npm = node_tools()
    wanted = hashlib.sha256((PACKAGE / "package-lock.json").read_bytes()).hexdigest()
    with _install_lock():
        if INSTALL_STAMP.exists() and INSTALL_STAMP.read_text().strip() == wanted:
            return
        print("installing clients/typescript dependencies (npm ci)", file=sys.stderr)
        # --ignore-scripts: nothing here needs an install script (protobufjs' only checks its version).
        subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=PACKAGE,
            check=True,
            timeout=600,
        )
        INSTALL_STAMP.write_text(wanted + "\n")


def proto_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc with ts-proto into `out` (emptied first); returns the generated files."""
    from grpc_tools import protoc

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{VENDORED_PROTOS}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--plugin=protoc-gen-ts_proto={PLUGIN}",
        f"--ts_proto_out={out}",
        f"--ts_proto_opt={TS_PROTO_OPTIONS}",
        *proto_files(PROTOS),
        *proto_files(VENDORED_PROTOS),
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    return sorted(out.rglob("*.ts"))


def check() -> int:
    """Regenerate into a temporary directory and compare, then type-check the package."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.relative_to(tmp) for p in generate(Path(tmp))}
        committed = {p.relative_to(OUT) for p in OUT.rglob("*.ts")} if OUT.exists() else set()
        stale = sorted(
            path
            for path in fresh | committed
            if path not in fresh or path not in committed or not filecmp.cmp(Path(tmp) / path, OUT / path, False)
        )
    if stale:
        print(
            "TypeScript stubs are out of date; run `make ts-protos` and commit:",
            *(f"clients/typescript/src/generated/{p}" for p in stale),
            sep="\n  ",
            file=sys.stderr,
        )
        return 1
    print("TypeScript stubs match protos/")
    result = subprocess.run([str(TSC), "--noEmit", "-p", str(PACKAGE / "tsconfig.json")], check=False, timeout=300)
    if result.returncode != 0:
        print("tsc --noEmit failed in clients/typescript", file=sys.stderr)
        return 1
    print("clients/typescript type-checks (tsc --noEmit, strict)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail when the committed stubs are out of date")
    args = parser.parse_args()
    try:
        ensure_node_modules()
    except NodeMissing as exc:
        if args.check and os.environ.get(REQUIRE_NODE_ENV) != "1":
            print(f"SKIPPED TypeScript client check: {exc}; set {REQUIRE_NODE_ENV}=1 to fail instead")
            return 0
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.check:
        return check()
    for path in generate(OUT):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
