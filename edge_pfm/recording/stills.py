"""`edge-pfm record --mode dataset`: the device's own pairs as paired stills in the dataset layout
(edge_pfm.dataset), unlabelled: ready for labelling, and for `python -m calibration --data DIR` as they are.

    DATASET/
      classes.txt          the bundle's classes, in logit order (for the labeller)
      labels.csv           `sample,label`: one row a kept pair, the label empty
      white/<sample>.png   the white-light camera's frame as it came (lossless)
      fluorescence/<sample>.png
      capture.jsonl        one line a kept pair, in order: both capture times and their stamp kinds, the skew,
                           seq numbers, the gates' flags and metrics, the run id
      recording.json       each camera's source and settings, and every run that added pairs

A pair is kept when every gate passed (unless keep_gated), at least `every_s` after the last kept pair (an
exam does not yield 30 near-identical pairs a second), and the writer is not still busy with the last one.
Both stills are written atomically, then the pair's capture line commits it (one write, fsynced), then its
labels.csv row. A crash loses at most the pair in flight: resuming removes stills without a capture line,
puts labels.csv back in step, and numbers the next pair after the last committed one (no duplicate, no gap).
"""
from __future__ import annotations

import collections
import csv
import io
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_pfm.dataset import CLASSES_FILE, FLUO_DIR, LABELS_FILE, WHITE_DIR
from edge_pfm.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from edge_pfm.outputs import MIB, OutputPlan, Retention
from edge_pfm.runtime.record import DecisionEvent
from edge_pfm.runtime.sinks import RunStart, Sink
from edge_pfm.sources.base import SourceError

_LOG = logging.getLogger(__name__)
FORMAT = "edge-pfm/dataset-recording v1"
CAPTURE_FILE = "capture.jsonl"
MANIFEST = "recording.json"
PNG_BYTES_PER_PIXEL = 1.4  # measured: a 1280x720 synthetic frame with sensor-like noise, PNG level 1 (lossless)
PLANNED_PIXELS = 1280 * 720


class DatasetRecordingError(SourceError):
    """The dataset folder cannot be written or resumed; the message names the file."""


def sample_name(k: int) -> str:
    return f"{k:06d}"


