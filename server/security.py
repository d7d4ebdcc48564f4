"""Who may connect and call: TLS (server/tls.py) and API keys (server/api_keys.py), read from the config.

One object, built once at start (every problem refused there with one line),
that the app asks for each listener's credentials and that re-reads rotated
files on a daemon thread. Without TLS flags and keys it changes nothing: the
listeners stay plaintext and every call is open.
"""
from __future__ import annotations

import ssl
import threading
from typing import Callable, Optional

import grpc

from server.api_keys import ApiKeyFileError, ApiKeys
from server.config import ServerConfig
from server.grpc_auth import HEALTH_SERVICE, REFLECTION_SERVICES
from server.tls import CertificateReloader, TlsError, run_poller


class SecurityError(Exception):
    """A TLS or API-key setting cannot be used; one line."""


class Security:
    def __init__(self, config: ServerConfig):
        try:
            self.tls = (CertificateReloader(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
                        if config.tls_cert_file else None)
            self.keys = ApiKeys(config.api_keys_file, config.api_keys) if (
                config.api_keys_file or config.api_keys.strip(", ")) else None
        except (TlsError, ApiKeyFileError) as e:
            raise SecurityError(str(e)) from None
        open_services = set()
        if config.health_needs_api_key == "off":
            open_services.add(HEALTH_SERVICE)
        if config.reflection_needs_api_key == "off":
            open_services.update(REFLECTION_SERVICES)
        self.open_services = frozenset(open_services)
        self.metrics_needs_api_key = config.metrics_needs_api_key == "on"
        self.reload_interval_seconds = config.tls_reload_interval_seconds
        self._stop = threading.Event()

    @property
    def mode(self) -> str:
        """For the start-up log line: off, tls or mutual-tls, and whether keys are required."""
        tls = "off" if self.tls is None else ("mutual-tls" if self.tls.mutual else "tls")
        return f"tls {tls}, api keys {'on' if self.keys else 'off'}"

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.tls is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.tls.grpc_credentials())

    def http_ssl_context(self) -> Optional[ssl.SSLContext]:
        """A TLS context for an HTTP listener (metrics), rotated with the gRPC one; None without TLS."""
        if self.tls is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        if self.tls.mutual:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=self.tls.client_ca.decode())
        self.tls.track(context)
        return context

    def metrics_key_check(self) -> Optional[Callable[[Optional[str]], str]]:
        return self.keys.check if self.keys is not None and self.metrics_needs_api_key else None

    def poll(self) -> None:
        if self.tls is not None:
            self.tls.poll()
        if self.keys is not None:
            self.keys.poll()

    def start_reloading(self) -> None:
        if self.tls is not None or (self.keys is not None and self.keys.keys_file):
            run_poller(self.poll, self.reload_interval_seconds, self._stop)

    def stop_reloading(self) -> None:
        self._stop.set()
