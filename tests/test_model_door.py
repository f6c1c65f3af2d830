"""The model door: the example team model (examples/their_pfm.py: BatchNorm, nn.TransformerEncoderLayer, a dict
output) with DDP-prefixed weights inside a dict -> a bundle with parity against the module; a state_dict that
does not fit exits 2, names the keys, writes nothing."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

MODEL = f"{ROOT}/examples/their_pfm.py:make_model"
SPEC = ROOT / "examples/their_pfm.spec.json"


@pytest.fixture(scope="module")
def their_weights(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import their_pfm
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    model = their_pfm.make_model(4, 16)
    out = tmp_path_factory.mktemp("their") / "their.pt"
    # how DDP training saves: a dict with the weights under "model", every key prefixed "module."
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, out)
    return out


def _door(weights, out):
    return subprocess.run([sys.executable, "-m", "export", "--model", MODEL, "--weights", str(weights), "--spec",
                           str(SPEC), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_their_module_becomes_a_bundle_with_parity_against_it(their_weights, tmp_path):
    from edge_pfm.bundle import Bundle
    from edge_pfm.classifier import Classifier
    from edge_pfm.synthetic import render_pair

    r = _door(their_weights, tmp_path / "b")
    assert r.returncode == 0, r.stderr[-3000:]
    b = Bundle.load(tmp_path / "b")
    m = b.manifest
    assert m["model"]["source"] == "user-model" and m["model"]["family"] == "their-pfm"
    assert m["parity"]["passed"] is True and m["parity"]["pairs"] == 64 and m["parity"]["max_abs_diff"] <= 1e-4
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["graph"]["op_census"].get("BatchNormalization") == 1  # the head's BatchNorm1d stays, allowed
    assert m["build_checks"]["model.onnx"]["tensorrt"].get("checked") in (True, False)
    scene = render_pair("lsil", 2, (640, 360))
    with Classifier(b, "onnxruntime") as clf:
        assert clf.classify(scene.white_light, scene.fluorescence).label in m["model"]["classes"]


def test_weights_that_do_not_fit_are_refused_with_the_keys(their_weights, tmp_path):
    state = torch.load(their_weights, weights_only=True)["model"]
    state.pop("module.head.0.weight")
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    r = _door(bad, tmp_path / "b")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "missing keys: head.0.weight" in r.stderr and str(bad) in r.stderr
    assert not (tmp_path / "b").exists()
