"""The per-device secret that seals what the engine cache trusts (engine sidecars, check verdicts, precision
picks): an HMAC-SHA256 over each record, keyed by 32 random bytes created on first use, owner-only, in the
device's state directory. Whoever can write the cache but not the state directory cannot forge a record: a planted
engine or an altered verdict no longer matches its seal, and is rebuilt or rechecked."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

SECRET_FILE = "cache.secret"
SECRET_BYTES = 32


class DeviceSecret:
    def __init__(self, key: bytes):
        self._key = key

    @classmethod
    def in_state_dir(cls, state_dir: str | Path) -> DeviceSecret:
        """The secret in `state_dir`, created owner-only (0600, by O_EXCL so that two processes agree) if absent."""
        path = Path(state_dir) / SECRET_FILE
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes()
            if len(key) == SECRET_BYTES:
                return cls(key)
            # a torn first write (a crash between create and write): only the cache's seals depend on it, and a
            # new secret only makes the cache rebuild and recheck
            path.unlink(missing_ok=True)
            return cls.in_state_dir(state_dir)
        key = secrets.token_bytes(SECRET_BYTES)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
        return cls(key)

    def seal(self, record: Any) -> str:
        """The HMAC of a JSON-serialisable record (canonical JSON: sorted keys, no whitespace)."""
        body = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self._key, body, hashlib.sha256).hexdigest()

    def holds(self, record: Any, seal: Any) -> bool:
        """True when `seal` is this device's seal of `record` (constant-time compare)."""
        return isinstance(seal, str) and hmac.compare_digest(self.seal(record), seal)
