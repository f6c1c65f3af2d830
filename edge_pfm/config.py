"""Device configuration file (TOML): cameras, gates, decision smoothing. CLI flags override it.

    [cameras.white_light]          # or [cameras.fluorescence]
    source = "/dev/v4l/by-id/usb-Vendor_Cam_SN1234-video-index0"   # a stable name: /dev/videoN can renumber
    fourcc = "MJPG"
    width = 1920
    height = 1080
    fps = 30
    [cameras.fluorescence]
    source = "serial:SN5678"       # or the camera's USB serial number
    exposure = 300                 # manual exposure: the fluorescence camera needs it
    gain = 8
    [gates.white_light]
    blur_min = 2.1
    glare_max = 0.04
    [modality]                     # each camera's frames must look like its modality (runtime.modality)
    fluo_green_share_min = 0.40
    [decision]
    method = "ema"
    alpha = 0.3
    max_age_s = 0.5
    [run]
    backend = "auto"
    tolerance_ms = 16
    [outputs]                      # retention of --log and --video (edge_pfm.outputs); 0 turns a limit off
    log_rotate_mb = 64
    log_rotate_minutes = 0
    log_cap_mb = 2048
    video_rotate_mb = 1024
    video_rotate_minutes = 60
    video_cap_mb = 20480
    min_free_mb = 16               # the preflight's spare space on each output's filesystem
    [security]                     # edge_pfm.trust: who may sign a bundle, where the device keeps its state
    trusted_keys = "/etc/edge-pfm/trusted_keys"   # PEM public keys; with one there, only signed bundles run
    state_dir = "/var/lib/edge-pfm"                # the rollback floor and the engine cache's secret

Every device command finds this file the same way (find_config): --config, else $EDGE_PFM_CONFIG, else
/etc/edge-pfm/device.toml when it exists.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edge_pfm.errors import EdgePfmError

CAMERA_KEYS = {"source", "fourcc", "width", "height", "fps", "exposure", "gain", "buffer_size", "stamps"}
OUTPUT_KEYS = {f"{o}_{k}" for o in ("log", "video") for k in ("rotate_mb", "rotate_minutes", "cap_mb")} | {"min_free_mb"}
SECTIONS = ("cameras", "gates", "decision", "modality", "run", "outputs", "security")
CONFIG_ENV = "EDGE_PFM_CONFIG"
SYSTEM_CONFIG = Path("/etc/edge-pfm/device.toml")


class ConfigError(EdgePfmError, ValueError):
    """A config file or value cannot be used; the message names the file and the key."""


def parse_size(text: str) -> tuple[int, int]:
    """'1280x720' -> (1280, 720): the one WIDTHxHEIGHT parser (also an argparse type: ValueError -> usage)."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ValueError(f"expected WIDTHxHEIGHT such as 1280x720, got {text!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"expected a positive WIDTHxHEIGHT, got {text!r}")
    return w, h


def find_config(flag: str | os.PathLike | None) -> Path | None:
    """The device configuration every command reads: `flag` (--config), else $EDGE_PFM_CONFIG, else
    /etc/edge-pfm/device.toml when it exists, else None (the defaults)."""
    if flag:
        return Path(flag)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    return SYSTEM_CONFIG if SYSTEM_CONFIG.is_file() else None


def load_device_config(flag: str | os.PathLike | None) -> tuple[Path | None, dict[str, Any]]:
    """(the config file found as find_config says, its checked contents); (None, {}) when there is none."""
    path = find_config(flag)
    return path, (load_config(path) if path else {})


def load_config(path: str | Path) -> dict[str, Any]:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # JetPack 6's Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as exc:
            raise ConfigError("reading a TOML config on Python 3.10 needs `pip install tomli`") from exc
    p = Path(path)
    try:
        cfg = tomllib.loads(p.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {p} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML ({exc})") from exc
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{p}: unknown sections {sorted(unknown)} (known: {', '.join(SECTIONS)})")
    bad = set(cfg.get("outputs", {})) - OUTPUT_KEYS
    if bad:
        raise ConfigError(f"{p}: [outputs] unknown keys {sorted(bad)} (known: {sorted(OUTPUT_KEYS)})")
    for name, cam in cfg.get("cameras", {}).items():
        if name not in ("white_light", "fluorescence", "alternating"):
            raise ConfigError(f"{p}: [cameras.{name}] must be white_light, fluorescence or alternating")
        bad = set(cam) - CAMERA_KEYS
        if bad:
            raise ConfigError(f"{p}: [cameras.{name}] unknown keys {sorted(bad)} (known: {sorted(CAMERA_KEYS)})")
    from edge_pfm.trust.settings import Trust

    Trust.from_config(cfg, p)  # [security]'s keys and values are checked here, with the rest
    return cfg
