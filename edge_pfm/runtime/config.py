"""What a run is told: backend, pairing, outputs, gates, decision settings and camera recovery (the `edge-pfm run`
flags and the config file's [run], [gates], [decision], [modality], [outputs] and [serve] sections)."""
from __future__ import annotations

from dataclasses import dataclass, field

from edge_pfm.decision import DecisionConfig
from edge_pfm.outputs import LOG_RETENTION, MIN_FREE_BYTES, VIDEO_RETENTION, Retention
from edge_pfm.runtime.modality import ModalityRule
from edge_pfm.runtime.quality import GateConfig


@dataclass
class RunConfig:
    backend: str = "auto"
    precision: str | None = None
    threads: int | None = None
    cache_dir: str | None = None  # engines, check records and the measured pick (default ~/.cache/edge-pfm/engines)
    tolerance_ms: float | None = None  # pairing tolerance; default half the period of the faster camera
    signal_timeout_s: float = 1.0  # no frame from a camera for this long -> no_signal
    seconds: float | None = None
    log: str | None = None
    video: str | None = None
    preview: bool = False
    gates: GateConfig = field(default_factory=GateConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    modality: ModalityRule = field(default_factory=ModalityRule)  # each camera looks like its modality
    log_retention: Retention = LOG_RETENTION
    video_retention: Retention = VIDEO_RETENTION
    min_free_bytes: int = MIN_FREE_BYTES  # the preflight's spare space on each output's filesystem
    # supervision (edge-pfm serve sets these from [serve]; `run` keeps today's behaviour)
    backend_load_s: float | None = 120.0  # the engine build/load bound; None: as long as it takes (serve)
    missing_cameras_ok: bool = False  # a camera that cannot be opened at start is reopened, not fatal
    frozen_frames: int = 0  # this many identical frames in a row: the camera is reopened (0: off)
    camera_stall_s: float | None = None  # a read blocked this long: the camera is reopened (None: off)
    camera_give_up_s: float | None = None  # a camera lost this long ends the run: CameraLost, exit 6 (None: never)
    raise_floor_at_start: bool = True  # False under the bundle store: the rollback floor rises when an update commits

    def digest(self) -> str:
        """sha256 of the effective configuration, for the decision log's run header."""
        import hashlib
        import json
        from dataclasses import asdict

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()
