"""The runtime's rooms on their own: the pairing tolerance from the cameras' real rate (negotiated or measured),
signal health as a pure function of a fake clock, and sinks attached from outside."""
import pytest

from edge_pfm.decision_log import read_log
from edge_pfm.runtime import DecisionLogSink, MemorySink, RunConfig, Runner, Sink
from edge_pfm.runtime.health import SourceHealth, signal_problem
from edge_pfm.runtime.record import PAIR_KEYS, RECORD_KEYS
from edge_pfm.sources.base import FrameSource
from edge_pfm.sources.simulated.cameras import SceneBank, SyntheticSource


@pytest.fixture(scope="module")
def bank():
    return SceneBank((320, 240), seed=4)


class Skews:
    def __init__(self):
        self.skews_ms = []

    def __call__(self, work, decision):
        self.skews_ms.append(work.pair.skew_ns / 1e6)


def test_60_fps_cameras_pair_within_half_their_own_period(calibrated_bundle, bank):
    """No tolerance configured: 60 fps cameras with a 4 ms phase get +-8.33 ms, not the 30 fps default's 16.7 ms."""
    white = SyntheticSource("white_light", bank, fps=60, seed=1, jitter_ms=1)
    fluo = SyntheticSource("fluorescence", bank, fps=60, seed=2, phase_ms=4, jitter_ms=1)
    runner = Runner(calibrated_bundle, white, fluo, config=RunConfig(backend="onnxruntime", precision="fp32"))
    skews = Skews()
    runner.observers.append(skews)
    s = runner.run(2.5)
    half_period_ms = 1000 / 60 / 2
    assert s["tolerance"]["from"] == "negotiated"
    assert s["tolerance"]["tolerance_ms"] == pytest.approx(half_period_ms, abs=1e-3)
    assert s["tolerance"]["fps"] == {"white_light": 60.0, "fluorescence": 60.0}
    assert len(skews.skews_ms) > 30 and s["pairs"] > 60
    assert max(abs(x) for x in skews.skews_ms) <= half_period_ms


class RateUnknown(FrameSource):
    """A real source whose driver does not say its frame rate (OpenCV's CAP_PROP_FPS gives 0)."""

    def __init__(self, inner):
        super().__init__(f"rate-unknown:{inner.name}", inner.modality)
        self.inner = inner

    def open(self):
        self.inner.open()

    def grab(self):
        return self.inner.grab()


def test_a_source_without_a_rate_is_measured_and_the_tolerance_follows(calibrated_bundle, bank, tmp_path):
    white = RateUnknown(SyntheticSource("white_light", bank, fps=50, seed=1))
    fluo = SyntheticSource("fluorescence", bank, fps=50, seed=2, phase_ms=3)
    log = tmp_path / "d.jsonl"
    runner = Runner(calibrated_bundle, white, fluo,
                    config=RunConfig(backend="onnxruntime", precision="fp32", log=str(log)))
    s = runner.run(2.5)
    assert s["tolerance"]["from"] == "measured"
    assert s["tolerance"]["tolerance_ms"] == pytest.approx(10.0, rel=0.05)  # half of 20 ms
    header = read_log(log, headers=True)[0][0]
    assert header["pairing"]["from"] == "provisional"  # what was known when the log opened: it says so
    assert s["pairs_inferred"] > 20


def test_a_configured_tolerance_wins(calibrated_bundle, bank):
    runner = Runner(calibrated_bundle, SyntheticSource("white_light", bank, fps=60),
                    SyntheticSource("fluorescence", bank, fps=60, seed=2),
                    config=RunConfig(backend="onnxruntime", precision="fp32", tolerance_ms=3.0))
    s = runner.run(1.0)
    assert s["tolerance"]["from"] == "configured" and s["tolerance"]["tolerance_ms"] == 3.0


