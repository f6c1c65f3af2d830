"""Frame buffers are reused only when nothing holds them: real OpenCV decoding into pooled buffers, real threads."""
import threading

import cv2
import numpy as np

from edge_pfm.sources.frame_pool import FramePool
from edge_pfm.sources.replay import ReplaySource
from edge_pfm.sources.simulated.cameras import SceneBank, SyntheticSource


def test_held_buffers_and_views_are_never_handed_out():
    pool = FramePool(limit=3)
    a = pool.take((4, 4))
    b = pool.take((4, 4))
    assert a is not b
    view = a[1:]
    del a
    assert pool.take((4, 4)) is not view.base  # a view keeps its base held
    del view
    c = pool.take((4, 4))
    assert pool.stats["reused"] == 1 and c.shape == (4, 4)
    held = [pool.take((4, 4)) for _ in range(3)]  # the pool is full: plain allocations, counted
    assert pool.stats["misses"] >= 1 and len({id(x) for x in held}) == 3
    del held, b, c
    assert pool.take((8, 2)).shape == (8, 2) and pool.stats["reshaped"] == 1  # the camera changed mode


def test_video_frames_decode_into_reused_buffers_without_overwriting_held_ones(tmp_path):
    path = tmp_path / "v.avi"
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (160, 120))
    for i in range(40):
        vw.write(np.full((120, 160, 3), i * 6, np.uint8))
    vw.release()
    src = ReplaySource(path, "white_light", paced=False)
    src.open()
    held = [src.grab() for _ in range(4)]
    means = [int(f.image.mean()) for f in held]
    assert len({id(f.image) for f in held}) == 4
    for _ in range(30):  # frames dropped at once are recycled
        src.grab()
    assert [int(f.image.mean()) for f in held] == means  # held frames kept their pixels
    assert src.pool.stats["reused"] >= 25 and src.pool.stats["allocated"] <= 6


def test_stamped_synthetic_frames_recycle_while_a_consumer_thread_holds_some():
    from edge_pfm.sources.simulated.stamp import read_stamp

    bank = SceneBank((320, 240), seed=1)
    src = SyntheticSource("white_light", bank, fps=1000, frames=300)
    kept, done = [], threading.Event()

    def consume():
        while not done.is_set() or src.wait(0):
            for f in src.take():
                if f.seq % 50 == 0:
                    kept.append(f)  # hoarded: must never be overwritten

    src.start()
    t = threading.Thread(target=consume)
    t.start()
    src.join(10)
    done.set()
    t.join(5)
    src.stop()
    assert kept and all(read_stamp(f.image)[0] == f.meta["index"] for f in kept)
    assert src.pool.stats["reused"] > 200
