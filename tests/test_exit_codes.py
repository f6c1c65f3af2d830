"""One table of exit codes (edge_pfm.errors.ExitCode, from which the docs' table is generated), one test per code, through the real
commands in their own processes: one line on stderr, never a traceback. Code 6 (a camera lost past
camera_give_up_s) is serve's: tests/test_serve.py::test_a_camera_lost_past_give_up_exits_6_for_systemd_to_restart."""
import subprocess
import sys

import pytest
from conftest import ROOT, copy_bundle

from edge_pfm.errors import ExitCode


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _one_line_error(r: subprocess.CompletedProcess, word: str = "error") -> str:
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{word}: ")]
    assert lines, r.stderr[-3000:]
    return lines[0]


def test_the_docs_table_is_generated_from_the_codes_never_written_by_hand():
    page = (ROOT / "docs/reference/exit-codes.md").read_text()
    assert "<!-- generated: exit-codes -->" in page
    assert not any(line.startswith(f"| {int(code)} |") for code in ExitCode for line in page.splitlines())
    assert all(code.meaning for code in ExitCode)  # every code has its meaning for that table


def test_success(calibrated_bundle):
    assert _run("edge_pfm", "info", "--bundle", str(calibrated_bundle)).returncode == ExitCode.OK


@pytest.mark.parametrize("argv, says", [
    (("edge_pfm", "info", "--bundle", "/nonexistent/bundle"), "/nonexistent/bundle is not a directory"),
    (("calibration", "--bundle", "/nonexistent/bundle", "--synthetic", "8"), "/nonexistent/bundle"),
    (("export", "--checkpoint", "/nonexistent/c.pt", "--out", "/tmp/never"), "/nonexistent/c.pt does not exist"),
    (("export.train", "--synthetic", "8", "--variant", "pfm_huge", "--out", "/tmp/never.pt"), "unknown PFM variant"),
    (("edge_pfm", "run", "--bundle", "/nonexistent/bundle", "--white", "synthetic"), "give --white SRC and --fluo"),
])
def test_bad_input(argv, says):
    r = _run(*argv)
    assert r.returncode == ExitCode.BAD_INPUT and says in _one_line_error(r), r.stderr[-2000:]


def test_gate_refused(tiny_bundle, tmp_path):
    """64 held-out pairs cannot show 99 % agreement: refused, the bundle stays FP32."""
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    r = _run("calibration", "--bundle", str(b), "--synthetic", "32", "--val-synthetic", "0", "--eval-synthetic", "64", "--resolution", "320x240")
    assert r.returncode == ExitCode.GATE_REFUSED
    assert "INT8 accuracy gate failed" in _one_line_error(r, "refused") and not (b / "model.int8.onnx").exists()


@pytest.mark.parametrize("command", ["build", "run"])
def test_backend_unavailable(calibrated_bundle, command):
    extra = ["--white", "synthetic", "--fluo", "synthetic"] if command == "run" else []
    extra += ["--backend", "tensorrt"]
    r = _run("edge_pfm", command, "--bundle", str(calibrated_bundle), *extra)
    assert r.returncode == ExitCode.UNAVAILABLE and "TensorRT" in _one_line_error(r)


def test_a_bug_exits_1_with_its_traceback():
    """An unexpected exception is not an anticipated failure: run_command lets it through, so the command exits 1
    and the traceback names where it happened (what a bug report needs)."""
    r = subprocess.run([sys.executable, "-c", "import sys; from edge_pfm.errors import run_command; "
                        "sys.exit(run_command(lambda: {}['no such key']))"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == ExitCode.BUG
    assert "Traceback" in r.stderr and "KeyError: 'no such key'" in r.stderr


@pytest.mark.parametrize("argv, says", [(["missing.jsonl"], "missing.jsonl: no such decision log"),
                                        (["{log}", "99"], "holds 0 decisions; there is no decision 99")])
def test_the_log_reader_says_what_is_wrong_in_one_line(tmp_path, argv, says):
    log = tmp_path / "empty.jsonl"
    log.write_text("")
    r = _run("edge_pfm.decision_log", *[a.format(log=log) for a in argv])
    assert r.returncode == ExitCode.BAD_INPUT and says in _one_line_error(r)


def test_runtime_failure_on_a_full_disk(calibrated_bundle):
    """/dev/full: every write fails with ENOSPC, as on a full filesystem."""
    r = _run("edge_pfm", "run", "--bundle", str(calibrated_bundle), "--backend", "onnxruntime", "--white", "synthetic",
             "--fluo", "synthetic", "--seconds", "2", "--log", "/dev/full")
    assert r.returncode == ExitCode.RUNTIME_FAILURE
    assert "cannot write the decision log /dev/full: No space left on device" in _one_line_error(r)


def test_interrupted_calibration_exits_130_and_leaves_the_bundle_as_it_was(tiny_bundle, tmp_path):
    import signal

    b = copy_bundle(tiny_bundle, tmp_path / "b")
    before = sorted((p.name, p.read_bytes()) for p in b.iterdir() if p.is_file())
    proc = subprocess.Popen([sys.executable, "-m", "calibration", "--bundle", str(b), "--synthetic", "32", "--val-synthetic", "0",
                             "--eval-synthetic", "64", "--resolution", "320x240", "--allow-degraded"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True,  # a background job's children inherit SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:  # interrupt while the new artifacts are being written
        seen.append(line)
        if line.startswith("[4/6]"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(120) == ExitCode.INTERRUPTED, "".join(seen) + rest
    assert "Traceback" not in rest
    assert sorted((p.name, p.read_bytes()) for p in b.iterdir() if p.is_file()) == before
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp directory left beside it
