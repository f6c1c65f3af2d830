"""The decision record: one line of the decision log per decision, its schema in one place.

Every record has RECORD_KEYS; a record made from a pair (not a no_signal) also has PAIR_KEYS, and the pair's
truth where the sources know it (label_white/label_fluo from synthetic cameras, file_index_* from replays,
offset_* from GStreamer sources that number their buffers).
Latency (ms) runs from the older frame's capture to the decision, split into LATENCY_STAGES.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from edge_pfm.decision import Decision
from edge_pfm.runtime.paired_stream import PreparedPair

RECORD_KEYS = ("n", "t_ns", "wall", "state", "shown_class", "confidence", "smoothed", "flags", "run_id", "backend",
               "model_sha256", "engine", "lesion")
PAIR_KEYS = ("seq_white", "seq_fluo", "t_capture_white_ns", "t_capture_fluo_ns", "skew_ms", "raw_class", "probs",
             "gates", "gate_metrics", "latency_ms", "stamps", "dequeue_delay_ms")
# pair_wait: the newer frame's capture to its pairing, less its preparation (the reader waking, the pairing);
# preprocess: the frames' preparation on that path; queue: the pair waiting for the inference thread; infer: the
# backend's call alone; decide: checking the output, placing the map, smoothing; phase: the older frame waiting
# for its partner (the cameras' phase offset, not the software's); software: the newer frame's capture to the
# decision (what the software adds)
LATENCY_STAGES = ("pair_wait", "preprocess", "queue", "infer", "decide", "total", "phase", "software")
TRUTH_KEYS = ("label", "index", "file_index", "offset")  # offset: a GStreamer buffer's number (videotestsrc, v4l2src)


def latencies(work: PreparedPair, t_infer_ns: int, t_inferred_ns: int, t_decided_ns: int) -> dict[str, float]:
    """The stages of one pair's latency, in ms."""
    p = work.pair
    newer = max(p.white_light.t_capture_ns, p.fluorescence.t_capture_ns)
    prep = work.arrival_prepare_ns + (work.t_ready_ns - work.t_paired_ns)
    return {"pair_wait": (work.t_paired_ns - newer - work.arrival_prepare_ns) / 1e6,
            "preprocess": prep / 1e6, "queue": (t_infer_ns - work.t_ready_ns) / 1e6,
            "infer": (t_inferred_ns - t_infer_ns) / 1e6, "decide": (t_decided_ns - t_inferred_ns) / 1e6,
            "total": (t_decided_ns - p.t_capture_ns) / 1e6, "phase": abs(p.skew_ns) / 1e6,
            "software": (t_decided_ns - newer) / 1e6}


@dataclass(frozen=True)
class RunContext:
    """What every record of a run repeats: which run, backend and engine made it."""
    run_id: str
    backend: str
    model_sha256: str
    engine: dict[str, Any]
    classes: tuple[str, ...]


@dataclass
class DecisionEvent:
    """One decision as the sinks receive it; `record` (the log line's dict) is built once, by the first sink that
    asks for it."""
    n: int
    t_ns: int
    decision: Decision
    context: RunContext
    work: PreparedPair | None = None
    probs: np.ndarray | None = None  # None: no pair, or its output was refused
    latency_ms: dict[str, float] | None = None

    @cached_property
    def record(self) -> dict[str, Any]:
        d, ctx = self.decision, self.context
        rec: dict[str, Any] = {
            "n": self.n, "t_ns": self.t_ns,
            "wall": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "state": d.state, "shown_class": d.shown_class, "confidence": round(d.confidence, 5),
            "smoothed": d.smoothed, "flags": d.flags, "run_id": ctx.run_id, "backend": ctx.backend,
            "model_sha256": ctx.model_sha256, "engine": ctx.engine,
            # the shown (smoothed) lesion map in camera pixels; null when none is shown
            "lesion": d.lesion.summary() if d.lesion is not None else None}
        if self.work is None:
            return rec
        p, w = self.work.pair, self.work
        rec.update({
            "seq_white": p.white_light.seq, "seq_fluo": p.fluorescence.seq,
            "t_capture_white_ns": p.white_light.t_capture_ns, "t_capture_fluo_ns": p.fluorescence.t_capture_ns,
            "skew_ms": round(p.skew_ns / 1e6, 3),
            "raw_class": None if self.probs is None else ctx.classes[int(np.argmax(self.probs))],
            "probs": None if self.probs is None else [round(float(x), 6) for x in self.probs],
            "gates": w.gates,
            "gate_metrics": {m: {k: round(v, 4) for k, v in mt.items()} for m, mt in w.metrics.items()},
            "latency_ms": {k: round(v, 3) for k, v in (self.latency_ms or {}).items()},
            # where each capture time came from (sources.clock) and how late each reader had its frame
            "stamps": {"white": p.white_light.stamp, "fluo": p.fluorescence.stamp},
            "dequeue_delay_ms": {"white": round(p.white_light.dequeue_delay_ns / 1e6, 3),
                                 "fluo": round(p.fluorescence.dequeue_delay_ns / 1e6, 3)},
        })
        for key in TRUTH_KEYS:
            for m, fr in (("white", p.white_light), ("fluo", p.fluorescence)):
                if key in fr.meta:
                    rec[f"{key}_{m}"] = fr.meta[key]
        return rec
