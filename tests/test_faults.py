"""The fault matrix: the real pipeline through fault-injecting sources. No crash, no mispaired or swapped
modality (checked on the pixel stamps), no stale decision presented as current, every fault counted."""
import threading
import time

import pytest

import edge_pfm
from edge_pfm.runtime import RunConfig, Runner
from edge_pfm.sources.simulated.cameras import SceneBank, SyntheticSource
from edge_pfm.sources.simulated.faults import FaultySource, NonFiniteBackend
from edge_pfm.sources.simulated.stamp import read_stamp

TOL_MS = 1000 / 30 / 2


@pytest.fixture(scope="module")
def bank():
    return SceneBank((320, 240), seed=2)


class Watch:
    """Observes every inferred pair and polls what a display would show."""

    def __init__(self, runner, max_age_s):
        self.runner, self.max_age_ns = runner, max_age_s * 1e9
        self.pairs, self.bad_pairs, self.stale_shown, self.states = 0, [], 0, []
        self.seen = set()
        self.stop = threading.Event()
        runner.observers.append(self.observe)
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def observe(self, work, decision):
        self.pairs += 1
        if min(f.image.shape[1] for f in (work.pair.white_light, work.pair.fluorescence)) < 26 * 6:
            return  # a corrupted, cropped frame: its stamp is cut off (the skew is checked by the pairer)
        wi, wm = read_stamp(work.pair.white_light.image)
        fi, fm = read_stamp(work.pair.fluorescence.image)
        reused = ("w", wi) in self.seen or ("f", fi) in self.seen
        if (wm, fm) != ("white_light", "fluorescence") or reused or abs(work.pair.skew_ns) > TOL_MS * 1e6:
            self.bad_pairs.append((wi, wm, fi, fm, work.pair.skew_ns))
        self.seen |= {("w", wi), ("f", fi)}

    def poll(self):
        while not self.stop.is_set():
            d = self.runner.current()
            if d is not None:
                self.states.append(d.state)
                if d.shown_class is not None and time.monotonic_ns() - d.t_update_ns > self.max_age_ns:
                    self.stale_shown += 1
            time.sleep(0.01)


def recovered_after_no_signal(states: list[str], state: str = "no_signal") -> bool:
    """The display showed `state` (no_signal, camera_lost) during the fault and classified again after it."""
    if state not in states:
        return False
    return any(x in ("ok", "warming_up") for x in states[states.index(state):])


def run_faulty(bundle, bank, seconds, white_faults=None, fluo_faults=None, classifier=None, fluo_drift_ppm=0.0,
               **cfg):
    white = FaultySource(SyntheticSource("white_light", bank, fps=30, seed=1), seed=11, **(white_faults or {}))
    fluo = FaultySource(SyntheticSource("fluorescence", bank, fps=30, seed=2, drift_ppm=fluo_drift_ppm), seed=12,
                        **(fluo_faults or {}))
    config = RunConfig(backend="onnxruntime", tolerance_ms=TOL_MS, signal_timeout_s=0.4, **cfg)
    runner = Runner(bundle, white, fluo, config=config, classifier=classifier)
    watch = Watch(runner, config.decision.max_age_s)
    summary = runner.run(seconds)
    watch.stop.set()
    watch.thread.join()
    assert watch.bad_pairs == [], f"mispaired or swapped: {watch.bad_pairs[:5]}"
    assert watch.stale_shown == 0, "a stale decision was presented as current"
    return summary, watch, white, fluo


def test_random_drops(calibrated_bundle, bank):
    s, w, white, fluo = run_faulty(calibrated_bundle, bank, 3.0, dict(drop=0.1), dict(drop=0.1))
    assert white.faults["dropped"] > 0 and fluo.faults["dropped"] > 0
    assert s["sources"]["white_light"]["dropped"] == white.faults["dropped"]  # counted in the summary
    assert sum(s["unpaired"].values()) > 0 and w.pairs > 20


