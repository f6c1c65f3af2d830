"""The thread budget: inference gets what the plan says, capture and preprocessing keep their cores, and no
thread pool grows past the plan (real ONNX Runtime, real OpenCV, real threads, counted from /proc)."""
import os
import threading
import time

import cv2
import pytest

from edge_pfm.runtime import RunConfig, Runner
from edge_pfm.sources.simulated.cameras import SceneBank, SyntheticSource
from edge_pfm.thread_plan import plan_threads


@pytest.mark.parametrize("backend,cores,inference,opencv", [
    ("onnxruntime", 2, 1, 1), ("onnxruntime", 4, 3, 1), ("onnxruntime", 12, 10, 1), ("onnxruntime", 1, 1, 1),
    ("tensorrt", 2, 1, 1), ("tensorrt", 8, 1, 6),
])
def test_plan(backend, cores, inference, opencv):
    plan = plan_threads(backend, cores)
    assert (plan.inference, plan.opencv, plan.overridden) == (inference, opencv, False)
    assert plan_threads(backend, cores, inference=3).inference == 3 and plan_threads(backend, cores, 3).overridden


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_default_plan_bounds_every_thread_pool(calibrated_bundle):
    plan = plan_threads("onnxruntime")
    bank = SceneBank((640, 360), seed=3, per_class=1)
    runner = Runner(calibrated_bundle, SyntheticSource("white_light", bank, fps=60),
                    SyntheticSource("fluorescence", bank, fps=60, seed=1),
                    config=RunConfig(backend="onnxruntime", precision="fp32"))
    base_os, base_py = _os_threads(), threading.active_count()
    peak = {"os": 0, "py": 0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak["os"] = max(peak["os"], _os_threads())
            peak["py"] = max(peak["py"], threading.active_count())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        summary = runner.run(3.0)
    finally:
        done.set()
        watcher.join()
    assert summary["pairs_inferred"] > 10 and summary["thread_plan"] == plan.to_dict()
    assert runner.classifier.backend.threads == plan.inference and cv2.getNumThreads() == plan.opencv
    # native threads beyond the Python ones the runner (and this watcher) started: ONNX Runtime's intra-op pool
    # has inference - 1 workers, OpenCV's pool opencv - 1
    extra_native = (peak["os"] - base_os) - (peak["py"] - base_py)
    assert extra_native <= (plan.inference - 1) + (plan.opencv - 1), (peak, base_os, base_py, plan)