class DatasetRecording(Sink):
    """Kept pairs into the dataset layout, as a Runner sink (module doc). `request_stop` ends the run when
    `pairs` are kept."""

    failed_state = "recording_failed"

    def __init__(self, directory: str | Path, pairs: int, every_s: float = 0.0, keep_gated: bool = False,
                 cameras: dict[str, Any] | None = None, progress_s: float = 2.0):
        if pairs < 1:
            raise DatasetRecordingError(f"--pairs {pairs}: ask for at least one pair")
        self.dir, self.pairs, self.every_ns, self.keep_gated = Path(directory), pairs, int(every_s * 1e9), keep_gated
        self.cameras, self.progress_s = cameras or {}, progress_s
        self.request_stop: Callable[[], None] = lambda: None
        self.skipped: collections.Counter = collections.Counter()  # gated, too_soon, writer_busy
        self.kept = 0  # pairs committed, a resumed dataset's included
        self.kept_now = 0  # by this run
        self.bytes_written = 0
        self.resumed: dict[str, Any] | None = None
        self.failure: Exception | None = None
        self._queued = 0  # pairs handed to the writer, not yet committed (kept + queued never passes `pairs`)
        self._lock = threading.Lock()  # _queued and kept: the inference thread reads, the writer thread changes
        self._last_kept_ns: int | None = None
        self._queue: queue.Queue[tuple | None] = queue.Queue(1)
        self._thread = threading.Thread(target=self._run, name="record-dataset", daemon=True)
        self._capture_fd = -1
        self._run_id = ""
        self._t0 = self._last_progress = time.monotonic()

    # -- before the run ------------------------------------------------------------------------------
    def plan(self, decisions_per_s: float) -> OutputPlan | None:
        per_pair = 2 * PNG_BYTES_PER_PIXEL * PLANNED_PIXELS
        left = max(self.pairs - self._committed_on_disk(), 0)
        # the preflight asks for `needs(seconds)`: a cap of the pairs still to come bounds it
        return OutputPlan("the dataset", self.dir / CAPTURE_FILE, per_pair * max(decisions_per_s, 1.0),
                          Retention(rotate_bytes=None, cap_bytes=int(per_pair * left) + MIB))

    def _committed_on_disk(self) -> int:
        path = self.dir / CAPTURE_FILE
        if not path.exists():
            return 0
        return sum(1 for line in path.read_bytes().split(b"\n")[:-1] if line.strip())

    def open(self, run: RunStart) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / WHITE_DIR).mkdir(exist_ok=True)
        (self.dir / FLUO_DIR).mkdir(exist_ok=True)
        self._run_id = str(run.header.get("run_id", ""))
        self.kept = self._resume()
        classes_path = self.dir / CLASSES_FILE
        classes = "".join(f"{c}\n" for c in run.classes)
        if classes_path.exists() and classes_path.read_text() != classes:
            raise DatasetRecordingError(f"{classes_path} lists other classes than this bundle's {list(run.classes)}: "
                                        "record into a new folder")
        if not classes_path.exists():
            atomic_write_text(classes_path, classes)
        manifest_path = self.dir / MANIFEST
        manifest = read_json(manifest_path, DatasetRecordingError) if manifest_path.exists() else {
            "format": FORMAT, "cameras": self.cameras, "runs": []}
        manifest["runs"] = [*manifest.get("runs", []), {"run_id": self._run_id, "first_sample": self.kept}]
        atomic_write_json(manifest_path, manifest)
        self._capture_fd = os.open(self.dir / CAPTURE_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._thread.start()
        self._t0 = self._last_progress = time.monotonic()
        if self.kept >= self.pairs:
            _LOG.info(f"{self.dir} already holds {self.kept} pairs (--pairs {self.pairs}): nothing to add")
            self.request_stop()

    def _resume(self) -> int:
        """Commit what the capture lines say, undo the rest (module doc) -> pairs committed."""
        path = self.dir / CAPTURE_FILE
        lines: list[dict] = []
        if path.exists():
            raw = path.read_bytes()
            complete = raw.split(b"\n")[:-1]  # a line a crash tore has no newline: that pair never committed
            for i, line in enumerate(complete, 1):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    raise DatasetRecordingError(f"{path}:{i}: not a JSON line; the capture record is damaged") from None
                if lines[-1].get("sample") != sample_name(i - 1):
                    raise DatasetRecordingError(f"{path}:{i}: sample {lines[-1].get('sample')!r} where "
                                                f"{sample_name(i - 1)!r} belongs; the capture record is damaged")
            if raw and not raw.endswith(b"\n"):
                atomic_write_bytes(path, b"".join(line + b"\n" for line in complete))
        committed = {r["sample"] for r in lines}
        removed = []
        for sub in (WHITE_DIR, FLUO_DIR):
            for p in (self.dir / sub).iterdir():
                if p.stem not in committed:  # the pair in flight (or a temporary file) when the last run ended
                    p.unlink()
                    removed.append(f"{sub}/{p.name}")
        rows = "sample,label\n" + "".join(f"{r['sample']},\n" for r in lines)
        labels = self.dir / LABELS_FILE
        existing = labels.read_text() if labels.exists() else None
        if existing is None or not _same_samples(existing, [r["sample"] for r in lines]):
            if existing is not None and any(row.get("label") for row in csv.DictReader(io.StringIO(existing))):
                raise DatasetRecordingError(f"{labels} has labels and does not match {path}: it was edited; resume "
                                            "into a copy made before labelling, or record into a new folder")
            atomic_write_text(labels, rows)
        if lines or removed:
            self.resumed = {"committed": len(lines), "removed_uncommitted": removed}
            _LOG.info(f"resuming {self.dir}: {len(lines)} pairs committed"
                      + (f", removed the uncommitted {', '.join(removed)}" if removed else ""))
        if lines:
            self._last_kept_ns = None  # a new run's clock: the spacing restarts
        return len(lines)

    # -- the inference thread ------------------------------------------------------------------------
    def write(self, event: DecisionEvent) -> None:
        self._progress()
        w = event.work
        with self._lock:
            full = self.kept + self._queued >= self.pairs
        if w is None or full or self.failure is not None:
            return
        gates = w.gates
        if not self.keep_gated and any(gates.values()):
            self.skipped["gated"] += 1
            return
        t = w.pair.t_capture_ns
        if self._last_kept_ns is not None and t - self._last_kept_ns < self.every_ns:
            self.skipped["too_soon"] += 1
            return
        p = w.pair
        record = {
            "t_capture_white_ns": p.white_light.t_capture_ns, "t_capture_fluo_ns": p.fluorescence.t_capture_ns,
            "stamps": {"white": p.white_light.stamp, "fluo": p.fluorescence.stamp},
            "skew_ms": round(p.skew_ns / 1e6, 3), "seq_white": p.white_light.seq, "seq_fluo": p.fluorescence.seq,
            "gates": gates, "gate_metrics": {m: {k: round(v, 4) for k, v in mt.items()} for m, mt in w.metrics.items()},
            "run_id": self._run_id, "wall": event.record["wall"]}
        try:
            self._queue.put_nowait((p.white_light.image, p.fluorescence.image, record))
        except queue.Full:
            self.skipped["writer_busy"] += 1
            return
        with self._lock:
            self._queued += 1
        self._last_kept_ns = t

    def _progress(self, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last_progress < self.progress_s:
            return
        self._last_progress = now
        skipped = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.skipped.items() if v) or "none"
        _LOG.info(f"dataset {now - self._t0:5.0f} s: kept {self.kept} of {self.pairs} pairs; skipped: {skipped}; "
                  f"{self.bytes_written / MIB:.1f} MB written to {self.dir}")

    # -- the writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._commit(*item)
            except Exception as exc:  # a full disk: the run stops, every committed pair stays
                self.failure = DatasetRecordingError(f"writing to {self.dir} failed: {type(exc).__name__}: {exc}")
                return
            finally:
                with self._lock:
                    self._queued -= 1
            if self.kept >= self.pairs:
                self.request_stop()

    def _commit(self, white, fluo, record: dict) -> None:
        import cv2

        name = sample_name(self.kept)
        for sub, image in ((WHITE_DIR, white), (FLUO_DIR, fluo)):
            ok, png = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            if not ok:
                raise DatasetRecordingError(f"cannot encode the {sub} frame of pair {name} as PNG")
            atomic_write_bytes(self.dir / sub / f"{name}.png", png.tobytes())
            self.bytes_written += len(png)
        line = json.dumps({"sample": name, **record}, separators=(",", ":")) + "\n"
        os.write(self._capture_fd, line.encode())  # the commit
        os.fsync(self._capture_fd)
        with open(self.dir / LABELS_FILE, "a") as f:
            f.write(f"{name},\n")
        with self._lock:
            self.kept += 1
            self.kept_now += 1

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._capture_fd >= 0:
            os.close(self._capture_fd)
            self._capture_fd = -1
        self._progress(final=True)

    def report(self) -> dict[str, Any]:
        return {"dataset": {"path": str(self.dir), "kept": self.kept, "kept_this_run": self.kept_now,
                            "asked": self.pairs, "skipped": dict(self.skipped), "bytes": self.bytes_written,
                            "resumed": self.resumed}}


def _same_samples(labels_csv: str, samples: list[str]) -> bool:
    rows = list(csv.DictReader(io.StringIO(labels_csv)))
    return [r.get("sample") for r in rows] == samples
