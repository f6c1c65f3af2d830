"""Signal health, as a pure function of what the sources and the pairing last did (testable with a fake clock)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceHealth:
    label: str  # white_light, fluorescence, or camera (one alternating sensor)
    ended: bool
    last_frame_ns: int  # 0: no frame yet


def signal_problem(now_ns: int, started_ns: int, sources: list[SourceHealth], last_pair_ns: int, timeout_s: float,
                   tolerance_ns: int) -> str | None:
    """Why there is no usable signal at `now_ns`, or None."""
    timeout_ns = timeout_s * 1e9
    for s in sources:
        name = "camera" if s.label == "camera" else s.label
        if s.ended:
            return f"{name} source ended"
        silent = now_ns - (s.last_frame_ns or started_ns)
        if silent > timeout_ns:
            return f"no frame from the {name} camera for {silent / 1e9:.1f}s"
    unpaired_for = now_ns - (last_pair_ns or started_ns)
    if unpaired_for > timeout_ns:
        # frames arrive but none pair: out of sync, or one camera runs at another rate
        return (f"frames arrive but none paired within +-{tolerance_ns / 1e6:.0f} ms for {unpaired_for / 1e9:.1f}s: "
                "cameras out of sync (check fps and the skew_ms column)")
    return None
