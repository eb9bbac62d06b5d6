"""TLS for the gRPC server: PEM files checked at start-up, mutual TLS on request, and certificates that are
re-read on SIGHUP (as an ACME client rotates them) without dropping connections or calls in flight.

gRPC asks `ReloadableServerCredentials._fetch` for the certificate at the start of every new connection;
a reload only swaps what the next handshakes get, so established connections keep theirs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .config import ENV_PREFIX, ConfigError

_logger = logging.getLogger(__name__)

#: Warn at start-up and reload when the certificate expires sooner than this.
EXPIRY_WARNING = timedelta(days=14)


@dataclass(frozen=True)
class TlsFiles:
    """Where the server's TLS material lives (paths from the configuration)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class TlsMaterial:
    """The checked contents of the TLS files."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    not_after: datetime
    subject: str


def _read(path: Path, variable: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{ENV_PREFIX}{variable} names {path}, which cannot be read: {exc.strerror}") from None
    if not data.strip():
        raise ConfigError(f"{ENV_PREFIX}{variable} names {path}, which is empty")
    return data


def _certificates(data: bytes, path: Path, variable: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            f"{ENV_PREFIX}{variable} names {path}, which holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ) from None
    return certificates


def load(files: TlsFiles) -> TlsMaterial:
    """Read and check the files: certificates parse, the key parses and belongs to the first certificate.
    Raises ConfigError naming the variable of the file at fault."""
    chain_data = _read(files.cert, "TLS_CERT")
    chain = _certificates(chain_data, files.cert, "TLS_CERT")
    key_data = _read(files.key, "TLS_KEY")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as exc:
        detail = "it is encrypted with a passphrase" if isinstance(exc, TypeError) else "it holds no PEM private key"
        raise ConfigError(f"{ENV_PREFIX}TLS_KEY names {files.key}, which cannot be used: {detail}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != chain[0].public_key().public_bytes(encoding, public):
        raise ConfigError(
            f"{ENV_PREFIX}TLS_KEY ({files.key}) is not the private key of the certificate in "
            f"{ENV_PREFIX}TLS_CERT ({files.cert})"
        )
    client_ca = None
    if files.client_ca is not None:
        client_ca = _read(files.client_ca, "TLS_CLIENT_CA")
        _certificates(client_ca, files.client_ca, "TLS_CLIENT_CA")
    return TlsMaterial(
        cert_chain=chain_data,
        private_key=key_data,
        client_ca=client_ca,
        not_after=chain[0].not_valid_after_utc,
        subject=chain[0].subject.rfc4514_string(),
    )


def _warn_if_expiring(material: TlsMaterial) -> None:
    left = material.not_after - datetime.now(UTC)
    if left <= timedelta(0):
        _logger.error("the TLS certificate (%s) expired on %s", material.subject, material.not_after.isoformat())
    elif left < EXPIRY_WARNING:
        _logger.warning(
            "the TLS certificate (%s) expires on %s; renew it and send SIGHUP",
            material.subject,
            material.not_after.isoformat(),
        )


def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.private_key, material.cert_chain)], root_certificates=material.client_ca
    )


class ReloadableServerCredentials:
    """Server credentials whose certificate can be replaced while the server runs."""

    def __init__(self, files: TlsFiles):
        self._files = files
        self._material = load(files)
        _warn_if_expiring(self._material)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()

    @property
    def mutual(self) -> bool:
        return self._files.client_ca is not None

    @property
    def material(self) -> TlsMaterial:
        return self._material

    def credentials(self) -> grpc.ServerCredentials:
        # gRPC's stub says the fetcher returns a configuration; its documentation that None means "no
        # change", which is what every connection but the first after a reload gets.
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch)
        return grpc.dynamic_ssl_server_credentials(
            _configuration(self._material), fetch, require_client_authentication=self.mutual
        )

    def reload(self) -> bool:
        """Read the files again; new connections get the new certificate. A bad file is logged and the
        running certificate kept, so a botched renewal does not take the service down."""
        try:
            material = load(self._files)
        except ConfigError as exc:
            _logger.error("TLS reload failed, keeping the current certificate: %s", exc)
            return False
        with self._lock:
            self._material = material
            self._pending = _configuration(material)
        _warn_if_expiring(material)
        _logger.info("TLS certificate reloaded: %s, valid until %s", material.subject, material.not_after.isoformat())
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC at the start of each new connection: hand over a reloaded certificate once.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending
