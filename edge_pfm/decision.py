"""From logits to a decision you can trust: softmax, temporal smoothing with hysteresis, quality gating,
explicit no-signal, and staleness (a decision older than its bound is never presented as current)."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATES = ("warming_up", "ok", "gated", "no_signal", "camera_lost", "stale", "rejected", "log_failed", "video_failed")
# no_signal and camera_lost both mean "no pair to decide, nothing shown, smoothing starts over". camera_lost is the
# narrower one: a named camera is known to be broken and is being reopened (a read failed, it froze on one frame,
# a read blocked past [serve] camera_stall_s, or it was missing at start). no_signal is every other reason no
# pair comes: a camera silent for less than the stall bound, a source that ended, frames that do not pair.
# camera_lost takes precedence; both end with the next decided pair.


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class DecisionConfig:
    method: str = "ema"  # ema | vote
    alpha: float = 0.3  # EMA weight of the newest frame (memory ~ 1/alpha frames)
    window: int = 8  # vote: frames in the majority vote
    enter: float = 0.55  # smoothed probability needed to show a first class
    margin: float = 0.10  # a new class must beat the shown one by this much ...
    hold: int = 3  # ... for this many consecutive updates
    max_age_s: float = 0.5  # a decision older than this is stale, never shown as current
    reset_gap_s: float = 2.0  # after a gap this long, smoothing starts over

    @classmethod
    def from_dict(cls, d: dict) -> DecisionConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown [decision] keys {sorted(unknown)}")
        cfg = cls(**d)
        if cfg.method not in ("ema", "vote") or not 0 < cfg.alpha <= 1:
            raise ValueError("decision.method must be ema or vote, alpha in (0, 1]")
        return cfg


@dataclass
class Decision:
    state: str  # one of STATES
    shown_class: str | None
    confidence: float
    smoothed: list[float]
    t_update_ns: int
    flags: list[str] = field(default_factory=list)
    # the smoothed lesion map (edge_pfm.lesion.LesionMap), only while one of the map classes is shown
    lesion: Any = None


class DecisionEngine:
    def __init__(self, classes: tuple[str, ...], config: DecisionConfig | None = None,
                 map_classes: tuple[str, ...] = ()):
        """map_classes: the classes whose decisions show the lesion map (edge_pfm.lesion.map_verdict); none by
        default, so a map is never shown unless the bundle's verdict says so."""
        self.classes = classes
        self.map_classes = frozenset(map_classes)
        self.cfg = config or DecisionConfig()
        self.reset()
        self.stats = collections.Counter()

    def reset(self) -> None:
        self.smoothed: np.ndarray | None = None
        self.votes: collections.deque[int] = collections.deque(maxlen=self.cfg.window)
        self.shown: int | None = None
        self.challenger: tuple[int, int] | None = None  # (class, consecutive wins)
        self.t_update_ns = 0
        self.state = "warming_up"
        self.lesion = None  # LesionMap holding the smoothed probabilities

    def update(self, probs: np.ndarray, t_ns: int, gated_flags: list[str] | None = None, lesion=None) -> Decision:
        """Feed one frame pair's probabilities (or its gate flags), and its LesionMap when the model has one;
        -> the decision after it. The map is smoothed like the class (EMA with the same alpha), and a gated or
        rejected pair's map is ignored like its class."""
        cfg = self.cfg
        if not np.all(np.isfinite(probs)):
            return self.reject(t_ns)
        if gated_flags:
            self.stats["gated"] += 1
            return self._decision("gated", gated_flags, t_ns)
        if self.t_update_ns and t_ns - self.t_update_ns > cfg.reset_gap_s * 1e9:
            self.reset()
        if cfg.method == "ema":
            self.smoothed = probs.copy() if self.smoothed is None else cfg.alpha * probs + (1 - cfg.alpha) * self.smoothed
        else:
            self.votes.append(int(np.argmax(probs)))
            counts = np.bincount(np.array(self.votes), minlength=len(self.classes))
            self.smoothed = counts / counts.sum()
        if lesion is not None:
            old = self.lesion
            self.lesion = lesion if old is None or old.probs.shape != lesion.probs.shape else lesion.with_probs(
                cfg.alpha * lesion.probs + (1 - cfg.alpha) * old.probs)
        self.t_update_ns = t_ns
        best = int(np.argmax(self.smoothed))
        if self.shown is None:
            if self.smoothed[best] >= cfg.enter:
                self.shown = best
        elif best != self.shown and self.smoothed[best] >= self.smoothed[self.shown] + cfg.margin:
            wins = self.challenger[1] + 1 if self.challenger and self.challenger[0] == best else 1
            self.challenger = (best, wins)
            if wins >= cfg.hold:
                self.shown, self.challenger = best, None
                self.stats["class_changes"] += 1
        else:
            self.challenger = None
        self.state = "ok" if self.shown is not None else "warming_up"
        return self._decision(self.state, [], t_ns)

    def reject(self, t_ns: int) -> Decision:
        """The engine's output for a pair was not finite: refused, counted, and the shown decision is unchanged."""
        self.stats["rejected_nonfinite"] += 1
        return self._decision("rejected", ["nonfinite_output"], t_ns)

    def no_signal(self, t_ns: int, why: str, state: str = "no_signal") -> Decision:
        """No pair to decide (`state`: no_signal, or camera_lost with the camera and why in the flag)."""
        self.reset()
        self.state = state
        return self._decision(state, [why], t_ns)

    def current(self, now_ns: int) -> Decision:
        """What a display may show now: a decision older than max_age_s is 'stale', with no class."""
        if self.state == "ok" and now_ns - self.t_update_ns > self.cfg.max_age_s * 1e9:
            return Decision("stale", None, 0.0, self._smoothed_list(), self.t_update_ns, ["stale"])
        return self._decision(self.state, [], self.t_update_ns)

    def _smoothed_list(self) -> list[float]:
        return [] if self.smoothed is None else [round(float(p), 5) for p in self.smoothed]

    def _decision(self, state: str, flags: list[str], t_ns: int) -> Decision:
        show = state == "ok" and self.shown is not None
        conf = float(self.smoothed[self.shown]) if show else 0.0
        shown = self.classes[self.shown] if show else None
        lesion = self.lesion if show and shown in self.map_classes else None
        return Decision(state, shown, conf, self._smoothed_list(), t_ns, flags, lesion)
