"""`edge-pfm build`: the engines this device will run, built (or taken from the cache) and checked against the
bundle's references before any use; with `--precision auto` (the default), every precision the bundle allows is
checked and timed, and the fastest is cached as the device's pick (edge_pfm.precision_pick)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from edge_pfm.bundle import Bundle
from edge_pfm.errors import InvalidArgument

_LOG = logging.getLogger(__name__)


def build(bundle: str | Path | Bundle, backend: str = "auto", precision: str = "auto", int8_source: str | None = None,
          dla_core: int = -1, workspace_mib: int = 1024, max_batch: int | None = None,
          cache_dir: str | Path | None = None, build: bool = True, threads: int | None = None,
          log: Callable[[str], None] = _LOG.info) -> list[str]:
    """Build/check (and with precision auto, measure and pick). -> the lines `edge-pfm build` prints."""
    from edge_pfm.backends.select import select_backend
    from edge_pfm.engine.trt_build import DEFAULT_CACHE_DIR

    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    chosen = select_backend(bundle, backend, "fp32").backend
    trt_only = [flag for flag, given in (("--dla-core", dla_core >= 0), ("--int8-source", int8_source),
                                         ("--max-batch", max_batch), ("--no-build", not build)) if given]
    if trt_only and chosen != "tensorrt":
        raise InvalidArgument(f"{', '.join(trt_only)} apply to TensorRT engines; this run uses {chosen} (TensorRT is "
                              "not usable here: edge-pfm info says why)")
    opener = partial(_open_checked, cache_dir=cache_dir, threads=threads, log=log, build=build,
                     int8_source=int8_source, dla_core=dla_core, workspace_mib=workspace_mib, max_batch=max_batch)
    if precision == "auto":
        if trt_only:
            raise InvalidArgument(f"{', '.join(trt_only)} build one engine: give --precision fp16 or int8 with them")
        from edge_pfm.precision_pick import measure_pick
        from edge_pfm.thread_plan import plan_threads

        log(f"measuring every precision {bundle.root} allows on {chosen}: build or take, check, time")
        pick = measure_pick(bundle, chosen, cache_dir, plan_threads(chosen, inference=threads).inference, opener, log)
        return pick.describe()
    b = opener(bundle, chosen, precision)
    try:
        engine = getattr(b, "engine_path", None)
        return [*([str(engine)] if engine else []), f"{b.describe()}: {b.check.describe()}"]
    finally:
        b.close()


def _open_checked(bundle: Bundle, backend: str, precision: str, cache_dir: Path, threads: int | None,
                  log: Callable[[str], None], recheck: bool = False, **trt: Any):
    """open_backend for one precision, with the build's TensorRT options; `recheck`: check even a recorded engine."""
    from edge_pfm.backends.select import open_backend

    return open_backend(bundle, backend, precision, cache_dir, threads=threads, log=log, recheck=recheck, **trt)
