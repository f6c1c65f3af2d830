"""Bad artifacts through the device CLI: a clear error naming the file and the fix, non-zero exit."""
import json
import subprocess
import sys

import pytest
from conftest import copy_bundle

from edge_pfm.bundle import write_manifest


def _run(bundle):
    return subprocess.run([sys.executable, "-m", "edge_pfm", "run", "--bundle", str(bundle), "--backend",
                           "onnxruntime", "--precision", "fp32", "--white", "synthetic", "--fluo", "synthetic",
                           "--seconds", "1"], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("content", [b"", b"this is not onnx", None], ids=["empty", "text", "truncated"])
def test_broken_model_with_a_consistent_manifest(calibrated_bundle, tmp_path, content):
    """Someone rewrote model.onnx *and* its hash: loading still fails with a clear message."""
    b = copy_bundle(calibrated_bundle, tmp_path / "b")
    data = (b / "model.onnx").read_bytes()
    (b / "model.onnx").write_bytes(data[: len(data) // 3] if content is None else content)
    m = json.loads((b / "manifest.json").read_text())
    write_manifest(b, m, {"model.onnx": "fp32 onnx"})
    r = _run(b)
    assert r.returncode == 2
    assert "model.onnx" in r.stderr and "re-export" in r.stderr


def test_tampered_model_refused_before_loading(calibrated_bundle, tmp_path):
    b = copy_bundle(calibrated_bundle, tmp_path / "b")
    with open(b / "model.int8.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    r = _run(b)
    assert r.returncode == 2 and "model.int8.onnx: sha256 mismatch" in r.stderr


def test_manifest_with_unknown_class_count(calibrated_bundle, tmp_path):
    b = copy_bundle(calibrated_bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["model"]["classes"] = m["model"]["classes"][:3]
    (b / "manifest.json").write_text(json.dumps(m))
    r = _run(b)
    assert r.returncode == 2 and "does not match 3 classes" in r.stderr and "manifest.json" in r.stderr
