"""Trust settings: where the trusted public keys and the device's state live ([security] in device.toml)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_pfm.config import ConfigError, relative_to_config

DEFAULT_TRUSTED_KEYS = Path("/etc/edge-pfm/trusted_keys")
DEFAULT_STATE_DIR = Path("/var/lib/edge-pfm")
SECURITY_KEYS = {"trusted_keys", "state_dir"}
PUBLIC_KEY_SUFFIXES = (".pub", ".pem")


def _user_state_dir() -> Path:
    """Where a user who cannot write /var/lib keeps the device state (XDG's state home)."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "edge-pfm"


@dataclass(frozen=True)
class Trust:
    """`trusted_keys`: a directory of PEM public keys (`*.pub`, `*.pem`), one per signer; several allow rotation.
    Bundles must be signed by one of them as soon as the directory holds a key; with none, bundles run unsigned and
    every command says so. `state_dir`: the device's own state (owner-only), which a bundle's writer must not be
    able to change."""

    trusted_keys: Path = DEFAULT_TRUSTED_KEYS
    state_dir: Path = DEFAULT_STATE_DIR
    state_dir_configured: bool = False  # the default falls back to the user's state home when it is not writable

    @classmethod
    def from_config(cls, cfg: dict[str, Any], path: str | Path | None = None) -> Trust:
        section = cfg.get("security", {})
        where = f"{path}: [security]" if path else "[security]"
        if not isinstance(section, dict):
            raise ConfigError(f"{where} must be a table")
        unknown = set(section) - SECURITY_KEYS
        if unknown:
            raise ConfigError(f"{where} unknown keys {sorted(unknown)} (known: {sorted(SECURITY_KEYS)})")
        for key in section:
            if not isinstance(section[key], str) or not section[key]:
                raise ConfigError(f"{where} {key} must be a directory path, got {section[key]!r}")
        def where_is(key: str, default: Path) -> Path:  # relative to the config file, as every section's paths
            if key not in section:
                return default
            return relative_to_config(Path(path), section[key]) if path else Path(section[key]).expanduser()

        return cls(trusted_keys=where_is("trusted_keys", DEFAULT_TRUSTED_KEYS),
                   state_dir=where_is("state_dir", DEFAULT_STATE_DIR), state_dir_configured="state_dir" in section)

    @classmethod
    def default(cls) -> Trust:
        """The device's trust as every command finds it: the config of $EDGE_PFM_CONFIG or
        /etc/edge-pfm/device.toml (edge_pfm.config.find_config), else the defaults."""
        from edge_pfm.config import find_config, load_config

        path = find_config(None)
        return cls.from_config(load_config(path), path) if path else cls()

    def key_files(self) -> list[Path]:
        """The trusted public key files, sorted; [] when the directory is absent or holds none."""
        d = self.trusted_keys
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.suffix in PUBLIC_KEY_SUFFIXES and p.is_file())

    @property
    def required(self) -> bool:
        """True when at least one key is trusted: then every bundle must be signed by one of them."""
        return bool(self.key_files())

    def writable_state_dir(self) -> Path:
        """The state directory, created owner-only on first use. The default falls back to the user's state home
        ($XDG_STATE_HOME/edge-pfm) when /var/lib/edge-pfm cannot be created (a user without root); a configured
        directory that cannot be created is an error naming it."""
        for candidate in ([self.state_dir] if self.state_dir_configured else [self.state_dir, _user_state_dir()]):
            try:
                candidate.mkdir(mode=0o700, parents=True, exist_ok=True)
                if os.access(candidate, os.W_OK | os.X_OK):
                    return candidate
            except OSError:
                continue
        raise ConfigError(f"the device state directory {self.state_dir} cannot be created or written; set "
                          "[security] state_dir in device.toml to a directory this user owns")
