"""What each camera delivers, measured for a few seconds (`edge-pfm info --white SRC --fluo SRC`): its rate, where
its capture times come from, how late its reader gets frames (the dequeue delay's p50/p95), frames the driver
dropped, and which modality its frames look like (runtime.modality)."""
from __future__ import annotations

import collections
import time

from edge_pfm.sources.base import FrameSource

JUDGE_EVERY = 5  # frames: the probe measures the reader, judging every frame would slow it


def probe(cameras: dict[str, FrameSource], seconds: float) -> list[str]:
    from edge_pfm.runtime.modality import ModalityRule, looks_like

    rule = ModalityRule()
    looks: dict[str, collections.Counter] = {label: collections.Counter() for label in cameras}

    def judge(label: str):
        def on_frame(frame) -> None:
            if frame.seq % JUDGE_EVERY == 0:
                looks[label][looks_like(frame.image, rule) or "unclear"] += 1
        return on_frame

    lines = [f"  cameras, probed for {seconds:g} s:"]
    for label, src in cameras.items():
        src.start(judge(label))
    try:
        time.sleep(seconds)
    finally:
        for src in cameras.values():
            src.stop()
    for label, src in cameras.items():
        r = src.report()
        fps = src.nominal_fps
        measured = src.measured_fps()
        kinds = ", ".join(f"{k.removeprefix('stamps_')} {v}" for k, v in r.items() if k.startswith("stamps_")) or \
            "not counted (a replay or synthetic source)"
        delay = r.get("dequeue_delay_ms")
        delay_s = f"dequeue delay p50 {delay['p50']:.2f} / p95 {delay['p95']:.2f} ms" if delay else "dequeue delay n/a"
        look = ", ".join(f"{k} {v}" for k, v in looks[label].most_common()) or "no frame"
        lines.append(f"    {src.modality}: {src.describe()}")
        lines.append(f"      {r.get('grabbed', 0)} frames, {'?' if fps is None else f'{fps:g}'} fps negotiated, "
                     f"{'?' if measured is None else f'{measured:.2f}'} measured; dropped (gaps) "
                     f"{r.get('dropped_gaps', 0)}, read errors {r.get('read_errors', 0)}")
        lines.append(f"      stamps: {kinds}; {delay_s}")
        lines.append(f"      looks like: {look}" + (f"; last error: {src.last_error}" if src.last_error else ""))
    return lines
