"""The runtime end to end through real OpenCV video files, real threads and the real backend."""
import json

import numpy as np
import pytest
from runtime_media import read_video, scene_frames, write_video

import edge_pfm
from edge_pfm.decision import DecisionConfig, DecisionEngine
from edge_pfm.decision_log import read_log
from edge_pfm.runtime import RunConfig, Runner
from edge_pfm.runtime.quality import GateConfig, assess
from edge_pfm.sources import SourceError, open_source
from edge_pfm.sources.gstreamer import opencv_has_gstreamer, pygobject_gstreamer
from edge_pfm.sources.replay import ReplaySource
from edge_pfm.sources.simulated.stamp import read_stamp


@pytest.fixture
def videos(tmp_path):
    frames = scene_frames(48, label_every=12)
    w = write_video(tmp_path / "white.mkv", [f[0] for f in frames])
    f = write_video(tmp_path / "fluo.mkv", [f[1] for f in frames])
    return w, f, frames


def _run(bundle, tmp_path, white=None, fluo=None, alternating=None, seconds=10.0, **cfg):
    log = tmp_path / "decisions.jsonl"
    config = RunConfig(backend="onnxruntime", log=str(log), **cfg)
    srcs = {"alternating": alternating} if alternating is not None else {"white": white, "fluo": fluo}
    summary = Runner(bundle, config=config, **srcs).run(seconds)
    records, bad = read_log(log)
    assert bad == 0
    return summary, records


def test_logged_decisions_equal_offline_classification(calibrated_bundle, videos, tmp_path):
    w, f, _ = videos
    summary, records = _run(calibrated_bundle, tmp_path, ReplaySource(w, "white_light"), ReplaySource(f, "fluorescence"))
    inferred = [r for r in records if "probs" in r]
    assert len(inferred) >= 10 and summary["pairs_inferred"] == len(inferred)
    white_frames, fluo_frames = read_video(w), read_video(f)
    with edge_pfm.Classifier(calibrated_bundle, backend="onnxruntime") as clf:
        for r in inferred:
            i, j = r["file_index_white"], r["file_index_fluo"]
            assert i == j  # aligned videos pair frame i with frame i
            offline = clf.classify(white_frames[i], fluo_frames[j])
            assert r["raw_class"] == offline.label
            np.testing.assert_allclose(r["probs"], [offline.probs[c] for c in clf.classes], atol=1e-5)
            assert r["model_sha256"] == clf.model_sha256 and r["backend"].startswith("onnxruntime fp32")
    assert {"latency_ms", "skew_ms", "seq_white", "seq_fluo", "smoothed", "gates"} <= set(inferred[0])
    assert summary["latency_ms"]["total"]["n"] == len(inferred)


def test_no_signal_when_one_source_ends(calibrated_bundle, tmp_path):
    frames = scene_frames(40)
    w = write_video(tmp_path / "w.mkv", [f[0] for f in frames[:15]])
    f = write_video(tmp_path / "f.mkv", [f[1] for f in frames])
    summary, records = _run(calibrated_bundle, tmp_path, ReplaySource(w, "white_light"),
                            ReplaySource(f, "fluorescence"), seconds=5)
    states = [r["state"] for r in records]
    assert "no_signal" in states
    ns = next(r for r in records if r["state"] == "no_signal")
    assert ns["shown_class"] is None and "white_light source ended" in ns["flags"][0]
    # nothing is classified after the signal is lost
    assert all(r["state"] == "no_signal" for r in records[states.index("no_signal"):])


def test_gates_keep_bad_frames_out_of_the_decision(calibrated_bundle, tmp_path):
    defects = {i: {"blur_sigma": 14.0} for i in range(12, 18)}
    defects.update({i: {"exposure": 2.4} for i in range(18, 24)})
    defects.update({i: {"glare": 0.12} for i in range(24, 30)})
    frames = scene_frames(36, label_every=36, defects=defects)
    w = write_video(tmp_path / "w.mkv", [f[0] for f in frames])
    f = write_video(tmp_path / "f.mkv", [f[1] for f in frames])
    _, records = _run(calibrated_bundle, tmp_path, ReplaySource(w, "white_light"), ReplaySource(f, "fluorescence"))
    by_index = {r["file_index_white"]: r for r in records if "file_index_white" in r}
    expected = {range(12, 18): "blur", range(18, 24): "overexposed", range(24, 30): "glare"}
    checked = 0
    for rng, flag in expected.items():
        for i in rng:
            if i in by_index:
                r = by_index[i]
                assert r["state"] == "gated" and flag in r["gates"]["white_light"], (i, r["gates"])
                checked += 1
    assert checked >= 5
    for i, r in by_index.items():
        if i < 12 or i >= 30:
            assert r["state"] != "gated", (i, r["gates"])
    # gated decisions never change the smoothed probabilities
    ordered = [by_index[i] for i in sorted(by_index)]
    for prev, cur in zip(ordered, ordered[1:]):
        if cur["state"] == "gated":
            assert cur["smoothed"] == prev["smoothed"]


def test_alternating_mode_with_a_dropped_frame(calibrated_bundle, tmp_path):
    frames = scene_frames(24)
    seq = []
    for w_img, f_img, _ in frames:
        seq += [w_img, f_img]
    del seq[9]  # drop one fluorescence frame: the single stream now has W, W in a row
    path = write_video(tmp_path / "alt.mkv", seq)
    summary, records = _run(calibrated_bundle, tmp_path, alternating=ReplaySource(path, "alternating"))
    stored = read_video(path)
    inferred = [r for r in records if "probs" in r]
    assert len(inferred) >= 8  # how many depends on CPU load; every one is checked below
    for r in inferred:
        assert read_stamp(stored[r["file_index_white"]])[1] == "white_light"
        assert read_stamp(stored[r["file_index_fluo"]])[1] == "fluorescence"
        assert read_stamp(stored[r["file_index_white"]])[0] == read_stamp(stored[r["file_index_fluo"]])[0]
    assert summary["pairing"]["alternation_breaks"] >= 1


