"""Verified on the device: per-precision references in the bundle, every engine checked before first use (a
subtle Q/DQ fault refused), the fastest checked precision measured and cached, engine identity, `selftest`.
Real ONNX Runtime sessions, real files; the timing test's backend is real ONNX Runtime with added delays."""
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import copy_bundle

from edge_pfm.backends import open_backend
from edge_pfm.backends.base import Backend
from edge_pfm.bundle import Bundle, write_manifest
from edge_pfm.engine.checks import EngineRefused
from edge_pfm.precision_pick import allowed, cached_pick, measure_pick
from edge_pfm.references import MIN_PAIRS, Figures, References, compare
from export.references import tolerance_for


def _rehash(b, *artifacts):
    """The bundle as a tampering build step leaves it: its artifacts re-hashed, so only the engine check can tell."""
    m = Bundle.load(b, verify=False).manifest
    write_manifest(b, m, {a: m["artifacts"][a].get("role", a) for a in artifacts})
    return b


def _scale_times_four(b, which: str) -> str:
    """One quantized layer's scale off by 4x in model.int8.onnx: `which` is "activation" (a QuantizeLinear's scale,
    shared with its DequantizeLinear: a 4x coarser grid) or "weight" (a weight's DequantizeLinear scale)."""
    import onnx
    from onnx import numpy_helper

    path = b / "model.int8.onnx"
    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    if which == "activation":
        scales = [n.input[1] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    else:
        scales = [n.input[1] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    name = scales[len(scales) // 2]  # a layer in the middle of the network
    inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) * np.float32(4), name))
    onnx.save_model(m, str(path))
    _rehash(b, "model.int8.onnx")
    return name


def test_every_bundle_carries_references(tiny_bundle, calibrated_bundle):
    exported = References(Bundle.load(tiny_bundle))
    assert set(exported.precisions) == {"fp32"} and len(exported.pixels["white_light"]) == MIN_PAIRS
    assert exported.pixels["white_light"].dtype == np.uint8
    refs = References(Bundle.load(calibrated_bundle))
    assert set(refs.precisions) == {"fp32", "fp16", "int8"} and refs.entry["pairs"] >= MIN_PAIRS
    assert "calibration pairs" in refs.entry["source"]
    for p in refs.precisions:
        out = refs.outputs(p)
        assert out["logits"].shape == (refs.entry["pairs"], len(refs.bundle.classes)) and "lesion_map" in out
        t = refs.tolerance(p)
        assert 0 < t.min_top1_agreement < 1 and 0 < t.max_prob_diff <= 1 and t.min_map_iou is not None
        # the tolerance is the documented rule applied to the basis recorded beside it
        basis = refs.precisions[p]
        rule = tolerance_for(Figures(**refs.entry["rounding"]), Figures(**basis["kernel_spread"]))
        assert t.to_dict() == pytest.approx(rule.to_dict(), rel=1e-3)  # the basis is recorded rounded to 1e-6
    # the INT8 model is further from FP32 than FP16 is; each precision's tolerance is measured, not shared
    assert compare(refs.outputs("fp32"), refs.outputs("int8")).logit_rmse > compare(
        refs.outputs("fp32"), refs.outputs("fp16")).logit_rmse


def test_reference_files_are_byte_reproducible(tmp_path):
    from export.references import _save_npz

    arrays = {"logits": np.arange(12, dtype=np.float32).reshape(3, 4)}
    _save_npz(tmp_path / "a.npz", arrays)
    time.sleep(1.1)  # numpy's own writer would stamp another time
    _save_npz(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["logits"], arrays["logits"])


@pytest.mark.parametrize("threads", [1, 2])
def test_a_correct_engine_passes_at_any_thread_count(calibrated_bundle, tmp_path, threads):
    for precision in ("fp32", "int8"):
        with open_backend(calibrated_bundle, "onnxruntime", precision, cache_dir=tmp_path, threads=threads) as b:
            assert b.check.passed, b.check.describe()
            assert b.check.figures.disagreements == 0 and b.check.figures.pairs >= MIN_PAIRS


