"""API keys: who may call. Clients send `authorization: Bearer KEY` (gRPC metadata or HTTP header).

Keys come from --api-keys-file (one per line: the key itself, or `sha256:` and
its SHA-256 in hex, so the file need not hold the secret; `#` starts a
comment) and from ATTNSERVE_API_KEYS (comma-separated keys). Only SHA-256
digests are kept in memory. A presented key is hashed and compared with every
digest in constant time, so neither the comparison nor its position in the
list tells an attacker how close a guess was. Keys are never logged.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path
from typing import Optional

from server.tls import file_signature

log = logging.getLogger("attnserve.auth")

HASH_PREFIX = "sha256:"
# The outcomes counted in metrics: never key material.
ACCEPTED, MISSING, WRONG = "accepted", "missing", "wrong"
OUTCOMES = (ACCEPTED, MISSING, WRONG)


class ApiKeyFileError(Exception):
    """The keys file cannot be used; the message is one line (with a line number, never a key)."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_keys_file(text: str, source: str = "the API keys file") -> frozenset[bytes]:
    digests = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(HASH_PREFIX):
            hex_digest = line[len(HASH_PREFIX):]
            try:
                raw = bytes.fromhex(hex_digest)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise ApiKeyFileError(f"{source} line {number}: a sha256: entry needs 64 hex digits")
            digests.add(raw)
        else:
            digests.add(digest(line))
    return frozenset(digests)


def parse_env_keys(value: str) -> frozenset[bytes]:
    return frozenset(digest(key.strip()) for key in value.split(",") if key.strip())


def bearer_token(authorization: Optional[str]) -> Optional[str]:
    """The KEY of `Bearer KEY`, or None when the header is absent or of another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class ApiKeys:
    """The accepted keys (digests), re-read from the file when it changes. Reads are lock-free: the set is swapped."""

    def __init__(self, keys_file: str = "", env_keys: str = ""):
        self.keys_file = keys_file
        self._env = parse_env_keys(env_keys)
        self._signature = file_signature(keys_file) if keys_file else None
        self._digests = self._env | (self._read_file() if keys_file else frozenset())
        if not self._digests:
            raise ApiKeyFileError(f"{keys_file or 'ATTNSERVE_API_KEYS'} holds no API key; every call would be refused")

    def _read_file(self) -> frozenset[bytes]:
        try:
            text = Path(self.keys_file).read_text()
        except OSError as e:
            raise ApiKeyFileError(f"cannot read the API keys file {self.keys_file}: {e.strerror or e}") from None
        return parse_keys_file(text, self.keys_file)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization: Optional[str]) -> str:
        """ACCEPTED, MISSING (no bearer token) or WRONG."""
        token = bearer_token(authorization)
        if token is None:
            return MISSING
        presented = digest(token)
        matched = False
        for known in self._digests:  # every digest is compared: the time does not depend on which one matches
            matched |= hmac.compare_digest(presented, known)
        return ACCEPTED if matched else WRONG

    def poll(self) -> bool:
        """Re-read a changed keys file; True when the set changed. A broken file is logged and the old keys kept."""
        if not self.keys_file:
            return False
        signature = file_signature(self.keys_file)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            digests = self._env | self._read_file()
        except ApiKeyFileError as e:
            log.error("API keys not reloaded, the previous %d stay in force: %s", len(self._digests), e)
            return False
        if not digests:
            log.error("API keys not reloaded: %s holds no key; the previous %d stay in force",
                      self.keys_file, len(self._digests))
            return False
        changed = digests != self._digests
        self._digests = digests
        if changed:
            log.info("API keys reloaded from %s: %d keys", self.keys_file, len(digests))
        return changed