def test_signal_health_on_a_fake_clock():
    ms = 1_000_000
    ok = [SourceHealth("white_light", False, 990 * ms), SourceHealth("fluorescence", False, 995 * ms)]
    assert signal_problem(1000 * ms, 0, ok, 990 * ms, 1.0, 16 * ms) is None
    silent = [SourceHealth("white_light", False, 990 * ms), SourceHealth("fluorescence", False, 100 * ms)]
    assert signal_problem(1000 * ms, 0, silent, 990 * ms, 1.0, 16 * ms) is None  # silent 0.9 s: within the timeout
    silent = [SourceHealth("white_light", False, 1990 * ms), SourceHealth("fluorescence", False, 100 * ms)]
    assert "no frame from the fluorescence camera for 1.9s" in signal_problem(2000 * ms, 0, silent, 1990 * ms, 1.0,
                                                                             16 * ms)
    assert "no frame from the white_light camera" in signal_problem(1500 * ms, 0, [SourceHealth("white_light", False, 0)],
                                                                    0, 1.0, 16 * ms)  # none since the start
    ended = [SourceHealth("camera", True, 999 * ms)]
    assert signal_problem(1000 * ms, 0, ended, 999 * ms, 1.0, 16 * ms) == "camera source ended"
    unpaired = signal_problem(3000 * ms, 0, [SourceHealth("white_light", False, 2999 * ms),
                                             SourceHealth("fluorescence", False, 2999 * ms)], 1000 * ms, 1.0, 16 * ms)
    assert "none paired within +-16 ms for 2.0s" in unpaired


class Failing(Sink):
    """An output that breaks after a few decisions, as a full disk does."""

    failed_state = "log_failed"

    def __init__(self, after):
        self.after, self.seen = after, 0

    def write(self, event):
        self.seen += 1
        if self.seen > self.after:
            from edge_pfm.decision_log import LogWriteError

            raise LogWriteError("injected: no space left")


def test_sinks_attached_from_outside_get_every_decision_and_a_failure_ends_the_run(calibrated_bundle, bank, tmp_path):
    from edge_pfm.decision_log import LogWriteError

    memory, log = MemorySink(), DecisionLogSink(tmp_path / "d.jsonl")
    runner = Runner(calibrated_bundle, SyntheticSource("white_light", bank, fps=30),
                    SyntheticSource("fluorescence", bank, fps=30, seed=2),
                    config=RunConfig(backend="onnxruntime", precision="fp32"), sinks=[memory, log])
    s = runner.run(1.5)
    records, bad = read_log(tmp_path / "d.jsonl")
    assert bad == 0 and records == memory.records and len(records) == s["decisions_made"] > 10
    assert all(set(RECORD_KEYS) <= set(r) for r in records)
    assert all(set(PAIR_KEYS) <= set(r) for r in records if r["state"] != "no_signal")
    assert s["outputs"]["log"]["lines"] == len(records)

    failing = Failing(after=5)
    runner = Runner(calibrated_bundle, SyntheticSource("white_light", bank, fps=30),
                    SyntheticSource("fluorescence", bank, fps=30, seed=2),
                    config=RunConfig(backend="onnxruntime", precision="fp32"), sinks=[failing])
    with pytest.raises(LogWriteError, match="no space left"):
        runner.run(10.0)
    assert failing.seen == 6 and runner.current().state == "log_failed"


def test_a_bug_in_a_reader_thread_ends_the_run_with_it(calibrated_bundle, bank):
    runner = Runner(calibrated_bundle, SyntheticSource("white_light", bank, fps=30),
                    SyntheticSource("fluorescence", bank, fps=30, seed=2),
                    config=RunConfig(backend="onnxruntime", precision="fp32"))

    def broken_pairing(*_):
        raise RuntimeError("a bug in pairing")

    runner.stream._pair = broken_pairing  # a defect in the code, not a bad frame: it must not hide as a count
    with pytest.raises(RuntimeError, match="a bug in pairing"):
        runner.run(10.0)
    assert runner.stream.stats["bad_frames"] == 0


def test_output_checks_refuse_nonfinite_logits_and_drop_only_a_nonfinite_map(calibrated_bundle):
    import numpy as np

    import edge_pfm
    from edge_pfm.classifier import NonFiniteOutput

    clf = edge_pfm.Classifier(calibrated_bundle, backend="onnxruntime", precision="fp32")
    n = len(clf.classes)
    good = {"logits": np.arange(n, dtype=np.float32)[None], "lesion_map": np.full((1, 1, 4, 4), np.nan, np.float32)}
    r = clf.classify_outputs(good, (240, 320, 3), every_map=True)
    assert r.label == clf.classes[-1] and r.lesion_map is None  # the class stands, the broken map is not drawn
    bad = {"logits": np.array([[np.nan] * n], np.float32), "lesion_map": good["lesion_map"]}
    with pytest.raises(NonFiniteOutput, match="non-finite logits"):
        clf.classify_outputs(bad, (240, 320, 3))