def test_the_verdict_is_recorded_and_reused(calibrated_bundle, tmp_path):
    messages = []
    with open_backend(calibrated_bundle, "onnxruntime", "fp32", cache_dir=tmp_path, log=messages.append):
        pass
    assert any("before first use" in m for m in messages)
    records = list((tmp_path / "checks").glob("ort.fp32.*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["check"]["passed"] is True
    messages.clear()
    with open_backend(calibrated_bundle, "onnxruntime", "fp32", cache_dir=tmp_path, log=messages.append) as b:
        assert b.check.passed
    assert not any("before first use" in m for m in messages)  # taken from the record, not run again


def test_one_scale_off_by_four_is_refused_at_first_use(calibrated_bundle, tmp_path):
    b = copy_bundle(calibrated_bundle, tmp_path / "b")
    name = _scale_times_four(b, "weight")
    with pytest.raises(EngineRefused) as info:
        open_backend(b, "onnxruntime", "int8", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "refused" in msg and "logit RMSE" in msg and "max probability difference" in msg, (name, msg)
    assert not list((tmp_path / "cache").glob("checks/*.json"))  # the refused engine's verdict is not kept
    # the same bundle's FP32 model is untouched and still passes
    with open_backend(b, "onnxruntime", "fp32", cache_dir=tmp_path / "cache") as ok:
        assert ok.check.passed


class DelayedBackend(Backend):
    """Real ONNX Runtime outputs, with a fixed delay per call: a backend whose speed per precision the test sets."""

    name = "onnxruntime"

    def __init__(self, inner, delay_s: float):
        super().__init__(inner.bundle, inner.precision)
        self.inner, self.delay_s, self.check = inner, delay_s, inner.check

    def infer_outputs(self, white_light, fluorescence):
        time.sleep(self.delay_s)
        return self.inner.infer_outputs(white_light, fluorescence)

    def close(self):
        self.inner.close()
        super().close()


def _gate_passed_copy(calibrated_bundle, dst):
    """The calibrated bundle as if its INT8 gate had passed (the session model is too small for 2000 held-out pairs)."""
    b = copy_bundle(calibrated_bundle, dst)
    m = json.loads((b / "manifest.json").read_text())
    m["accuracy"]["gate_passed"] = True
    m["accuracy"]["gates"] = {"int8": True, "fp16": True}
    write_manifest(b, m, {})
    return Bundle.load(b)


# the delays dominate the models' own few milliseconds (INT8's Q/DQ graph runs ~1.5 ms faster than FP32 on ONNX
# Runtime since only layer inputs are quantized: at 10 vs 9.5 ms that alone crossed the 10 % line)
@pytest.mark.parametrize("fp32_ms,int8_ms,expected", [(20, 40, "fp32"), (50, 47.5, "fp32"), (50, 25, "int8")])
def test_auto_picks_int8_only_when_it_is_ten_percent_faster(calibrated_bundle, tmp_path, fp32_ms, int8_ms, expected):
    bundle = _gate_passed_copy(calibrated_bundle, tmp_path / "b")
    delays = {"fp32": fp32_ms / 1000, "int8": int8_ms / 1000}

    def opener(bundle, backend, precision):
        return DelayedBackend(open_backend(bundle, backend, precision, cache_dir=tmp_path / "cache"), delays[precision])

    pick = measure_pick(bundle, "onnxruntime", tmp_path / "cache", None, opener, windows=3, window_s=0.4)
    assert pick.pick == expected, pick.describe()
    assert {c.precision: c.allowed for c in pick.candidates} == {"fp32": True, "fp16": False, "int8": True}
    assert cached_pick(bundle, "onnxruntime", tmp_path / "cache").pick == expected
    # run, Classifier and bench read the cached pick
    with open_backend(bundle, "onnxruntime", None, cache_dir=tmp_path / "cache") as b:
        assert b.precision == expected and "measured on this device" in b.precision_reason


def test_an_allow_degraded_int8_is_never_picked(calibrated_bundle, tmp_path):
    bundle = Bundle.load(calibrated_bundle)
    assert bundle.manifest["accuracy"]["gate_passed"] is False  # calibrated with allow_degraded, gate refused
    ok, why = allowed(bundle, "int8", "onnxruntime")
    assert not ok and "--allow-degraded" in why

    def opener(bundle, backend, precision):  # INT8 would be far faster: it must not matter
        inner = open_backend(bundle, backend, precision, cache_dir=tmp_path / "cache")
        return DelayedBackend(inner, 0.01 if precision == "fp32" else 0.0)

    pick = measure_pick(bundle, "onnxruntime", tmp_path / "cache", None, opener, windows=3, window_s=0.1)
    assert pick.pick == "fp32"
    with open_backend(bundle, "onnxruntime", cache_dir=tmp_path / "other-cache") as b:
        assert b.precision == "fp32" and "until the fastest checked precision is measured" in b.precision_reason


def test_a_new_calibration_cache_gives_a_new_engine_key(calibrated_bundle, tmp_path):
    from edge_pfm.engine.plan import TrtCapabilities, plan_build
    from edge_pfm.engine.trt_build import engine_key

    b = copy_bundle(calibrated_bundle, tmp_path / "b")
    caps = TrtCapabilities((10, 3, 0), num_dla_cores=2, has_fp16_onnx=True)
    dla_cache = plan_build(caps, "int8", "cache", dla_core=0)
    qdq = plan_build(caps, "int8", "qdq")
    before = {p: engine_key(Bundle.load(b), p, "10.3.0", "Orin", "8.7", (1, 1, 1)) for p in (dla_cache, qdq)}
    text = (b / "calibration.cache").read_text().splitlines()
    name, _, value = text[1].partition(": ")
    text[1] = f"{name}: {int(value, 16) ^ 1:08x}"  # re-calibrated: one tensor's scale changed
    (b / "calibration.cache").write_text("\n".join(text) + "\n")
    after = {p: engine_key(_rehash(b, "calibration.cache") and Bundle.load(b), p, "10.3.0", "Orin", "8.7", (1, 1, 1))
             for p in (dla_cache, qdq)}
    assert after[dla_cache].digest() != before[dla_cache].digest()
    assert after[dla_cache].calibration_cache_sha256 == Bundle.load(b).sha256("calibration.cache")
    assert after[qdq] == before[qdq]  # explicit Q/DQ never reads the cache: its engine stays valid
    assert after[dla_cache].built_from(dla_cache.onnx_artifact) == {
        "model.onnx": Bundle.load(b).sha256("model.onnx"), "calibration.cache": Bundle.load(b).sha256("calibration.cache")}


def test_build_measures_info_shows_and_selftest_proves(calibrated_bundle, tmp_path):
    env_cache = ["--cache-dir", str(tmp_path / "cache")]
    r = subprocess.run([sys.executable, "-m", "edge_pfm", "build", "--bundle", str(calibrated_bundle), *env_cache],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "precision auto -> fp32" in r.stdout and "int8: not a candidate" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "edge_pfm", "selftest", "--bundle", str(calibrated_bundle), "--out",
                        str(tmp_path / "st"), "--seconds", "2", "--bench-seconds", "0.5", *env_cache],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((tmp_path / "st" / "selftest.json").read_text())
    assert report["passed"] and set(report["steps"]) == {"engines", "bench", "run"}
    assert report["steps"]["run"]["summary"]["pairs_inferred"] > 0
    text = (tmp_path / "st" / "selftest.txt").read_text()
    assert "PASS" in text and "fp32" in text and "against its reference" in text and "pick   fp32" in text


def test_selftest_fails_on_a_faulty_bundle(calibrated_bundle, tmp_path):
    from edge_pfm.selftest import selftest

    bundle = _gate_passed_copy(calibrated_bundle, tmp_path / "b")
    _scale_times_four(bundle.root, "weight")
    result = selftest(bundle.root, tmp_path / "st", "onnxruntime", seconds=1, bench_seconds=0.3,
                      cache_dir=tmp_path / "cache")
    assert not result.passed and "int8" in result.summary and "REFUSED" in result.summary, result.summary
    assert any(f.startswith("engines: refused by its check: int8") for f in result.report["failures"])


def test_the_decision_log_names_the_engine(calibrated_bundle, tmp_path):
    from edge_pfm.decision_log import read_log
    from edge_pfm.runtime import RunConfig, Runner
    from edge_pfm.sources.simulated.cameras import SceneBank, SyntheticSource

    bank = SceneBank((320, 240), seed=1, per_class=1)
    log = tmp_path / "d.jsonl"
    Runner(calibrated_bundle, SyntheticSource("white_light", bank, fps=30), SyntheticSource("fluorescence", bank, fps=30),
           config=RunConfig(backend="onnxruntime", precision="int8", log=str(log))).run(1.5)
    records, _ = read_log(log)
    b = Bundle.load(calibrated_bundle)
    assert records and all(r["engine"]["built_from"] == {"model.int8.onnx": b.sha256("model.int8.onnx")}
                           and r["engine"]["engine_sha256"] == b.sha256("model.int8.onnx") for r in records)


def test_a_bundle_without_references_is_refused_with_the_fix(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    del m["references"]
    for a in [a for a in m["artifacts"] if a.startswith("reference.")]:
        del m["artifacts"][a]
        (b / a).unlink()
    (b / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    with pytest.raises(Exception, match="carries no reference outputs.*re-export"):
        open_backend(b, "onnxruntime", "fp32", cache_dir=tmp_path / "cache")


def test_a_fixed_batch_engine_is_checked_in_padded_batches(calibrated_bundle):
    bundle = Bundle.load(calibrated_bundle)
    refs = References(bundle)
    with open_backend(bundle, "onnxruntime", "fp32", cache_dir=None) as b:
        one = refs.run(b.infer_outputs, 1)
        calls = []

        def fixed_batch_of_three(w, f):  # a DLA engine runs only its profile's one batch size
            assert w.shape[0] == 3 and f.shape[0] == 3
            calls.append(1)
            return b.infer_outputs(w, f)

        three = refs.run(fixed_batch_of_three, 3)
    n = refs.entry["pairs"]
    assert len(calls) == -(-n // 3) and three["logits"].shape == one["logits"].shape == (n, len(bundle.classes))
    np.testing.assert_allclose(three["logits"], one["logits"], atol=1e-4)


def test_a_refused_pick_falls_back_to_checked_fp32(calibrated_bundle, tmp_path):
    from edge_pfm.precision_pick import Candidate, PrecisionPick, device_identity, save_pick

    bundle = _gate_passed_copy(calibrated_bundle, tmp_path / "b")
    _scale_times_four(bundle.root, "weight")
    bundle = Bundle.load(bundle.root)
    # a pick measured before this device's engine went wrong (as when TensorRT is upgraded under a cached pick)
    pick = PrecisionPick("onnxruntime", device_identity("onnxruntime"), "int8",
                         [Candidate("fp32", True, "", 2.0, [2.0]), Candidate("int8", True, "", 1.0, [1.0])], "test")
    path = save_pick(bundle, pick, tmp_path / "cache")
    with open_backend(bundle, "onnxruntime", cache_dir=tmp_path / "cache") as b:
        assert b.precision == "fp32" and b.check.passed and "was refused by its check" in b.precision_reason
    assert not path.exists()  # the pick no longer holds
