"""Fuzzing the two parsers that read files from outside: the bundle manifest and the calibration cache.
Random and mutated inputs must give our own clear exceptions, never a crash or a hang."""
import contextlib
import copy
import json
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibration.calib_cache import CalibrationCache, CalibrationCacheError
from edge_pfm.bundle import Bundle, BundleError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load(root, manifest_text: str):
    (root / "manifest.json").write_text(manifest_text)
    with contextlib.suppress(BundleError):
        Bundle.load(root)


@FUZZ
@given(value=JSON)
def test_random_manifests(tmp_path_factory, value):
    root = tmp_path_factory.mktemp("m")
    _load(root, json.dumps(value))


@FUZZ
@given(text=st.text(max_size=300))
def test_random_manifest_text(tmp_path_factory, text):
    _load(tmp_path_factory.mktemp("t"), text)


MUTATIONS = st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(["drop", "replace"]), JSON), min_size=1,
                     max_size=4)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(mutations=MUTATIONS)
def test_mutated_real_manifest(tiny_bundle, tmp_path_factory, mutations):
    root = tmp_path_factory.mktemp("b")
    shutil.copytree(tiny_bundle, root, dirs_exist_ok=True)
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    m = copy.deepcopy(manifest)
    for index, kind, value in mutations:
        paths = [p for p in _paths(m) if p]
        if not paths:
            break
        path = paths[index % len(paths)]
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        if kind == "drop" and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    _load(root, json.dumps(m))


@FUZZ
@given(text=st.text(max_size=400))
def test_random_cache_text(text):
    with contextlib.suppress(CalibrationCacheError):
        CalibrationCache.from_text(text)


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_cache_bytes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("c") / "calibration.cache"
    p.write_bytes(data)
    with contextlib.suppress(CalibrationCacheError):
        CalibrationCache.read(p)


@FUZZ
@given(pos=st.integers(0, 10_000), junk=st.text(min_size=1, max_size=8))
def test_mutated_real_cache(pos, junk):
    good = CalibrationCache(100300, "EntropyCalibration2", {"white_light": 2.5, "a/b:c": 1.0, "x": 0.01}).to_text()
    i = pos % len(good)
    text = good[:i] + junk + good[i + 1:]
    try:
        cache = CalibrationCache.from_text(text)
        assert all(v >= 0 for v in cache.amax.values())
    except CalibrationCacheError:
        pass


def test_known_awkward_manifest(tiny_bundle, tmp_path):
    shutil.copytree(tiny_bundle, tmp_path / "b")
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    m["inputs"].append(5)
    try:
        _load(tmp_path / "b", json.dumps(m))
    except Exception as exc:  # pragma: no cover - the assertion below explains
        raise AssertionError(f"leaked {type(exc).__name__}") from exc
