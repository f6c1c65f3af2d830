"""edge-pfm record for real: live GStreamer cameras into FFV1 videos with frame records, replayed through the
Runner with the recorded timing; synthetic cameras into a paired dataset that calibration reads; SIGKILL in the
middle of each mode, then a resume that continues without a duplicate or a gap."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from gst_rig import WHY_SKIP, StampedRig, rig_source

from edge_pfm.dataset import PairedDataset
from edge_pfm.recording import record
from edge_pfm.recording.sidecar import SidecarError, SidecarWriter, read_sidecar, sidecar_path
from edge_pfm.recording.video import decodable_frames, parts
from edge_pfm.runtime import RunConfig, Runner
from edge_pfm.sources.replay import ReplaySource
from edge_pfm.sources.simulated.stamp import read_stamp, stamp

MODALITIES = ("white_light", "fluorescence")


def _config(**kw):
    return RunConfig(backend="onnxruntime", precision="fp32", **kw)


def _pairs(log):
    """seq_white -> the decision record, for the decisions made from a pair."""
    out = {}
    for line in Path(log).read_text().splitlines():
        r = json.loads(line)
        if "seq_white" in r:
            out[r["seq_white"]] = r
    return out


def test_a_frame_record_drops_a_torn_last_line_and_names_a_damaged_one(tmp_path):
    path = tmp_path / "cam.000.frames.jsonl"
    w = SidecarWriter(path, {"modality": "white_light", "fps": 30.0})
    for k in range(3):
        w.frame(k, k + 1, 1000 + k, "device", 5, {"offset": k, "not_json": object()})
    w.close()
    with open(path, "ab") as f:
        f.write(b'{"frame": 3, "seq"')  # a crash in the middle of a line
    header, frames = read_sidecar(path)
    assert header["modality"] == "white_light" and [f["frame"] for f in frames] == [0, 1, 2]
    assert frames[2]["meta"] == {"offset": 2}  # only what JSON holds
    lines = path.read_bytes().split(b"\n")
    lines[2] = b"garbage"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(SidecarError, match=r"cam.000.frames.jsonl:3: not a JSON line"):
        read_sidecar(path)
    assert sidecar_path(tmp_path / "white_light.004.avi").name == "white_light.004.frames.jsonl"


@pytest.fixture(scope="module")
def scene():
    from gst_rig import H, W

    from edge_pfm.synthetic import scenes

    s = next(scenes(1, seed=5, size=(W, H)))
    return {"white_light": s.white_light, "fluorescence": s.fluorescence}


@pytest.mark.skipif(WHY_SKIP is not None, reason=str(WHY_SKIP))
def test_two_live_cameras_recorded_replay_with_their_recorded_timing(calibrated_bundle, scene, tmp_path):
    sources = {m: rig_source(m) for m in MODALITIES}
    rig = StampedRig(sources, scene).start()
    live_log, rec = tmp_path / "live.jsonl", tmp_path / "rec"
    try:
        summary = record(calibrated_bundle, {"white": sources["white_light"], "fluo": sources["fluorescence"]},
                         rec, "video", config=_config(seconds=4.0, log=str(live_log)))
    finally:
        rig.stop.set()
    report = summary["outputs"]["recording"]
    for m in MODALITIES:
        (video,) = parts(rec, m)
        header, frames = read_sidecar(sidecar_path(video))
        grabbed = summary["sources"][m]["grabbed"]
        written = report["cameras"][m]["written"]
        # every frame the camera delivered is in its video and its record, unless the encoder fell behind
        assert written + report["cameras"][m].get("dropped_busy", 0) == grabbed > 90
        assert decodable_frames(video) == len(frames) == written
        assert header["codec"] == "FFV1" and header["fps"] == 30 and {f["stamp"] for f in frames} == {"device"}
        assert [f["frame"] for f in frames] == list(range(written))
        # lossless: the first frames read back exactly as the rig stamped them, in order
        replay = ReplaySource(video, m, paced=False)
        replay.open()
        images = [replay.grab().image for _ in range(5)]
        replay.close()
        ks = [read_stamp(img)[0] for img in images]
        assert np.all(np.diff(ks) >= 1) and {read_stamp(img)[1] for img in images} == {m}
        assert all(np.array_equal(img, stamp(scene[m].copy(), k, m)) for img, k in zip(images, ks))

    runner = Runner(calibrated_bundle, ReplaySource(parts(rec, "white_light")[0], "white_light"),
                    ReplaySource(parts(rec, "fluorescence")[0], "fluorescence"),
                    config=_config(log=str(tmp_path / "replay.jsonl")))
    mispaired = []
    runner.observers.append(lambda work, d: mispaired.append(
        read_stamp(work.pair.white_light.image)[0] != read_stamp(work.pair.fluorescence.image)[0]))
    runner.run()
    live, replayed = _pairs(live_log), _pairs(tmp_path / "replay.jsonl")
    common = sorted(set(live) & set(replayed))
    assert len(common) > 20 and not any(mispaired)
    for k in common:  # the same pair, the same skew, the same class
        a, b = live[k], replayed[k]
        assert b["seq_fluo"] == a["seq_fluo"] and abs(b["skew_ms"] - a["skew_ms"]) < 1.0
        assert b["stamps"] == {"white": "replay:device", "fluo": "replay:device"}
        assert b["raw_class"] == a["raw_class"] and np.allclose(b["probs"], a["probs"], atol=1e-5)


def test_without_a_frame_record_a_replay_uses_the_containers_timestamps(tmp_path):
    from runtime_media import scene_frames, write_video

    path = tmp_path / "w.avi"
    write_video(path, [w for w, _, _ in scene_frames(6)], fps=25)
    src = ReplaySource(path, "white_light", paced=True)
    src.open()
    times = [src.grab().t_capture_ns for _ in range(6)]
    src.close()
    assert src.timing == "container" and np.allclose(np.diff(times), 40e6, atol=1e3)


def test_a_dataset_recording_is_a_paired_dataset_calibration_reads(calibrated_bundle, tmp_path):
    out = tmp_path / "ds"
    summary = record(calibrated_bundle, _synthetic(), out, "dataset", pairs=8, every_s=0.2,
                     config=_config(seconds=60))
    rep = summary["outputs"]["dataset"]
    assert rep["kept"] == 8 and summary["seconds"] < 30  # it stops when the pairs are kept
    ds = PairedDataset(out, ("normal", "inflammation", "lsil", "hsil"))
    assert len(ds) == 8 and not ds.labelled and (out / "classes.txt").read_text().split() == list(ds.classes)
    lines = [json.loads(s) for s in (out / "capture.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in lines] == [f"{k:06d}" for k in range(8)]
    t = np.array([r["t_capture_white_ns"] for r in lines])
    assert np.all(np.diff(t) >= 0.2e9 - 1) and all(not any(r["gates"].values()) for r in lines)
    assert all(abs(r["skew_ms"]) < 17 and r["stamps"]["white"] for r in lines)
    white, fluo, label = ds.load(0)
    assert label is None and white.shape == (240, 320, 3) and fluo.shape == white.shape


def _synthetic():
    from edge_pfm.sources import open_source
    from edge_pfm.sources.simulated.cameras import synthetic_bank

    spec = "synthetic:width=320,height=240"
    bank = synthetic_bank(spec)
    return {"white": open_source(spec, "white_light", bank), "fluo": open_source(spec, "fluorescence", bank)}


def _record_cli(bundle, out, *extra):
    return [sys.executable, "-m", "edge_pfm", "record", "--bundle", str(bundle), "--out", str(out), "--backend",
            "onnxruntime", "--white", "synthetic:width=320,height=240", "--fluo", "synthetic:width=320,height=240",
            *extra]


def _kill_when(proc, ready, timeout=120):
    t_end = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < t_end, "the recording did not get going"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_killed_dataset_recording_resumes_without_a_duplicate_or_a_gap(calibrated_bundle, tmp_path):
    out = tmp_path / "ds"
    capture = out / "capture.jsonl"
    proc = subprocess.Popen(_record_cli(calibrated_bundle, out, "--mode", "dataset", "--pairs", "40"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: capture.exists() and capture.read_bytes().count(b"\n") >= 6)
    kept_before = capture.read_bytes().count(b"\n")
    assert kept_before < 40
    r = subprocess.run(_record_cli(calibrated_bundle, out, "--mode", "dataset", "--pairs", "40"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming {out}: {kept_before} pairs committed" in r.stderr
    lines = [json.loads(s) for s in capture.read_text().splitlines()]
    assert [x["sample"] for x in lines] == [f"{k:06d}" for k in range(40)]
    assert len({x["run_id"] for x in lines}) == 2
    ds = PairedDataset(out)
    assert len(ds) == 40 and sorted(p.name for p in (out / "white").iterdir()) == [f"{k:06d}.png" for k in range(40)]
    assert (out / "labels.csv").read_text().splitlines() == ["sample,label"] + [f"{k:06d}," for k in range(40)]


def test_a_killed_video_recording_resumes_in_a_new_part_that_continues_the_frames(calibrated_bundle, tmp_path):
    out = tmp_path / "rec"
    proc = subprocess.Popen(_record_cli(calibrated_bundle, out, "--seconds", "60"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record0 = out / "white_light.000.frames.jsonl"
    _kill_when(proc, lambda: record0.exists() and record0.read_bytes().count(b"\n") >= 40)
    r = subprocess.run(_record_cli(calibrated_bundle, out, "--seconds", "3"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    for m in MODALITIES:
        p0, p1 = parts(out, m)
        h0, f0 = read_sidecar(sidecar_path(p0))
        h1, f1 = read_sidecar(sidecar_path(p1))
        # the killed part's record is cut to the frames its video holds; the new part goes on from there
        assert len(f0) == decodable_frames(p0) > 0 and h1["first_frame"] == len(f0) and h1["part"] == 1
        assert [f["frame"] for f in f0 + f1] == list(range(len(f0) + len(f1)))
        assert len(f1) == decodable_frames(p1) > 30
