"""The real `age` and `age-keygen` binaries (Debian's `age` package, which `make test` installs), for tests
that prove what the service encrypts is standard age: keys made by age-keygen, archives decrypted or
encrypted by hand with age."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["AgeKey", "age_decrypt", "age_encrypt", "age_keygen", "age_tool"]


def age_tool(name: str) -> str:
    """Path of `age` or `age-keygen`. Missing is a failure, not a skip: the tests of encryption must run
    wherever the suite runs (`make test` installs the tools)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `make test` installs Debian's age package (apt-get install age)")
    return path


@dataclass(frozen=True)
class AgeKey:
    """An identity file as age-keygen writes it, and its public key."""

    identity_file: Path
    public_key: str


def age_keygen(path: Path) -> AgeKey:
    """A new key pair from the real age-keygen, written to `path` (mode 0600, as age-keygen makes it)."""
    subprocess.run([age_tool("age-keygen"), "-o", str(path)], check=True, capture_output=True, timeout=30)
    public = subprocess.run(
        [age_tool("age-keygen"), "-y", str(path)], check=True, capture_output=True, text=True, timeout=30
    ).stdout.strip()
    assert public.startswith("age1"), public
    return AgeKey(path, public)


def age_decrypt(key: AgeKey, source: Path, target: Path) -> None:
    """`age -d -i IDENTITY -o TARGET SOURCE`, as a user does with a downloaded archive."""
    subprocess.run(
        [age_tool("age"), "-d", "-i", str(key.identity_file), "-o", str(target), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )


def age_encrypt(public_key: str, data: bytes) -> bytes:
    """`age -r RECIPIENT` over `data`, as an administrator encrypts an archive by hand."""
    return subprocess.run(
        [age_tool("age"), "-r", public_key], input=data, check=True, capture_output=True, timeout=300
    ).stdout