def test_jitter_and_drift(calibrated_bundle, bank):
    s, w, *_ = run_faulty(calibrated_bundle, bank, 3.0, dict(jitter_ms=10), dict(jitter_ms=10), fluo_drift_ppm=1000)
    assert w.pairs > 20


def test_stall_gives_no_signal_then_recovers(calibrated_bundle, bank):
    s, w, white, _ = run_faulty(calibrated_bundle, bank, 3.5, dict(stall=(1.0, 1.2)))
    assert white.faults["stalled_s"] > 0.8
    assert s["decisions"].get("no_signal", 0) >= 1
    assert recovered_after_no_signal(w.states)


def test_disconnect_reopens_with_backoff_while_the_other_runs(calibrated_bundle, bank):
    s, w, _, fluo = run_faulty(calibrated_bundle, bank, 4.0, None, dict(disconnect=(1.0, 1.0)))
    assert fluo.faults["disconnected_reads"] >= 1 and fluo.stats["reconnects"] >= 1
    assert s["sources"]["fluorescence"]["read_errors"] >= 1
    # a camera known broken and being reopened is camera_lost (decision.py), not the vaguer no_signal
    assert s["decisions"].get("camera_lost", 0) >= 1
    assert s["sources"]["white_light"]["grabbed"] > 100  # the white-light camera kept running throughout
    assert recovered_after_no_signal(w.states, "camera_lost")


def test_corrupt_frames_are_counted_never_inferred(calibrated_bundle, bank):
    s, w, white, fluo = run_faulty(calibrated_bundle, bank, 3.0, dict(corrupt=0.15), dict(corrupt=0.15))
    corrupted = white.faults["corrupted"] + fluo.faults["corrupted"]
    assert corrupted > 5
    # empty and None frames are refused by preprocessing; wrong-size and grey ones are valid input
    assert 0 < s["bad_frames"] <= corrupted


def test_nonfinite_output_is_rejected_and_counted(calibrated_bundle, bank):
    clf = edge_pfm.Classifier(calibrated_bundle, backend="onnxruntime")
    clf.backend = NonFiniteBackend(clf.backend, every=4)
    s, w, *_ = run_faulty(calibrated_bundle, bank, 2.5, classifier=clf)
    assert clf.backend.injected > 3
    assert s["rejected_nonfinite"] == clf.backend.injected
    assert s["decisions"]["rejected"] == clf.backend.injected
    assert "rejected" not in [x for x in w.states]  # a rejected output is never what the display shows


def test_fault_windows_repeat(bank):
    src = FaultySource(SyntheticSource("white_light", bank, fps=30), stall=(0.2, 0.1), every_s=0.5)
    src.t0_ns = time.monotonic_ns()
    inside = []
    t_end = time.monotonic() + 1.3
    while time.monotonic() < t_end:
        inside.append(src._in_window(src.stall))
        time.sleep(0.01)
    starts = sum(1 for a, b in zip(inside, inside[1:]) if b and not a)
    assert starts == 3  # at 0.2, 0.7 and 1.2 s


def test_heap_setting_applies_on_linux():
    import sys

    from edge_pfm.memory import limit_heap_fragmentation

    assert limit_heap_fragmentation() is sys.platform.startswith("linux")


def test_cameras_out_of_sync_give_no_signal_with_the_reason(calibrated_bundle, bank):
    """Frames keep arriving but never pair (here: 15 vs 30 fps with a 5 ms tolerance and an offset phase)."""
    white = SyntheticSource("white_light", bank, fps=30, seed=1)
    fluo = SyntheticSource("fluorescence", bank, fps=7, seed=2, phase_ms=16)
    config = RunConfig(backend="onnxruntime", tolerance_ms=0.5, signal_timeout_s=0.4)
    runner = Runner(calibrated_bundle, white, fluo, config=config)
    runner.keep_decisions = True
    runner.run(2.5)
    reasons = [r["flags"][0] for r in runner.decisions if r["state"] == "no_signal"]
    assert any("none paired" in r and "out of sync" in r for r in reasons), reasons
