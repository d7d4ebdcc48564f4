"""TLS for every listener: a certificate and key checked at start, and picked up again when rotated.

    --tls-cert-file, --tls-key-file ──► load_pair(): parse, match key to certificate, check the dates
                                            │  (refused at start with one line; refused and logged on rotation)
    CertificateReloader.poll() ─────────────┤  every --tls-reload-interval-seconds, on a daemon thread
                                            ├──► gRPC: a dynamic credential whose fetcher hands the newest
                                            │    pair to the next handshake (connections in flight keep theirs)
                                            └──► HTTP listeners (metrics): SSLContext.load_cert_chain again

With --tls-client-ca-file every listener also requires a client certificate
signed by that CA (mutual TLS). cert-manager rewrites a mounted Secret by
swapping a symbolic link, so a reload sees the old pair or the new one, never
half of each; a half-written pair from another tool fails the key check and is
retried at the next poll.
"""
from __future__ import annotations

import datetime
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

log = logging.getLogger("attnserve.tls")


class TlsError(Exception):
    """A certificate, key or CA file cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class CertificatePair:
    cert_pem: bytes  # the chain, leaf first
    key_pem: bytes
    subject: str
    not_after: datetime.datetime
    fingerprint: str  # SHA-256 of the leaf, hex: what a rotation log line names


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"cannot read the {what} {path}: {e.strerror or e}") from None


def load_pair(cert_file: str, key_file: str, now: Optional[datetime.datetime] = None) -> CertificatePair:
    """Read and check a certificate (chain) and its private key; raise TlsError saying what is wrong."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    cert_pem, key_pem = _read(cert_file, "TLS certificate"), _read(key_file, "TLS key")
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as e:
        raise TlsError(f"the TLS certificate {cert_file} is not a PEM certificate ({e})") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise TlsError(f"the TLS key {key_file} is not an unencrypted PEM private key ({e})") from None
    raw = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*raw) != leaf.public_key().public_bytes(*raw):
        raise TlsError(f"the TLS key {key_file} does not match the certificate {cert_file}")
    if leaf.not_valid_after_utc <= now:
        raise TlsError(f"the TLS certificate {cert_file} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if leaf.not_valid_before_utc > now:
        raise TlsError(f"the TLS certificate {cert_file} is not valid before "
                       f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    return CertificatePair(cert_pem, key_pem, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc,
                           leaf.fingerprint(hashes.SHA256()).hex())


def load_client_ca(path: str) -> bytes:
    pem = _read(path, "TLS client CA file")
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise TlsError(f"the TLS client CA file {path} holds no PEM certificate ({e})") from None
    return pem


def file_signature(*paths: str) -> tuple:
    """What changes when any of the files is rewritten or its symbolic link swapped."""
    signature = []
    for path in paths:
        try:
            st = os.stat(path)
            signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            signature.append(None)
    return tuple(signature)


class CertificateReloader:
    """The pair every listener serves, re-read when its files change. Thread-safe."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = ""):
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._signature = self._files_signature()
        self.pair = load_pair(cert_file, key_file)
        self.client_ca = load_client_ca(client_ca_file) if client_ca_file else None
        self._lock = threading.Lock()
        self._served = (self.pair, self.client_ca)  # what gRPC's next handshake should get; swapped whole
        self._handed_to_grpc: Optional[tuple] = None
        self._contexts: list[ssl.SSLContext] = []

    def _files_signature(self) -> tuple:
        return file_signature(*(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p))

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def poll(self) -> bool:
        """Pick up rotated files: True when a new pair (or client CA) is now served. A broken one is logged and refused.

        A new client CA is trusted at once; on HTTP listeners (metrics) the previous CA also stays trusted until
        a restart, since an SSLContext can add CAs but not drop them."""
        signature = self._files_signature()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            pair = load_pair(self.cert_file, self.key_file)
            client_ca = load_client_ca(self.client_ca_file) if self.client_ca_file else None
            for context in self._contexts:  # new connections only; the files were just checked
                context.load_cert_chain(self.cert_file, self.key_file)
                if client_ca is not None and client_ca != self.client_ca:
                    context.load_verify_locations(cadata=client_ca.decode())
        except (TlsError, ssl.SSLError, OSError) as e:
            log.error("TLS rotation refused, still serving certificate %s: %s", self.pair.fingerprint[:16], e)
            return False
        if pair == self.pair and client_ca == self.client_ca:
            return False  # touched, not changed
        previous_ca = self.client_ca
        with self._lock:
            self.pair, self.client_ca = pair, client_ca
            self._served = (pair, client_ca)
        log.info("TLS files reloaded: certificate %s (%s), valid until %s%s", pair.fingerprint[:16], pair.subject,
                 f"{pair.not_after:%Y-%m-%d %H:%M} UTC", "; client CA replaced" if client_ca != previous_ca else "")
        return True

    def grpc_credentials(self) -> grpc.ServerCredentials:
        def configuration(served: tuple):
            pair, client_ca = served
            return grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)], client_ca)

        def fetch():  # called by gRPC on every handshake: no I/O here, only what poll() last accepted
            with self._lock:
                if self._handed_to_grpc is self._served:
                    return None  # keep serving the configuration handed over last
                self._handed_to_grpc = self._served
                return configuration(self._served)

        with self._lock:
            self._handed_to_grpc = self._served
        return grpc.dynamic_ssl_server_credentials(configuration(self._served), fetch,
                                                   require_client_authentication=self.mutual)

    def track(self, context: ssl.SSLContext) -> None:
        """An HTTP listener's context, to be given the new pair on rotation."""
        self._contexts.append(context)


def run_poller(poll: Callable[[], object], interval_seconds: float, stop: threading.Event) -> threading.Thread:
    """Call `poll` every interval on a daemon thread until `stop` is set; a failing poll is logged, not fatal."""
    def loop():
        while not stop.wait(interval_seconds):
            try:
                poll()
            except Exception:
                log.exception("reloading security files failed")

    thread = threading.Thread(target=loop, name="attnserve-reload", daemon=True)
    thread.start()
    return thread
