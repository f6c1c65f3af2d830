"""Crash safety with real processes and real signals: the decision log survives SIGKILL with at most one
partial line, SIGTERM/SIGINT shut down cleanly with the summary, a killed export leaves no bundle."""
import os
import signal
import subprocess
import sys
import time

import pytest

from edge_pfm.decision_log import read_log


def _start_run(bundle, log):
    return subprocess.Popen(
        [sys.executable, "-m", "edge_pfm", "run", "--bundle", str(bundle), "--backend", "onnxruntime",
         "--white", "synthetic:width=320,height=240", "--fluo", "synthetic", "--log", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(proc, log, n, timeout=60):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if log.exists() and len(read_log(log)[0]) >= n:  # decisions, not the run header
            return
        if proc.poll() is not None:
            raise AssertionError(f"edge-pfm run exited early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("no decisions logged in time")


def test_sigkill_leaves_a_parseable_log(calibrated_bundle, tmp_path):
    log = tmp_path / "decisions.jsonl"
    proc = _start_run(calibrated_bundle, log)
    _wait_for_lines(proc, log, 30)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    records, bad = read_log(log)
    assert len(records) >= 30 and bad <= 1
    if bad:  # only the line being written can be partial
        assert not log.read_text().endswith("\n")
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    assert leftovers == []
    bundle_left = [p.name for p in calibrated_bundle.parent.rglob(".*") if p.name.endswith((".tmp", ".partial"))]
    assert bundle_left == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_shut_down_cleanly(calibrated_bundle, tmp_path, sig):
    log = tmp_path / "decisions.jsonl"
    proc = _start_run(calibrated_bundle, log)
    _wait_for_lines(proc, log, 10)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "pairs/s" in out and "p99" in out  # the summary
    records, bad = read_log(log)
    assert bad == 0 and len(records) >= 10


def test_killed_export_leaves_no_bundle(tiny_checkpoint, tmp_path):
    out = tmp_path / "bundle"
    proc = subprocess.Popen([sys.executable, "-m", "export", "--checkpoint", str(tiny_checkpoint), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
    t_end = time.monotonic() + 60
    while time.monotonic() < t_end and not list(tmp_path.glob(".bundle.*.partial")):
        time.sleep(0.05)
    time.sleep(0.5)  # inside the export, files half written
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not out.exists()
    # the next export cleans the dead writer's temp directory and completes
    ok = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                         "--parity-pairs", "8"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (out / "manifest.json").is_file() and list(tmp_path.glob(".bundle.*")) == []
