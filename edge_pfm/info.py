"""`edge-pfm info`: what this machine can run, and why."""
from __future__ import annotations

import platform
import sys
from typing import TYPE_CHECKING

from edge_pfm import __version__
from edge_pfm._lazy import is_importable

if TYPE_CHECKING:
    from pathlib import Path

    from edge_pfm.bundle import Bundle
    from edge_pfm.trust import Trust
    from edge_pfm.trust.device_secret import DeviceSecret


def _version(module: str) -> str:
    if not is_importable(module):
        return "not installed"
    try:
        import importlib

        return str(getattr(importlib.import_module(module), "__version__", "installed"))
    except Exception as exc:  # a broken install is worth reporting, not crashing on
        return f"broken ({type(exc).__name__}: {exc})"


def describe(bundle: str | Path | Bundle | None = None, cache_dir: str | None = None, cameras: dict | None = None,
             seconds: float = 2.0, trust: Trust | None = None) -> str:
    """Versions, backends, cached engines (their seals checked under `trust`, else the bundle's, else the device's
    default), the bundle (a path is loaded under the device's default trust; with cache_dir's checks and pick), and,
    given `cameras` ({label: unstarted FrameSource}), what each camera delivers for `seconds`
    (runtime.camera_probe)."""
    from pathlib import Path

    from edge_pfm.bundle import Bundle
    from edge_pfm.engine.trt_build import DEFAULT_CACHE_DIR

    b = None if not bundle else bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    cache = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR
    lines = [
        f"edge-pfm {__version__}  python {platform.python_version()}  {platform.machine()}  {sys.platform}",
    ]
    for module in ("numpy", "cv2", "onnxruntime", "tensorrt", "pycuda"):
        lines.append(f"  {module:12s} {_version(module)}")
    from edge_pfm.backends.select import tensorrt_status

    ok, why = tensorrt_status()
    lines.append(f"  TensorRT backend: {'available' if ok else 'unavailable'} ({why})")
    from edge_pfm.engine.cache import find_any_engine

    engines = find_any_engine(cache, _secret(trust or (b.trust if b else None))) if cache.is_dir() else []
    for e in engines:  # (no cache directory: no secret is made)
        seal = " (seal does not match: rebuilt before any use)" if e["sealed"] is False else ""
        lines.append(f"  cached engine {e['file']}: {e.get('precision')} TensorRT {e.get('trt_version')} "
                     f"{e.get('gpu_name')} sm{e.get('compute_capability')}{seal}")
    if b:
        from edge_pfm.backends.select import select_backend

        lines.append(b.summary())
        if b.signature is not None:
            lines.append(f"  signature {b.signature.describe()}")
        sel = select_backend(b, "auto", trt_status=(ok, why))
        lines.append(f"  backend  auto -> {sel.backend} {sel.precision}: {sel.reason}; {sel.precision_reason}")
        lines += _references(b)
        lines += _precisions(b, sel.backend, cache)
        from edge_pfm.lesion import map_verdict

        lines.append(f"  {map_verdict(b, sel.precision).describe()}")
        from edge_pfm.thread_plan import plan_threads

        lines.append(f"  {plan_threads(sel.backend).describe()}")
    if cameras:
        from edge_pfm.runtime.camera_probe import probe

        lines += probe(cameras, seconds)
    return "\n".join(lines)


def _secret(trust: Trust | None) -> DeviceSecret | None:
    """The device secret that seals the cache (in `trust`'s state directory, default: the device's trust as every
    command finds it), or None when the state directory cannot be used: info reports, it does not fail on that."""
    from edge_pfm.errors import EdgePfmError
    from edge_pfm.trust import Trust
    from edge_pfm.trust.device_secret import DeviceSecret

    try:
        return DeviceSecret.in_state_dir((trust or Trust.default()).writable_state_dir())
    except (EdgePfmError, OSError):
        return None


def _references(bundle) -> list[str]:
    entry = bundle.manifest.get("references")
    if not entry:
        return ["  references none: no engine can be checked before use (re-export or re-calibrate the bundle)"]
    lines = [f"  references {entry['pairs']} pairs ({entry['source']}); each engine is checked against its precision's:"]
    for p, e in entry["precisions"].items():
        t = e["tolerance"]
        iou = f", map IoU >= {t['min_map_iou']:.3f}" if t.get("min_map_iou") is not None else ""
        lines.append(f"    {p}: top-1 >= {t['min_top1_agreement']:.2%}, max |dp| <= {t['max_prob_diff']:.4f}, logit "
                     f"RMSE <= {t['max_logit_rmse']:.4f}{iou}")
    return lines


def _precisions(bundle, backend: str, cache) -> list[str]:
    from edge_pfm.precision_pick import ACCURACY_ORDER, allowed, cached_pick

    pick = cached_pick(bundle, backend, cache)
    if pick is not None:
        return [f"  {line}" for line in pick.describe()]
    lines = [f"  precision auto -> fp32: nothing measured on this device yet (edge-pfm build --bundle {bundle.root}); "
             "candidates:"]
    for p in ACCURACY_ORDER:
        ok, why = allowed(bundle, p, backend)
        lines.append(f"    {p}: {'candidate' if ok else 'not a candidate'} ({why})")
    return lines
