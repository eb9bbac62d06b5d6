"""Encryption at rest with age (`pyrage`, bindings to the Rust implementation); the only module that
imports it.

Where it sits: pg_dump → compressor → age → SHA-256 → disk, and back: disk → SHA-256 → age → decompressor.
The checksum is of the stored ciphertext, so checks, downloads and offsite copies never see plaintext,
and a downloaded archive decrypts with the standard `age` tool.

pyrage streams (measured with 3 GB through `encrypt_io`/`decrypt_io`: peak RSS 18 MiB, 400-500 MB/s on
one core), but it pulls: it reads from a file object and writes to another until the end. Our pipelines
push (the compressor writes into its sink) or are generators (restore, upload checks), so each stage runs
pyrage in a thread of its own, joined to the pipeline by an `os.pipe()`: the pipe gives back-pressure and
bounded memory for free.

pyrage reports every failure as one of a few exception types; which failure it was is in its message.
Measured: a wrong identity (and a damaged recipient stanza, which no one can tell apart from it) gives
`DecryptError("No matching keys found")`; a damaged or truncated payload an `OSError("decryption error")`
after the intact chunks before it; data that is not age at all another `DecryptError`.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

import pyrage
from pyrage import x25519

from .errors import BackupError, DataLoss, FailedPrecondition, Internal
from .pipes import enlarge_pipe

_logger = logging.getLogger(__name__)

#: The first line of every age file (the format's version line). ASCII-armored files (`age -a`) start with
#: a PEM line instead; they are not archives this service writes, and are not recognised.
AGE_MAGIC = b"age-encryption.org/v1"
#: age encrypts its payload in chunks of 64 KiB plaintext (+16 bytes tag); the first one is needed to see
#: what is inside. With the header (about 100 bytes per recipient) this covers up to hundreds of recipients.
HEAD_CIPHERTEXT_BYTES = 256 * 1024
#: Read size from the pipes between the pipeline and pyrage's thread.
READ_SIZE = 1024 * 1024

IDENTITY_FILE_VARIABLE = "APERTURE_BACKUP_AGE_IDENTITY_FILE"
RECIPIENTS_VARIABLE = "APERTURE_BACKUP_AGE_RECIPIENTS"
RECIPIENTS_FILE_VARIABLE = "APERTURE_BACKUP_AGE_RECIPIENTS_FILE"

#: pyrage's message for "none of the identities opens the header" (see the module's docstring).
_NO_MATCHING_KEYS = "no matching keys"


class AgeKeyError(ValueError):
    """A recipient or identity cannot be used; `variable` names the setting it came from."""

    def __init__(self, variable: str, message: str):
        super().__init__(f"{variable}: {message}")
        self.variable = variable


def is_encrypted(header: bytes) -> bool:
    """Whether a file starting with `header` is an age file."""
    return header.startswith(AGE_MAGIC)


def parse_recipient(text: str, *, variable: str) -> str:
    """Check one age public key (`age1...`); returns it as age prints it."""
    value = text.strip()
    try:
        return str(x25519.Recipient.from_str(value))
    except pyrage.RecipientError as exc:
        raise AgeKeyError(
            variable, f"{_shown(value)} is not an age public key (age1..., as age-keygen -y prints): {exc}"
        ) from None


def read_recipients_file(path: Path, *, variable: str = RECIPIENTS_FILE_VARIABLE) -> tuple[str, ...]:
    """age's recipients file: one public key a line; blank lines and `#` comments are allowed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AgeKeyError(variable, f"cannot read {path}: {exc}") from None
    recipients = tuple(parse_recipient(line, variable=variable) for line in _key_lines(text))
    if not recipients:
        raise AgeKeyError(variable, f"{path} holds no age public key")
    return recipients


