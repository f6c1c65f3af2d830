"""Pairing, frame by frame: stamped frames in lossless video, real OpenCV file reads, real threads,
timestamps perturbed by jitter/drift and frames dropped by the fault-injecting wrapper."""
import time

import numpy as np
import pytest
from runtime_media import scene_frames, write_video

from edge_pfm.runtime.pairing import AlternatingPairer, TimestampPairer
from edge_pfm.sources import Frame
from edge_pfm.sources.replay import ReplaySource, link_replays
from edge_pfm.sources.simulated.faults import FaultySource
from edge_pfm.sources.simulated.stamp import read_stamp, stamp


def frame(t_ms, seq=0, **meta):
    return Frame(np.zeros((8, 8, 3), np.uint8), int(t_ms * 1e6), seq, meta)


def test_nearest_within_tolerance_each_frame_once():
    p = TimestampPairer(tolerance_ns=int(16e6))
    p.add("white_light", [frame(0, 0), frame(33, 1), frame(66, 2), frame(100, 3)])
    p.add("fluorescence", [frame(5, 0), frame(40, 1), frame(99, 3)])  # seq 2 dropped
    pairs = p.pairs()
    assert [(q.white_light.seq, q.fluorescence.seq) for q in pairs] == [(0, 0), (1, 1), (3, 3)]
    assert p.stats["unpaired_white_light"] == 1
    assert [round(q.skew_ns / 1e6) for q in pairs] == [5, 7, -1]


def test_out_of_tolerance_is_never_paired():
    p = TimestampPairer(tolerance_ns=int(10e6))
    p.add("white_light", [frame(0, 0), frame(33, 1)])
    p.add("fluorescence", [frame(17, 0), frame(50, 1)])
    assert p.pairs() == []
    assert p.stats["unpaired_white_light"] == 2 and p.stats["unpaired_fluorescence"] >= 1


def test_prefers_the_nearer_later_frame():
    p = TimestampPairer(tolerance_ns=int(20e6))
    p.add("white_light", [frame(0, 0), frame(15, 1)])
    p.add("fluorescence", [frame(14, 0)])
    pairs = p.pairs()
    assert [(q.white_light.seq, q.fluorescence.seq) for q in pairs] == [(1, 0)]


def _collect_pairs(white, fluo, tolerance_ms, seconds, stagger_s=0.0):
    """Run two started sources (the second `stagger_s` after the first) and a pairer in this thread; -> pairs."""
    pairer = TimestampPairer(int(tolerance_ms * 1e6))
    out = []
    white.start()
    time.sleep(stagger_s)
    fluo.start()
    t_end = time.monotonic() + seconds
    try:
        while time.monotonic() < t_end and not (white.ended and fluo.ended):
            white.wait(0.02)
            pairer.add("white_light", white.take())
            pairer.add("fluorescence", fluo.take())
            out += pairer.pairs()
    finally:
        white.stop()
        fluo.stop()
    pairer.add("white_light", white.take())
    pairer.add("fluorescence", fluo.take())
    return out + pairer.pairs(), pairer


