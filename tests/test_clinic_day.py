"""A clinic day on disk: the preflight, rotation under a cap, a write failure that ends the run cleanly (a real
small filesystem where one can be mounted, a real RLIMIT_FSIZE where not), and the run header that says which
engine made every line. Real files, real flush/fsync/close, real subprocesses."""
import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from edge_pfm.decision_log import DecisionLog, LogWriteError, read_log, trace
from edge_pfm.errors import ExitCode
from edge_pfm.outputs import Retention, files_in_order

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def small_filesystem(where: Path, size: str):
    """A real tmpfs of `size` at `where` (root only); skip where it cannot be mounted."""
    where.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True) if os.geteuid() == 0 else None
    if r is None or r.returncode:
        pytest.skip(f"cannot mount a small filesystem here ({r.stderr.strip() if r else 'not root'}): the "
                    "RLIMIT_FSIZE tests cover the write failure")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _run(*args, cwd=ROOT, fsize=None):
    def limit():
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "edge_pfm", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, preexec_fn=limit, timeout=300)


def _one_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


def _config(tmp_path, **outputs) -> Path:
    p = tmp_path / "device.toml"
    p.write_text("[outputs]\n" + "".join(f"{k} = {v}\n" for k, v in outputs.items()))
    return p


def _all_lines_parse(path: Path) -> int:
    n = 0
    for f in files_in_order(path):
        data = f.read_bytes()
        assert not data or data.endswith(b"\n"), f"{f} ends mid-line"
        for line in data.splitlines():
            json.loads(line)
            n += 1
    return n


def test_the_preflight_refuses_a_64k_filesystem_with_the_numbers(calibrated_bundle, tmp_path):
    with small_filesystem(tmp_path / "small", "64k") as small:
        r = _run("run", "--bundle", calibrated_bundle, "--backend", "onnxruntime", "--white", "synthetic", "--fluo",
                 "synthetic", "--seconds", "8", "--log", small / "decisions.jsonl")
        assert r.returncode == ExitCode.RUNTIME_FAILURE
        line = _one_line(r)
        assert "not enough free space for 8 s of output" in line and "MiB free" in line and "decision log" in line
        assert not (small / "decisions.jsonl").exists()  # refused before anything was written


def test_a_full_64k_filesystem_mid_run_ends_cleanly(calibrated_bundle, tmp_path):
    """The issue's run, with the preflight's spare space off so that the disk fills while running."""
    cfg = _config(tmp_path, min_free_mb=0, log_cap_mb=0.06)
    with small_filesystem(tmp_path / "small", "64k") as small:
        log = small / "decisions.jsonl"
        r = _run("run", "--bundle", calibrated_bundle, "--backend", "onnxruntime", "--white", "synthetic:fps=120",
                 "--fluo", "synthetic:fps=120", "--seconds", "4", "--log", log, "--config", cfg)
        assert r.returncode == ExitCode.RUNTIME_FAILURE, r.stderr[-2000:]
        line = _one_line(r)
        assert f"cannot write the decision log {log}: No space left on device" in line
        assert "log_failed" in r.stderr  # said at once, before the clean stop
        assert _all_lines_parse(log) > 10


def test_a_file_size_limit_mid_run_ends_cleanly(calibrated_bundle, tmp_path):
    """RLIMIT_FSIZE: the write that crosses it is cut short (EFBIG); the partial line is taken back."""
    log = tmp_path / "decisions.jsonl"
    r = _run("run", "--bundle", calibrated_bundle, "--backend", "onnxruntime", "--white", "synthetic:fps=120", "--fluo",
             "synthetic:fps=120", "--seconds", "4", "--log", log, fsize=30_000)
    assert r.returncode == ExitCode.RUNTIME_FAILURE, r.stderr[-2000:]
    assert f"cannot write the decision log {log}: File too large" in _one_line(r)
    n = _all_lines_parse(log)
    assert n > 10 and log.stat().st_size <= 30_000
    records, bad = read_log(log)
    assert bad == 0 and [r["n"] for r in records] == list(range(1, len(records) + 1))  # no gap before the failure


def test_the_video_fails_cleanly_too(calibrated_bundle, tmp_path):
    video = tmp_path / "session.avi"
    r = _run("run", "--bundle", calibrated_bundle, "--backend", "onnxruntime", "--white", "synthetic", "--fluo",
             "synthetic", "--seconds", "20", "--video", video, fsize=200_000)  # the limit holds for every file: no --log
    assert r.returncode == ExitCode.RUNTIME_FAILURE, r.stderr[-2000:]
    line = _one_line(r)
    assert f"cannot write the video {video}" in line and "stopped growing" in line
    assert 0 < video.stat().st_size <= 200_000


def test_rotation_keeps_whole_lines_in_order_under_the_cap(tmp_path, caplog):
    log = tmp_path / "d.jsonl"
    dlog = DecisionLog(log, {"run_id": "r1"}, Retention(rotate_bytes=4096, cap_bytes=16384))
    for i in range(1, 401):
        dlog.write({"n": i, "pad": "x" * 60})
    dlog.close()
    files = files_in_order(log)
    assert len(files) >= 4 and files[-1] == log
    assert sum(f.stat().st_size for f in files) <= 16384
    assert all(f.read_text().splitlines()[0].startswith('{"type":"run_header"') for f in files)
    records, bad = read_log(log)
    numbers = [r["n"] for r in records]
    assert bad == 0 and numbers == list(range(numbers[0], 401)) and numbers[0] > 1  # the oldest went, no gap
    assert dlog.removed and any("removed the oldest file" in m and "cap" in m for m in caplog.messages)


