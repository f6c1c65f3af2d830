"""[serve] and [view] in device.toml: where health and the live view listen, who may ask, and how serve recovers
cameras. Checked against a whitelist when the config is read, like every section; relative paths are relative to
the config file. The token and TLS files of [serve] guard both listeners (one listener design, one set of
credentials)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_pfm.config import ConfigError, checked_section, relative_to_config
from edge_pfm.service.listener import DEFAULT_ADDRESS, ListenAddress, ListenerSecurity

# key -> (types, what it is)
SERVE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "health": ((str,), "an address such as 127.0.0.1:9464"),
    "token": ((str,), "a random token of at least 16 characters"),
    "tls_cert": ((str,), "a PEM certificate's path"), "tls_key": ((str,), "its PEM private key's path"),
    "camera_stall_s": ((int, float), "seconds a read may block before the camera is reopened"),
    "frozen_frames": ((int,), "identical frames in a row that count as a frozen camera (0: off)"),
    "camera_give_up_s": ((int, float), "seconds a camera may stay lost before serve exits 6 to be restarted"),
}


@dataclass(frozen=True)
class ServeSettings:
    health: str = DEFAULT_ADDRESS
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    camera_stall_s: float = 5.0  # a live camera delivers every 33-66 ms: 5 s blocked is a hung driver
    frozen_frames: int = 90  # 3 s of identical frames at 30 fps: a live sensor's noise never repeats that long
    camera_give_up_s: float = 300.0  # reopening has not helped for 5 min: a restart (and nvargus-daemon's) might

    @classmethod
    def from_config(cls, cfg: dict[str, Any], path: Path | None = None) -> ServeSettings:
        section = checked_section(cfg, "serve", SERVE_KEYS, path, zero_ok=("frozen_frames",))
        where = f"{path}: [serve]" if path else "[serve]"
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key == "frozen_frames" and value == 1:
                raise ConfigError(f"{where} frozen_frames = 1 would call every frame frozen: use 0 (off) or >= 2")
            values[key] = relative_to_config(path, value) if key.startswith("tls_") and path else value
        settings = cls(**values)
        settings.security.check(settings.address)  # an insecure or half-configured listener: refused here
        return settings

    @property
    def address(self) -> ListenAddress:
        return ListenAddress.parse(self.health)

    @property
    def security(self) -> ListenerSecurity:
        return ListenerSecurity(self.token, self.tls_cert, self.tls_key)


VIEW_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "listen": ((str,), "an address such as 127.0.0.1:8080 (the same as [serve] health: one listener for both)"),
    "max_clients": ((int,), "how many browsers may stream at once"),
}
VIEW_KEY = "[view] listen"


@dataclass(frozen=True)
class ViewSettings:
    listen: str | None = None  # None: no live view
    max_clients: int = 4  # each streaming client holds a thread and a socket
    key: str = VIEW_KEY  # where the address came from, named in errors (run's --view)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], path: Path | None = None) -> ViewSettings:
        settings = cls(**checked_section(cfg, "view", VIEW_KEYS, path))
        if settings.listen is not None:
            ServeSettings.from_config(cfg, path).security.check(settings.address)
        return settings

    @property
    def address(self) -> ListenAddress:
        return ListenAddress.parse(self.listen, key=self.key)