@pytest.mark.parametrize("faults", [
    dict(),
    dict(jitter_ms=5),
    dict(jitter_ms=3, fluo_fps=30 * (1 + 1000e-6)),  # 1000 ppm: the fluorescence camera runs faster
    dict(drop=0.15, jitter_ms=4),
], ids=["clean", "jitter", "drift", "drops"])
def test_pairing_frame_by_frame_on_lossless_video(tmp_path, faults):
    n = 45
    frames = scene_frames(n)
    w_path = write_video(tmp_path / "w.mkv", [f[0] for f in frames])
    f_path = write_video(tmp_path / "f.mkv", [f[1] for f in frames])
    # keep=8: this test reads every frame; the runtime keeps only the freshest 2
    fluo_fps = faults.pop("fluo_fps", None)
    white = FaultySource(ReplaySource(w_path, "white_light", keep=8), seed=1, **faults)
    fluo = FaultySource(ReplaySource(f_path, "fluorescence", keep=8, fps=fluo_fps), seed=2, **faults)
    pairs, pairer = _collect_pairs(white, fluo, tolerance_ms=1000 / 30 / 2, seconds=10)
    got = []
    for p in pairs:
        wi, wm = read_stamp(p.white_light.image)
        fi, fm = read_stamp(p.fluorescence.image)
        assert (wm, fm) == ("white_light", "fluorescence"), "modalities swapped"
        got.append((wi, fi))
    dropped_w = n - white.stats["grabbed"]
    dropped_f = n - fluo.stats["grabbed"]
    assert all(wi == fi for wi, fi in got), f"mispaired: {[g for g in got if g[0] != g[1]]}"
    assert len({g[0] for g in got}) == len(got)  # each frame used once
    # nearly every index that survived in both streams is paired (a starved CPU can delay a paced read
    # past the tolerance: then that pair is correctly refused, never mispaired)
    assert len(got) >= 0.85 * (n - dropped_w - dropped_f)
    if faults.get("drop"):
        assert dropped_w + dropped_f > 0 and pairer.stats["unpaired_white_light"] + pairer.stats["unpaired_fluorescence"] > 0


def test_two_image_folders_of_pairs_pair_frame_k_with_k_however_late_the_second_opens(tmp_path):
    """Folders replayed as two cameras (`record --white DIR --fluo DIR`) share one start (link_replays): opened on
    their own clocks 45 ms apart at 30 fps, white frame k+1 fell within tolerance of fluorescence frame k, and every
    pair mixed two scenes."""
    import cv2

    n = 24
    for i, (white_img, fluo_img, _) in enumerate(scene_frames(n)):
        for folder, img in (("white", white_img), ("fluo", fluo_img)):
            (tmp_path / folder).mkdir(exist_ok=True)
            assert cv2.imwrite(str(tmp_path / folder / f"{i:04d}.png"), img)  # lossless: the stamps survive
    white = ReplaySource(tmp_path / "white", "white_light", keep=n)
    fluo = ReplaySource(tmp_path / "fluo", "fluorescence", keep=n)
    assert link_replays([white, fluo]) is not None
    pairs, _ = _collect_pairs(white, fluo, tolerance_ms=1000 / 30 / 2, seconds=10, stagger_s=0.045)
    got = [(read_stamp(p.white_light.image)[0], read_stamp(p.fluorescence.image)[0]) for p in pairs]
    assert len(got) >= n - 2 and all(w == f for w, f in got), got


def test_stamp_round_trip():
    img = np.zeros((40, 200, 3), np.uint8)
    assert read_stamp(stamp(img, 123456, "fluorescence")) == (123456, "fluorescence")


def test_alternating_drop_never_swaps():
    p = AlternatingPairer(tolerance_ns=int(80e6))
    seq = [("white_light", 0), ("fluorescence", 33), ("white_light", 66), ("white_light", 133),  # fluo dropped
           ("fluorescence", 166), ("white_light", 200), ("fluorescence", 233)]
    frames = [frame(t, i, illumination=m) for i, (m, t) in enumerate(seq)]
    pairs = p.add(frames)
    assert [(q.white_light.seq, q.fluorescence.seq) for q in pairs] == [(0, 1), (3, 4), (5, 6)]
    assert p.stats["alternation_breaks"] == 1


def test_alternating_by_brightness():
    p = AlternatingPairer(tolerance_ns=int(80e6))
    bright, dark = np.full((64, 64, 3), 150, np.uint8), np.full((64, 64, 3), 20, np.uint8)
    fr = [Frame(bright, 0, 0), Frame(dark, int(33e6), 1), Frame(dark, int(66e6), 2), Frame(bright, int(99e6), 3)]
    pairs = p.add(fr)
    assert [(q.white_light.seq, q.fluorescence.seq) for q in pairs] == [(0, 1)]  # dark 2 then bright 3: out of cycle
    assert p.stats["alternation_breaks"] == 0 and p.stats["unpaired_fluorescence"] == 1