def test_decision_hysteresis_and_staleness():
    eng = DecisionEngine(("a", "b"), DecisionConfig(alpha=0.5, hold=3, margin=0.1, max_age_s=0.5))
    t = 0
    for _ in range(5):
        t += int(33e6)
        d = eng.update(np.array([0.9, 0.1]), t)
    assert d.shown_class == "a"
    # alternating noisy evidence never flips the shown class
    for k in range(10):
        t += int(33e6)
        d = eng.update(np.array([0.2, 0.8]) if k % 2 else np.array([0.8, 0.2]), t)
        assert d.shown_class == "a"
    for _ in range(6):
        t += int(33e6)
        d = eng.update(np.array([0.02, 0.98]), t)
    assert d.shown_class == "b"
    assert eng.current(t + int(0.2e9)).shown_class == "b"
    stale = eng.current(t + int(0.6e9))
    assert stale.state == "stale" and stale.shown_class is None
    rej = eng.update(np.array([np.nan, 0.5]), t + 1)
    assert rej.state == "rejected" and eng.stats["rejected_nonfinite"] == 1


def test_gate_assessment_on_frames():
    from edge_pfm.preprocess import PreprocessSpec, preprocess_keep_intermediate
    from edge_pfm.synthetic import render_pair

    spec = PreprocessSpec(size=(128, 128))
    cfg = GateConfig()
    good = preprocess_keep_intermediate(render_pair("lsil", 3, (1280, 720)).white_light, spec)[1]
    assert assess(good, cfg.white_light)[0] == []
    dark = preprocess_keep_intermediate(np.full((720, 1280, 3), 3, np.uint8), spec)[1]
    assert "underexposed" in assess(dark, cfg.white_light)[0]


def test_two_line_api(calibrated_bundle):
    from edge_pfm.synthetic import render_pair

    clf = edge_pfm.Classifier(calibrated_bundle)
    s = render_pair("hsil", 5, (640, 360))
    result = clf.classify(s.white_light, s.fluorescence)
    assert result.label in clf.classes and 0 < result.confidence <= 1
    assert abs(sum(result.probs.values()) - 1) < 1e-5


def test_source_strings(tmp_path):
    with pytest.raises(SourceError, match="neither a device"):
        open_source("nope.mkv", "white_light")
    with pytest.raises(SourceError, match="unknown synthetic options"):
        open_source("synthetic:fps=30,colour=red", "white_light")
    with pytest.raises(SourceError, match="does not exist"):
        open_source("/dev/video77", "white_light")
    if pygobject_gstreamer() is not None and not opencv_has_gstreamer():
        with pytest.raises(SourceError, match="no GStreamer for the white_light camera"):
            open_source("gst:videotestsrc ! appsink", "white_light")
    src = open_source("synthetic:fps=60,drift_ppm=200,jitter_ms=2,drop=0.1,label=hsil,seed=3,width=160,height=120",
                      "fluorescence")
    assert src.fps == 60 and src.drop == 0.1 and src.bank.scenes[0].label == "hsil"
    folder = tmp_path / "imgs"
    folder.mkdir()
    assert isinstance(open_source(str(folder), "white_light"), ReplaySource)


def test_cli_run_with_synthetic_cameras_and_config(calibrated_bundle, tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "device.toml"
    cfg.write_text('[decision]\nalpha = 0.5\n[gates.white_light]\nblur_min = 1.0\n[run]\nbackend = "onnxruntime"\n')
    log, video, summ = tmp_path / "d.jsonl", tmp_path / "v.avi", tmp_path / "s.json"
    run = subprocess.run([sys.executable, "-m", "edge_pfm", "run", "--bundle", str(calibrated_bundle), "--white",
                          "synthetic:width=640,height=360,label=hsil", "--fluo", "synthetic", "--seconds", "3",
                          "--log", str(log), "--video", str(video), "--config", str(cfg), "--summary-json", str(summ)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pairs/s" in run.stdout and "p99" in run.stdout
    records, bad = read_log(log)
    assert bad == 0 and len(records) > 10
    assert {r["label_white"] for r in records if "label_white" in r} == {"hsil"}
    assert all(r.get("label_white") == r.get("label_fluo") for r in records)  # both cameras see one scene
    assert json.loads(summ.read_text())["pairs_inferred"] == sum("probs" in r for r in records)
    assert video.stat().st_size > 10_000 and len(read_video(video)) > 5
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text("[camera]\nsource = 0\n")
    run = subprocess.run([sys.executable, "-m", "edge_pfm", "run", "--bundle", str(calibrated_bundle), "--white",
                          "synthetic", "--fluo", "synthetic", "--config", str(bad_cfg)], capture_output=True, text=True)
    assert run.returncode == 2 and "unknown sections ['camera']" in run.stderr


def test_bench_command_writes_its_figures(calibrated_bundle, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "edge_pfm", "bench", "--bundle", str(calibrated_bundle),
                          "--backend", "onnxruntime", "--resolution", "640x360", "--seconds", "1.5", "--json", str(out)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    d = json.loads(out.read_text())
    for key in ("backend_pairs_per_s", "naive_pairs_per_s", "pipeline_pairs_per_s", "added_latency_ms_p50",
                "added_latency_ms_p99", "preprocess_ms_p50", "rss_mb"):
        assert isinstance(d[key], (int, float)) and d[key] == d[key], key  # present and not NaN
    assert d["backend_pairs_per_s"] > 0 and d["pipeline_pairs_per_s"] > 0
