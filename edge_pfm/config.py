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
    [run]                          # each key also a `run` flag, which overrides it
    bundle = "/var/lib/edge-pfm/bundles/current"   # relative paths here are relative to this file
    backend = "auto"
    tolerance_ms = 16
    log = "/var/log/edge-pfm/decisions.jsonl"      # the decision log (rotated under [outputs])
    [serve]                        # edge-pfm serve (edge_pfm.service.serve): health, camera recovery
    health = "127.0.0.1:9464"      # /healthz /readyz /metrics; any other address needs token, tls_cert, tls_key
    camera_stall_s = 5             # a read blocked this long: the camera is reopened
    frozen_frames = 90             # this many identical frames in a row: the camera is reopened
    camera_give_up_s = 300         # a camera lost this long: exit 6, and systemd restarts the service
    [bundles]                      # the bundle store (edge_pfm.store): edge-pfm update, serve's inbox
    store = "/var/lib/edge-pfm/bundles"            # serve runs its `current` when [run] bundle is not set
    keep = 3                       # versions kept (current, previous and the newest others), under max_mb
    health_pairs = 300             # pairs decided without error before an update is committed
    [view]                         # the live view (edge_pfm.service.view): `serve` serves it; `run --view ADDR`
    listen = "127.0.0.1:8080"      # the same as [serve] health: one listener; off loopback: [serve] token + TLS
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
SECTIONS = ("cameras", "gates", "decision", "modality", "run", "outputs", "security", "serve", "view", "bundles")
# [run]: key -> (the types it takes, what it is); paths are relative to the config file
RUN_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "bundle": ((str,), "a bundle directory"), "log": ((str,), "the decision log's path"),
    "video": ((str,), "the annotated video's path"), "cache_dir": ((str,), "the engine cache directory"),
    "backend": ((str,), "auto, tensorrt or onnxruntime"), "precision": ((str,), "fp32, fp16 or int8"),
    "threads": ((int,), "a number of inference threads"), "tolerance_ms": ((int, float), "milliseconds")}
RUN_CHOICES = {"backend": ("auto", "tensorrt", "onnxruntime"), "precision": ("fp32", "fp16", "int8")}
RUN_PATHS = ("bundle", "log", "video", "cache_dir")
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
    _check_run(cfg, p)
    from edge_pfm.trust.settings import Trust

    Trust.from_config(cfg, p)  # [security]'s keys and values are checked here, with the rest
    if "serve" in cfg or "view" in cfg:
        from edge_pfm.service.settings import ServeSettings, ViewSettings

        ServeSettings.from_config(cfg, p)  # [serve]'s and [view]'s too, with the rest
        ViewSettings.from_config(cfg, p)
    if "bundles" in cfg:
        from edge_pfm.store.store import store_settings

        store_settings(cfg, p)
    return cfg


def checked_section(cfg: dict[str, Any], name: str, keys: dict[str, tuple[tuple[type, ...], str]],
                    path: Path | None, zero_ok: tuple[str, ...] = ()) -> dict[str, Any]:
    """[name] of `cfg`, checked against its whitelist `keys` (key -> (types, what it is)): a table, known keys, the
    right types (never a bool for a number), no empty string, no negative number, no zero unless in `zero_ok`.
    ConfigError names the file, the section and the key. -> the section (empty when absent)."""
    section = cfg.get(name, {})
    where = f"{path}: [{name}]" if path else f"[{name}]"
    if not isinstance(section, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(section) - set(keys)
    if unknown:
        raise ConfigError(f"{where} unknown keys {sorted(unknown)} (known: {sorted(keys)})")
    for key, value in section.items():
        types, what = keys[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, types) or value == "" or \
                (number and (value < 0 or (value == 0 and key not in zero_ok))):
            raise ConfigError(f"{where} {key} must be {what}, got {value!r}")
    return section


def _check_run(cfg: dict[str, Any], p: Path) -> None:
    """[run]: known keys of the right types; paths made relative to the config file's folder."""
    run = checked_section(cfg, "run", RUN_KEYS, p)
    for key, value in run.items():
        if key in RUN_CHOICES and value not in RUN_CHOICES[key]:
            raise ConfigError(f"{p}: [run] {key} = {value!r}: one of {', '.join(RUN_CHOICES[key])}")
        if key in RUN_PATHS:
            run[key] = str(relative_to_config(p, value))


def relative_to_config(config: Path, value: str) -> Path:
    """A path from a config file: absolute as it is, else relative to the config file's folder (not to wherever
    the service happens to start: systemd starts it in /)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else config.parent.absolute() / path
