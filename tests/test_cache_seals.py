"""The engine cache's records carry the device's seal (issue 41): a planted engine is rebuilt, an altered check
verdict is checked again, an altered precision pick is not trusted, another device secret trusts none of them, and
none of this is a refusal. Real TensorRT-RTX builds and real ONNX Runtime checks; bundles loaded under a Trust whose
state directory is the test's own."""
import hashlib
import json
import shutil
import stat

import pytest

from edge_pfm.backends import open_backend, select_backend
from edge_pfm.bundle import Bundle
from edge_pfm.engine.cache import EngineKey, cache_secret, check_engine, find_any_engine, seal_problem
from edge_pfm.engine.checks import JsonRecord
from edge_pfm.precision_pick import Candidate, PrecisionPick, cached_pick, device_identity, save_pick
from edge_pfm.trust import Trust

MISMATCH = "seal does not match"


def _bundle(path, state_dir) -> Bundle:
    return Bundle.load(path, trust=Trust(state_dir=state_dir, state_dir_configured=True))


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _sealed_here(path, bundle) -> bool:
    return seal_problem(json.loads(path.read_text()), cache_secret(bundle), path) is None


@pytest.fixture(scope="module")
def rtx_engine(calibrated_bundle, tmp_path_factory):
    """(bundle, engine path): one real FP32 engine built into a cache of this module's own (read it, copy to alter)."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx has wheels for x86-64 Linux and Windows only")
    from edge_pfm.engine.trt_build import ensure_engine

    root = tmp_path_factory.mktemp("seals")
    bundle = _bundle(calibrated_bundle, root / "state")
    return bundle, ensure_engine(bundle, "fp32", cache_dir=root / "cache", flavour="tensorrt_rtx", log=lambda m: None)


def _pick(precision: str = "fp32") -> PrecisionPick:
    return PrecisionPick("onnxruntime", device_identity("onnxruntime"), precision,
                         [Candidate("fp32", True, "", 2.0, [2.0])], "test")


def test_a_planted_engine_is_rebuilt(rtx_engine, tmp_path):
    from edge_pfm.engine.trt_build import ensure_engine

    bundle, built = rtx_engine
    cache = shutil.copytree(built.parent, tmp_path / "cache")
    engine, sidecar = cache / built.name, (cache / built.name).with_suffix(".json")
    planted = b"an engine someone else built" * 4096
    engine.write_bytes(planted)
    side = json.loads(sidecar.read_text())  # what an attacker who can write the cache does: the sidecar to match
    side.update(engine_sha256=hashlib.sha256(planted).hexdigest(), engine_bytes=len(planted))
    sidecar.write_text(json.dumps(side))
    messages: list[str] = []
    path = ensure_engine(bundle, "fp32", cache_dir=cache, flavour="tensorrt_rtx", log=messages.append)
    said = [m for m in messages if MISMATCH in m]
    assert len(said) == 1 and str(sidecar) in said[0] and said[0].startswith("building"), messages
    assert path == engine and engine.read_bytes() != planted and _sealed_here(sidecar, bundle)
    assert json.loads(sidecar.read_text())["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    # and the rebuilt engine is taken from the cache from now on
    assert ensure_engine(bundle, "fp32", cache_dir=cache, flavour="tensorrt_rtx", build=False) == engine


def test_an_altered_verdict_is_checked_again(calibrated_bundle, tmp_path):
    bundle, cache = _bundle(calibrated_bundle, tmp_path / "state"), tmp_path / "cache"
    with open_backend(bundle, "onnxruntime", "fp32", cache_dir=cache, log=lambda m: None):
        pass
    (record,) = (cache / "checks").glob("ort.fp32.*.json")
    rec = json.loads(record.read_text())
    pairs = rec["check"]["figures"]["pairs"]
    rec["check"]["figures"]["pairs"] = 10 * pairs  # a figure edited without the secret
    record.write_text(json.dumps(rec))
    messages: list[str] = []
    with open_backend(bundle, "onnxruntime", "fp32", cache_dir=cache, log=messages.append) as b:
        assert b.check.passed  # not refused: checked again
    said = [m for m in messages if MISMATCH in m]
    assert len(said) == 1 and str(record) in said[0] and any("before first use" in m for m in messages), messages
    assert _sealed_here(record, bundle) and json.loads(record.read_text())["check"]["figures"]["pairs"] == pairs


def test_an_altered_pick_is_not_trusted(calibrated_bundle, tmp_path):
    bundle, cache = _bundle(calibrated_bundle, tmp_path / "state"), tmp_path / "cache"
    path = save_pick(bundle, _pick("fp32"), cache)
    assert cached_pick(bundle, "onnxruntime", cache).pick == "fp32"
    rec = json.loads(path.read_text())
    rec["pick"]["pick"] = "int8"  # the gate refused INT8 for this bundle: a pick only an edit could make
    path.write_text(json.dumps(rec))
    messages: list[str] = []
    assert cached_pick(bundle, "onnxruntime", cache, log=messages.append) is None
    assert len(messages) == 1 and str(path) in messages[0] and MISMATCH in messages[0]
    sel = select_backend(bundle, "onnxruntime", cache_dir=cache)  # auto: as if nothing were measured
    assert sel.precision == "fp32" and "until the fastest checked precision is measured" in sel.precision_reason


def test_a_new_secret_trusts_no_record(rtx_engine, calibrated_bundle, tmp_path):
    bundle, engine = rtx_engine
    other = _bundle(calibrated_bundle, tmp_path / "other-state")  # another device, or its secret replaced
    side = json.loads(engine.with_suffix(".json").read_text())
    key = EngineKey(**{**side["key"], "profile": tuple(side["key"]["profile"])})
    assert check_engine(engine.parent, key, cache_secret(bundle)) == (engine, "ok")
    path, why = check_engine(engine.parent, key, cache_secret(other))  # what ensure_engine rebuilds on
    assert path is None and MISMATCH in why
    assert [e["sealed"] for e in find_any_engine(engine.parent, cache_secret(other))] == [False]
    cache = tmp_path / "cache"
    with open_backend(bundle, "onnxruntime", "fp32", cache_dir=cache, log=lambda m: None):
        pass
    messages: list[str] = []
    with open_backend(other, "onnxruntime", "fp32", cache_dir=cache, log=messages.append) as b:
        assert b.check.passed
    assert any(MISMATCH in m for m in messages) and any("before first use" in m for m in messages), messages
    save_pick(bundle, _pick("fp32"), cache)
    assert cached_pick(other, "onnxruntime", cache, log=lambda m: None) is None
    assert cached_pick(bundle, "onnxruntime", cache).pick == "fp32"


def test_the_cache_and_the_secret_are_owner_only(rtx_engine, calibrated_bundle, tmp_path):
    bundle, engine = rtx_engine
    assert _mode(engine.parent) == 0o700 and _mode(bundle.trust.state_dir / "cache.secret") == 0o600
    cache = tmp_path / "new" / "cache"
    JsonRecord(cache / "checks" / "ort.fp32.x.json", {"model": "x"}, cache_secret(bundle)).save({"passed": True})
    save_pick(bundle, _pick(), cache)
    assert [_mode(d) for d in (cache, cache / "checks", cache / "picks")] == [0o700] * 3


def test_what_the_seal_vouches_for_is_what_the_backend_must_read(rtx_engine, tmp_path):
    """TensorRTBackend deserialises only bytes whose sha256 equals sealed_engine_sha256 (it needs CUDA, so here the
    two halves: the sealed sha256 of a good engine, and none for a sidecar rewritten to match a planted engine)."""
    from edge_pfm.engine.cache import sealed_engine_sha256

    bundle, built = rtx_engine
    assert sealed_engine_sha256(built, cache_secret(bundle)) == hashlib.sha256(built.read_bytes()).hexdigest()
    cache = shutil.copytree(built.parent, tmp_path / "cache")
    sidecar = (cache / built.name).with_suffix(".json")
    side = json.loads(sidecar.read_text())
    side["engine_sha256"] = hashlib.sha256(b"planted").hexdigest()
    sidecar.write_text(json.dumps(side))
    assert sealed_engine_sha256(cache / built.name, cache_secret(bundle)) is None


def test_the_engine_is_built_from_the_verified_onnx_bytes(calibrated_bundle, tmp_path):
    """A model.onnx swapped after the bundle was loaded (and verified) is never parsed: the build refuses."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx has wheels for x86-64 Linux and Windows only")
    from edge_pfm.bundle import BundleError
    from edge_pfm.engine.trt_build import ensure_engine

    copy = shutil.copytree(calibrated_bundle, tmp_path / "b")
    bundle = _bundle(copy, tmp_path / "state")
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(BundleError, match="changed after the bundle was loaded"):
        ensure_engine(bundle, "fp32", cache_dir=tmp_path / "cache", flavour="tensorrt_rtx", log=lambda m: None)
    assert not list((tmp_path / "cache").glob("*.engine"))