def test_a_full_disk_in_the_middle_of_a_rotation(tmp_path):
    """The disk fills just as a file is rotated: the new file's header cannot be written. The finished segment
    keeps every line; nothing is half-written."""
    with small_filesystem(tmp_path / "small", "64k") as small:
        log = small / "d.jsonl"
        dlog = DecisionLog(log, {"run_id": "r1"}, Retention(rotate_bytes=8192, cap_bytes=None))
        i, line = 0, len(json.dumps({"n": 99, "pad": "y" * 100}, separators=(",", ":"))) + 1
        while log.stat().st_size + 2 * line <= 8192:  # stop where the next line but one starts a new file
            i += 1
            dlog.write({"n": i, "pad": "y" * 100})
        with contextlib.suppress(OSError), open(small / "filler", "wb") as f:  # fill the disk to the last byte
            while True:
                f.write(b"\0" * 512)
                f.flush()
        written = i
        with pytest.raises(LogWriteError, match="No space left on device"):
            for _ in range(3):  # the page the file already has takes one more line; the next one rotates it
                dlog.write({"n": written + 1, "pad": "y" * 100})
                written += 1
        dlog.close()  # after a failure: nothing left to flush, no second error
        segment = small / "d.000001.jsonl"
        assert segment.is_file() and log.read_bytes() == b""  # failed in the rotation: the new file's header
        records, bad = read_log(log)
        assert bad == 0 and [r["n"] for r in records] == list(range(1, written + 1))  # every line before it kept
        _all_lines_parse(log)


def test_a_partial_line_left_by_a_crash_is_cut_on_reopen(tmp_path):
    log = tmp_path / "d.jsonl"
    log.write_text('{"n": 1}\n{"n": 2, "cut off')
    DecisionLog(log, {"run_id": "r2"}).close()
    assert log.read_text().splitlines()[:1] == ['{"n": 1}'] and _all_lines_parse(log) == 2


def test_every_line_says_which_engine_made_it(calibrated_bundle, tmp_path):
    from edge_pfm.bundle import Bundle
    from edge_pfm.runtime import RunConfig, Runner
    from edge_pfm.sources.simulated.cameras import SceneBank, SyntheticSource

    bank = SceneBank((320, 240), seed=1, per_class=1)
    log = tmp_path / "d.jsonl"
    runner = Runner(calibrated_bundle, SyntheticSource("white_light", bank, fps=30),
                    SyntheticSource("fluorescence", bank, fps=30),
                    config=RunConfig(backend="onnxruntime", precision="int8", log=str(log)))
    runner.run(1.5)
    b = Bundle.load(calibrated_bundle)
    t = trace(log, 3)
    h = t["header"]
    assert h["run_id"] == t["record"]["run_id"] == runner.run_id and h["precision"] == "int8"
    assert h["engine"]["built_from"] == {"model.int8.onnx": b.sha256("model.int8.onnx")}
    assert h["engine"]["engine_sha256"] == t["record"]["engine"]["engine_sha256"]
    assert h["engine"]["flavour"] == "onnxruntime" and h["config_sha256"] == runner.cfg.digest()
    r = subprocess.run([sys.executable, "-m", "edge_pfm.decision_log", str(log), "3"], capture_output=True, text=True)
    assert r.returncode == 0 and "engine onnxruntime" in r.stdout and "matches" in r.stdout, r.stdout + r.stderr


def test_video_and_log_rotate_by_size_and_by_time_under_their_caps(calibrated_bundle, tmp_path):
    """A real run: the video rotates by size under a cap that removes its oldest files, the log by age. Every kept
    video file is a whole, readable AVI; the log's files hold every decision once, in order."""
    import cv2

    video, log = tmp_path / "v.avi", tmp_path / "d.jsonl"
    rotate, cap = int(0.4 * (1 << 20)), int(2.0 * (1 << 20))
    config = _config(tmp_path, video_rotate_mb=0.4, video_rotate_minutes=0, video_cap_mb=2.0, log_rotate_mb=0,
                     log_rotate_minutes=0.04, log_cap_mb=0)  # the log: a new file every 2.4 s
    r = _run("run", "--bundle", calibrated_bundle, "--backend", "onnxruntime", "--white", "synthetic", "--fluo",
             "synthetic", "--seconds", "8", "--video", video, "--log", log, "--config", config)
    assert r.returncode == 0, r.stderr[-3000:]
    videos = files_in_order(video)
    assert len(videos) >= 3 and "removed the oldest file" in r.stderr  # it rotated, and the cap removed some
    assert videos[0].name != "v.000001.avi"  # the oldest went first
    assert sum(f.stat().st_size for f in videos) <= cap
    for f in videos:
        assert f.stat().st_size <= rotate + (256 << 10), f  # past the size by at most FFmpeg's unflushed frames
        cap_ = cv2.VideoCapture(str(f))
        frames = 0
        while cap_.read()[0]:
            frames += 1
        cap_.release()
        assert frames > 0, f"{f} does not read back"
    logs = files_in_order(log)
    assert len(logs) >= 3  # 8 s at one file per 2.4 s
    records, bad = read_log(log)
    numbers = [rec["n"] for rec in records]
    assert bad == 0 and numbers == list(range(1, len(numbers) + 1)) and len(numbers) > 100
    assert all(f.read_text().splitlines()[0].startswith('{"type":"run_header"') for f in logs)
