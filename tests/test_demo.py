"""make demo's code path, small: and when the INT8 gate refuses, the demo streams with FP32 and says so."""
from calibration.accuracy import GATE
from demo.__main__ import main as demo
from edge_pfm.decision_log import read_log


def test_demo_falls_back_to_fp32_when_int8_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(GATE, "int8_top1_agreement", 1.01)  # force a refusal
    out = tmp_path / "demo"
    rc = demo(["--out", str(out), "--pairs", "96", "--epochs", "1", "--seconds", "3", "--calib-pairs", "24",
               "--eval-pairs", "16", "--val-pairs", "16"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "refused this model" in text and "FP32" in text and "REFUSED" in text
    records, bad = read_log(out / "decisions.jsonl")
    assert bad == 0 and records and all("fp32" in r["backend"] for r in records)
    for name in ("annotated.avi", "latency_histogram.png", "confusion_runtime.png", "confusion_calibration.png",
                 "summary.json", "live_view_snapshot.jpg"):  # the live view, saved without a browser
        assert (out / name).stat().st_size > 0, name
    assert not (out / "bundle" / "model.int8.onnx").exists()
