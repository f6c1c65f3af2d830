"""`edge-pfm selftest`: one command that proves a device, and the report to send back.

1. every precision the bundle allows on this backend: built or taken, checked against its reference (afresh,
   whatever the cache says), timed; the fastest checked one picked and cached, as `edge-pfm build` does;
2. `edge-pfm bench` with the pick;
3. a short two-camera run on the configured cameras, or on synthetic ones;
then one JSON report and one readable summary. Each step runs even when an earlier one failed; the verdict is
PASS only if every step passed.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from edge_pfm.bundle import Bundle
from edge_pfm.errors import EdgePfmError, RuntimeFailure
from edge_pfm.fileio import atomic_write_text

_LOG = logging.getLogger(__name__)


class SelftestFailed(RuntimeFailure):
    """A selftest step failed; the report says which and why."""


@dataclass
class SelftestReport:
    passed: bool
    summary: str
    report: dict = field(repr=False)
    json_path: Path | None = None
    text_path: Path | None = None


def selftest(bundle: str | Path | Bundle, out: str | Path, backend: str = "auto",
             sources: Callable[[], dict[str, Any]] | None = None, seconds: float = 5.0, bench_seconds: float = 2.0,
             resolution: str = "1920x1080", cache_dir: str | Path | None = None, threads: int | None = None,
             log: Callable[[str], None] = _LOG.info) -> SelftestReport:
    """Run the three steps (module docstring); `sources()` -> the Runner's sources (white=, fluo= or alternating=),
    None: two synthetic cameras. Writes OUT/selftest.json and OUT/selftest.txt."""
    import edge_pfm
    from edge_pfm.backends.select import select_backend
    from edge_pfm.build import _open_checked
    from edge_pfm.engine.trt_build import DEFAULT_CACHE_DIR
    from edge_pfm.info import describe
    from edge_pfm.precision_pick import device_identity, measure_pick
    from edge_pfm.thread_plan import plan_threads

    bundle = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    out, cache_dir = Path(out), Path(cache_dir or DEFAULT_CACHE_DIR)
    t_start = time.perf_counter()
    report: dict[str, Any] = {"edge_pfm": edge_pfm.__version__,
                              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "bundle": {"path": str(bundle.root), "model": bundle.manifest["model"].get("variant"),
                                         "model_sha256": bundle.sha256("model.onnx")},
                              "environment": describe(trust=bundle.trust).splitlines(), "steps": {}, "failures": []}
    chosen = select_backend(bundle, backend, "fp32").backend
    inference_threads = plan_threads(chosen, inference=threads).inference
    try:
        report["device"] = device_identity(chosen)
    except Exception as exc:  # the report is written whatever fails
        report["device"] = f"unknown ({type(exc).__name__}: {exc})"

    def step(name: str, fn: Callable[[], dict]) -> dict | None:
        log(f"selftest: {name}")
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - any failure of a step is the report's content, not a traceback
            what = str(exc) if isinstance(exc, EdgePfmError) else f"{type(exc).__name__}: {exc}"
            report["failures"].append(f"{name}: {what}")
            report["steps"][name] = {"passed": False, "error": what, "seconds": round(time.perf_counter() - t0, 2)}
            return None
        result["seconds"] = round(time.perf_counter() - t0, 2)
        report["steps"][name] = result
        if not result.get("passed", True):
            report["failures"].append(f"{name}: {result.get('why', 'failed')}")
        return result

    def engines() -> dict:
        opener = partial(_open_checked, cache_dir=cache_dir, threads=threads, log=log, recheck=True)
        pick = measure_pick(bundle, chosen, cache_dir, inference_threads, opener, log)
        refused = [c.precision for c in pick.candidates if c.allowed and c.ms is None]
        return {"passed": not refused, "why": f"refused by its check: {', '.join(refused)}" if refused else "",
                "pick": pick.to_dict()}

    engines_result = step("engines", engines)
    precision = engines_result["pick"]["pick"] if engines_result and "pick" in engines_result else "fp32"

    def bench() -> dict:
        from edge_pfm.bench import run_bench

        return {"passed": True, "result": run_bench(bundle, resolution, bench_seconds, chosen, precision, threads,
                                                    cache_dir)}

    step("bench", bench)

    def run() -> dict:
        from edge_pfm.runtime import RunConfig, Runner

        made = sources() if sources is not None else _synthetic_sources()
        runner = Runner(bundle, config=RunConfig(backend=chosen, precision=precision, threads=threads,
                                                 cache_dir=str(cache_dir)), **made)
        summary = runner.run(seconds)
        problems = []
        if summary["pairs_inferred"] == 0:
            problems.append("no pair was classified")
        if summary["infer_errors"]:
            problems.append(f"{summary['infer_errors']} inference errors")
        if summary["rejected_nonfinite"]:
            problems.append(f"{summary['rejected_nonfinite']} non-finite outputs")
        return {"passed": not problems, "why": "; ".join(problems), "cameras": sorted(made),
                "summary": json.loads(json.dumps(summary, default=str))}

    step("run", run)
    report["passed"] = not report["failures"]
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    text = format_report(report)
    out.mkdir(parents=True, exist_ok=True)
    json_path = atomic_write_text(out / "selftest.json", json.dumps(report, indent=2) + "\n")
    text_path = atomic_write_text(out / "selftest.txt", text + "\n")
    return SelftestReport(report["passed"], text, report, json_path, text_path)


def _synthetic_sources() -> dict[str, Any]:
    from edge_pfm.sources.simulated.cameras import SceneBank, SyntheticSource

    bank = SceneBank((1280, 720), seed=5, per_class=1, scene_seconds=2.0)
    return {"white": SyntheticSource("white_light", bank, fps=30, jitter_ms=2, seed=1),
            "fluo": SyntheticSource("fluorescence", bank, fps=30, phase_ms=7, jitter_ms=2, seed=2)}


def format_report(r: dict) -> str:
    steps = r["steps"]
    lines = [f"edge-pfm selftest {r['edge_pfm']}  {r['started_utc']}  {'PASS' if r['passed'] else 'FAIL'}  "
             f"({r['seconds']} s)",
             f"device   {r['device']}",
             f"bundle   {r['bundle']['path']} ({r['bundle']['model']}, model.onnx {r['bundle']['model_sha256'][:16]})"]
    e = steps.get("engines", {})
    if "pick" in e:
        pick = e["pick"]
        lines.append("engines  checked against the bundle's references, then timed (batch 1, median of windows):")
        for c in pick["candidates"]:
            if not c["allowed"]:
                lines.append(f"  {c['precision']:5s} not a candidate: {c['why']}")
            elif c["ms"] is None:
                lines.append(f"  {c['precision']:5s} REFUSED: {c['why']}")
            else:
                lines.append(f"  {c['precision']:5s} {c['ms']:.2f} ms; {c['check']}")
        lines.append(f"  pick   {pick['pick']}: {pick['reason']}")
    elif e:
        lines.append(f"engines  FAILED: {e.get('error')}")
    b = steps.get("bench", {})
    if "result" in b:
        x = b["result"]
        lines.append(f"bench    {x['backend']} {x['resolution']}: backend {x['backend_pairs_per_s']:.1f} pairs/s, "
                     f"pipeline {x['pipeline_pairs_per_s']:.1f} ({x['pipeline_vs_backend']:.2f}x), software latency "
                     f"at 30 fps p50 {x['software_ms_p50']:.2f} / p99 {x['software_ms_p99']:.2f} ms")
    elif b:
        lines.append(f"bench    FAILED: {b.get('error')}")
    run = steps.get("run", {})
    if "summary" in run:
        s = run["summary"]
        lat = s["latency_ms"]["total"]
        lines.append(f"run      {' + '.join(run['cameras'])} cameras, {s['seconds']} s: {s['pairs_inferred']} pairs "
                     f"classified ({s['pairs_per_s']} pairs/s), decisions {s['decisions']}, inference errors "
                     f"{s['infer_errors']}, latency p50 {lat['p50']:.1f} / p99 {lat['p99']:.1f} ms")
    elif run:
        lines.append(f"run      FAILED: {run.get('error')}")
    lines += [f"FAILED   {f}" for f in r["failures"]]
    return "\n".join(lines)