def read_identity_file(path: Path, *, variable: str = IDENTITY_FILE_VARIABLE) -> tuple[x25519.Identity, ...]:
    """An identity file as `age-keygen -o` writes it: `AGE-SECRET-KEY-1...` lines, `#` comments."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AgeKeyError(variable, f"cannot read the age identity file {path}: {exc}") from None
    identities = []
    for number, line in enumerate(text.splitlines(), start=1):
        value = line.strip()
        if not value or value.startswith("#"):
            continue
        try:
            identities.append(x25519.Identity.from_str(value))
        except pyrage.IdentityError:
            # Never echo the line: it may be a secret key with a typo.
            raise AgeKeyError(
                variable, f"line {number} of {path} is not an age identity (AGE-SECRET-KEY-1..., as age-keygen writes)"
            ) from None
    if not identities:
        raise AgeKeyError(variable, f"{path} holds no age identity (AGE-SECRET-KEY-1... lines, as age-keygen writes)")
    return tuple(identities)


def _key_lines(text: str) -> Iterator[str]:
    for line in text.splitlines():
        value = line.strip()
        if value and not value.startswith("#"):
            yield value


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


@dataclass(frozen=True)
class AgeKeys:
    """The service's keys: the public keys every new archive is encrypted to (none: archives are not
    encrypted), and the identities that decrypt archives for restores and checks (none: encrypted archives
    are stored and listed, but cannot be restored or checked here)."""

    recipients: tuple[str, ...] = ()
    identities: tuple[x25519.Identity, ...] = field(default=(), repr=False)

    @classmethod
    def load(
        cls,
        recipients: Sequence[str] = (),
        recipients_file: Path | None = None,
        identity_file: Path | None = None,
    ) -> AgeKeys:
        """Parse and read everything the configuration names; raises AgeKeyError naming the variable."""
        parsed = [parse_recipient(r, variable=RECIPIENTS_VARIABLE) for r in recipients if r.strip()]
        if recipients_file is not None:
            parsed += read_recipients_file(recipients_file)
        identities = read_identity_file(identity_file) if identity_file is not None else ()
        return cls(recipients=tuple(dict.fromkeys(parsed)), identities=identities)

    @property
    def encrypts(self) -> bool:
        return bool(self.recipients)

    @property
    def decrypts(self) -> bool:
        return bool(self.identities)

    @property
    def identity_public_keys(self) -> tuple[str, ...]:
        return tuple(str(identity.to_public()) for identity in self.identities)

    def require_identity(self, archive: str, recipients: Sequence[str] = ()) -> None:
        """FAILED_PRECONDITION (ENCRYPTION_KEY_MISSING) unless an identity is configured."""
        if self.identities:
            return
        to = f" (encrypted to {', '.join(recipients)})" if recipients else ""
        raise FailedPrecondition(
            f"{archive} is encrypted with age{to} and this service has no identity to decrypt it: set "
            f"{IDENTITY_FILE_VARIABLE} to the age identity file (age-keygen's output) whose public key it was "
            "encrypted to; nothing was changed",
            reason="ENCRYPTION_KEY_MISSING",
        )

    # -- writing ---------------------------------------------------------------------------------------

    def encrypting(self, target: io.RawIOBase) -> EncryptingSink:
        """A sink that encrypts what is written into it to every recipient, into `target`."""
        if not self.recipients:
            raise Internal("encryption asked for without age recipients")
        return EncryptingSink([x25519.Recipient.from_str(r) for r in self.recipients], target)

    # -- reading ---------------------------------------------------------------------------------------

    def decrypting(
        self, ciphertext: Iterable[bytes], *, archive: str, recipients: Sequence[str] = ()
    ) -> Generator[bytes, None, None]:
        """The plaintext of an age stream given piece by piece, as pieces (only ever of authenticated
        chunks). Raises FailedPrecondition without or with a wrong identity, DataLoss when the ciphertext is
        damaged or truncated. Closing the generator early stops the decryption."""
        self.require_identity(archive, recipients)
        return _decrypt_stream(self.identities, ciphertext, archive=archive, recipients=recipients)

    def decrypt_head(self, ciphertext: bytes, *, archive: str, recipients: Sequence[str] = ()) -> bytes:
        """The plaintext of the complete chunks in `ciphertext`, a prefix of an age file (pass at least
        HEAD_CIPHERTEXT_BYTES when the file has them): enough to see what the archive is."""
        self.require_identity(archive, recipients)
        out = io.BytesIO()
        try:
            pyrage.decrypt_io(io.BytesIO(ciphertext), out, list(self.identities))
        except (pyrage.DecryptError, OSError) as exc:
            if not out.tell():  # a prefix ends mid-chunk: what came before it is what we wanted
                raise _decrypt_error(exc, self, archive, recipients) from None
        return out.getvalue()

    def wrong_key(self, archive: str, recipients: Sequence[str]) -> FailedPrecondition:
        to = ", ".join(recipients) if recipients else "public keys this service does not know"
        return FailedPrecondition(
            f"{archive} cannot be decrypted with the identity in {IDENTITY_FILE_VARIABLE} (public key "
            f"{', '.join(self.identity_public_keys)}): it was encrypted to {to}. Configure the identity that "
            "belongs to one of them; nothing was changed",
            reason="WRONG_ENCRYPTION_KEY",
            metadata={"age_recipients": ",".join(recipients)} if recipients else {},
        )


def _decrypt_error(exc: BaseException, keys: AgeKeys, archive: str, recipients: Sequence[str]) -> BackupError:
    if isinstance(exc, BackupError):
        return exc
    if isinstance(exc, pyrage.DecryptError) and _NO_MATCHING_KEYS in str(exc).lower():
        return keys.wrong_key(archive, recipients)
    return DataLoss(
        f"{archive} does not decrypt: its age data is damaged or truncated ({exc}); nothing was changed",
        reason="ARCHIVE_CORRUPT",
    )


# -- the encrypting stage of the write pipeline ------------------------------------------------------------


class EncryptingSink(io.RawIOBase):
    """Written to by the compressor; pyrage, in a thread, reads the pipe this writes into and writes the
    age file into `target` (the hashing file). `close()` ends the age stream and waits for it; an error of
    the thread (a full disk) is raised from the next `write` or from `close`."""

    def __init__(self, recipients: list[x25519.Recipient], target: io.RawIOBase):
        super().__init__()
        read_fd, write_fd = os.pipe()
        enlarge_pipe(write_fd)
        self._pipe = open(write_fd, "wb", buffering=0, closefd=True)  # noqa: SIM115 - closed by close()
        self._error: BaseException | None = None
        source = open(read_fd, "rb", buffering=0, closefd=True)  # noqa: SIM115 - closed by the thread
        self._thread = threading.Thread(
            target=self._run, args=(source, target, recipients), name="age-encrypt", daemon=True
        )
        self._thread.start()

    def _run(self, source: BinaryIO, target: io.RawIOBase, recipients: list[x25519.Recipient]) -> None:
        try:
            with source:
                # pyrage only calls read/readinto and write; its stub asks for BufferedIOBase.
                out = cast(io.BufferedIOBase, _Unclosable(target))
                pyrage.encrypt_io(cast(io.BufferedIOBase, source), out, recipients)
        except BaseException as exc:
            self._error = exc

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | memoryview | bytearray, /) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        written = 0
        try:
            while written < len(view):
                written += self._pipe.write(view[written:]) or 0
        except BrokenPipeError:
            self._raise_thread_error()
            raise
        return len(view)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self._pipe.close()  # end of input: pyrage writes the last chunk and returns
        self._thread.join()
        self._raise_thread_error()

    def _raise_thread_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class _Unclosable(io.RawIOBase):
    """The target as pyrage sees it: writes pass through, and pyrage cannot close it (the archive writer
    still fsyncs and renames the file)."""

    def __init__(self, target: io.RawIOBase):
        super().__init__()
        self._target = target

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | memoryview | bytearray, /) -> int:  # type: ignore[override]
        view = memoryview(data)
        written = 0
        while written < len(view):
            n = self._target.write(view[written:])
            written += n if n is not None else len(view) - written
        return len(view)


# -- the decrypting stage of the read path -----------------------------------------------------------------


class _IterReader(io.RawIOBase):
    """An iterator of ciphertext pieces as the readable file pyrage wants. Stops (EOF) when `stop` is set;
    an error of the iterator is kept, so the caller can raise it rather than pyrage's wrapping of it."""

    def __init__(self, pieces: Iterable[bytes], stop: threading.Event):
        super().__init__()
        self._pieces = iter(pieces)
        self._stop = stop
        self._pending = memoryview(b"")
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        while not self._pending:
            if self._stop.is_set():
                return 0
            try:
                piece = next(self._pieces, None)
            except BaseException as exc:
                self.error = exc
                raise
            if piece is None:
                return 0
            self._pending = memoryview(piece).cast("B")
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _decrypt_stream(
    identities: Sequence[x25519.Identity], ciphertext: Iterable[bytes], *, archive: str, recipients: Sequence[str]
) -> Generator[bytes, None, None]:
    read_fd, write_fd = os.pipe()
    enlarge_pipe(write_fd)
    stop = threading.Event()
    reader = _IterReader(ciphertext, stop)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with open(write_fd, "wb", buffering=READ_SIZE, closefd=True) as sink:
                pyrage.decrypt_io(cast(io.BufferedIOBase, reader), cast(io.BufferedIOBase, sink), list(identities))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="age-decrypt", daemon=True)
    thread.start()
    try:
        with open(read_fd, "rb", buffering=0, closefd=True) as plaintext:
            while data := plaintext.read(READ_SIZE):
                yield data
        thread.join()
    finally:
        # An early close (the consumer has seen enough, or failed): the thread stops at its next read or
        # write (EOF on the ciphertext side, a broken pipe on the plaintext side).
        stop.set()
        thread.join()
    # The source's own error (a read error, a DataLoss of the layer below) says more than pyrage's wrapping.
    if reader.error is not None:
        raise reader.error
    if failure:
        raise _decrypt_error(failure[0], AgeKeys(identities=tuple(identities)), archive, recipients)
