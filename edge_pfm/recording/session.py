"""record(): the run `edge-pfm run` makes, with the recording attached as a sink (and, in video mode, in front of
each camera); it stops at --pairs, --seconds, --max-mb, the free-space floor, SIGINT or SIGTERM."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_pfm.errors import InvalidArgument
from edge_pfm.recording.sidecar import camera_info
from edge_pfm.sources.base import FrameSource

MODES = ("video", "dataset")


def record(bundle: str | Path, sources: dict[str, FrameSource], out: str | Path, mode: str = "video", *,
           pairs: int | None = None, every_s: float = 0.0, keep_gated: bool = False, codec: str = "ffv1",
           max_mb: float | None = None, config: Any = None) -> dict[str, Any]:
    """Record from `sources` ({"white": s, "fluo": s} or {"alternating": s}, as Runner takes them) into `out`
    -> the run summary, with the recording's report under outputs. `config`: a RunConfig (seconds, log, gates,
    min_free_bytes); `pairs` (dataset mode) ends the run when that many pairs are kept."""
    from edge_pfm.outputs import MIB
    from edge_pfm.recording.stills import DatasetRecording
    from edge_pfm.recording.video import VideoRecording
    from edge_pfm.runtime import RunConfig, Runner

    cfg = config or RunConfig()
    if mode not in MODES:
        raise InvalidArgument(f"--mode {mode}: choose video or dataset")
    if mode == "dataset":
        if not pairs:
            raise InvalidArgument("--mode dataset needs --pairs N: how many pairs to keep")
        sink: Any = DatasetRecording(out, pairs, every_s, keep_gated,
                                    {s.modality: camera_info(s) for s in sources.values()})
    else:
        if pairs:
            raise InvalidArgument("--pairs is for --mode dataset; a video recording ends at --seconds or Ctrl-C")
        sink = VideoRecording(out, codec, int(max_mb * MIB) if max_mb else None, cfg.min_free_bytes)
        sources = sink.wrap(sources)
    runner = Runner(bundle, config=cfg, sinks=[sink], **sources)
    sink.request_stop = runner.stop_event.set
    return runner.run(install_signal_handlers=True)
