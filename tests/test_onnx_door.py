"""The ONNX door: a team's own ONNX (plain torch.onnx.export, legacy and dynamo, their names, their batch symbol)
plus a spec -> a bundle that everything downstream runs; each bad input exits 2, names what is wrong and writes
nothing. Real exports, real ONNX Runtime, real TensorRT-RTX builds."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

SPEC_OUTPUTS = {"logits": "scores", "lesion_map": {"name": "heat", "kind": "logits", "stride": 8}}


class TheirWrapper(torch.nn.Module):
    """How a team would export: their own forward, their own output names and order."""

    def __init__(self, model, use_fluo: bool = True):
        super().__init__()
        self.model, self.use_fluo = model, use_fluo

    def forward(self, white, fluo):
        return self.model.forward_multitask(white, fluo if self.use_fluo else white)


def _spec(meta, **changes) -> dict:
    spec = {"spec": "edge-pfm/model-spec v1", "classes": list(meta["classes"]),
            "inputs": {m: {"name": n, "channels": 3, "size": [128, 128], "mean": list(meta["preprocessing"][m].mean),
                           "std": list(meta["preprocessing"][m].std)}
                       for m, n in (("white_light", "white"), ("fluorescence", "fluo"))},
            "outputs": SPEC_OUTPUTS}
    spec.update(changes)
    return spec


def _export(model, path, dynamo: bool, batch_axes: bool = True, use_fluo: bool = True, opset: int = 17):
    x = (torch.randn(2, 3, 128, 128), torch.randn(2, 3, 128, 128))
    names = {"input_names": ["white", "fluo"], "output_names": ["scores", "heat"]}
    with torch.no_grad():
        if dynamo:
            b = torch.export.Dim("batch_size", min=1, max=64)
            torch.onnx.export(TheirWrapper(model, use_fluo).eval(), x, str(path), dynamo=True, **names,
                              dynamic_shapes=({0: b}, {0: b}))
        else:
            axes = {n: {0: "batch_size"} for n in ["white", "fluo", "scores", "heat"]} if batch_axes else None
            torch.onnx.export(TheirWrapper(model, use_fluo).eval(), x, str(path), dynamo=False, opset_version=opset,
                              dynamic_axes=axes, **names)
    return path


@pytest.fixture(scope="module")
def their_model(tiny_checkpoint):
    from export.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)


def _door(onnx_path, spec, out, *extra, block_torch: bool = False) -> subprocess.CompletedProcess:
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    argv = ["--onnx", str(onnx_path), "--spec", str(spec_path), "--out", str(out), *extra]
    block = "sys.modules['torch'] = None; " if block_torch else ""  # `import torch` now raises ImportError
    code = f"import runpy, sys; {block}sys.argv = ['export', *{argv!r}]; runpy.run_module('export', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_their_onnx_becomes_a_bundle_that_runs(their_model, tmp_path, dynamo):
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json

    from edge_pfm.bundle import Bundle
    from edge_pfm.classifier import Classifier
    from edge_pfm.synthetic import render_pair

    model, meta = their_model
    onnx_path = _export(model, tmp_path / "theirs.onnx", dynamo)
    # their reference: their framework's outputs on their inputs, in polygraphy's JSON
    feed = {"white": np.random.default_rng(1).standard_normal((3, 3, 128, 128)).astype(np.float32),
            "fluo": np.random.default_rng(2).standard_normal((3, 3, 128, 128)).astype(np.float32)}
    with torch.no_grad():
        logits, heat = TheirWrapper(model)(torch.from_numpy(feed["white"]), torch.from_numpy(feed["fluo"]))
    save_json([feed], str(tmp_path / "in.json"))
    results = RunResults()
    results.append(("pytorch", [{"scores": logits.numpy(), "heat": heat.numpy()}]))
    results.save(str(tmp_path / "out.json"))
    out = tmp_path / "bundle"
    r = _door(onnx_path, _spec(meta), out, "--reference-inputs", str(tmp_path / "in.json"), "--reference-outputs",
              str(tmp_path / "out.json"))
    assert r.returncode == 0, r.stderr[-3000:]
    b = Bundle.load(out)
    assert [i.name for i in b.inputs] == ["white_light", "fluorescence"] and [o.name for o in b.outputs] == [
        "logits", "lesion_map"]
    assert all(s.shape[0] == "batch" for s in b.inputs + b.outputs)
    assert b.manifest["provenance"]["source"] == "user-onnx" and b.manifest["parity"]["passed"] is True
    assert b.manifest["parity"]["max_abs_diff"] <= 1e-4 and b.manifest["parity"]["pairs"] == 3
    assert b.manifest["build_checks"]["model.onnx"]["onnx_checker"] == "full check passed"
    import onnx

    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["edge_pfm.spec"])["classes"] == list(meta["classes"])  # a loose model.onnx says how
    scene = render_pair("hsil", 3, (640, 360))
    with Classifier(b, "onnxruntime") as clf:
        got = clf.classify(scene.white_light, scene.fluorescence)
        assert got.label in meta["classes"]
        assert not clf.lesion_verdict.shown  # their map was never measured: off
    with torch.no_grad():  # the bundle's logits are their model's, through edge_pfm's preprocessing
        w, f = clf.preprocess(scene.white_light, scene.fluorescence)
        want = TheirWrapper(model)(torch.from_numpy(w), torch.from_numpy(f))[0].numpy()[0]
    assert np.abs(got.logits - want).max() < 1e-4


def test_without_references_the_manifest_says_so_and_no_torch_is_needed(their_model, tmp_path):
    model, meta = their_model
    r = _door(_export(model, tmp_path / "t.onnx", False), _spec(meta), tmp_path / "b", block_torch=True)
    assert r.returncode == 0, r.stderr[-3000:]
    parity = json.loads((tmp_path / "b" / "manifest.json").read_text())["parity"]
    assert parity["reference"] is None and "max_abs_diff" not in parity and "not checked" in parity["note"]
    # nobody recorded what it was trained on: synthetic scenes may not calibrate or measure it
    c = subprocess.run([sys.executable, "-m", "calibration", "--bundle", str(tmp_path / "b"), "--synthetic", "32", "--val-synthetic", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert c.returncode == 2 and "trained on data its manifest does not record" in c.stderr, c.stderr[-2000:]


@pytest.mark.parametrize("case, says", [
    ("spec missing a key", "outputs: missing"),
    ("input name not in the graph", "inputs.fluorescence.name 'fluorescence_image' is not an input of the graph"),
    ("model ignores an input", "exports without it (pytorch#64480)"),
    ("wrong class count", "but the spec names 3 classes"),
    ("fixed batch of 1", "has a fixed batch of 2"),
    ("op the parser rejects", "ops the TensorRT ONNX parser does not support: ['Hardmax']"),
])
def test_bad_input_exits_2_names_it_and_writes_nothing(their_model, tmp_path, case, says):
    import onnx
    from onnx import helper

    model, meta = their_model
    spec = _spec(meta)
    onnx_path = tmp_path / "t.onnx"
    if case == "model ignores an input":
        _export(model, onnx_path, False, use_fluo=False)
    elif case == "fixed batch of 1":
        _export(model, onnx_path, False, batch_axes=False)
    else:
        _export(model, onnx_path, False)
    if case == "spec missing a key":
        del spec["outputs"]
    elif case == "input name not in the graph":
        spec["inputs"]["fluorescence"]["name"] = "fluorescence_image"
    elif case == "wrong class count":
        spec["classes"] = spec["classes"][:3]
        spec["roles"] = {"no_lesion": "normal", "lesion": ["lsil"], "critical": ["lsil"]}
    elif case == "op the parser rejects":  # a Hardmax on the logits: ONNX has it, TensorRT's parser does not
        m = onnx.load(str(onnx_path))
        producer = next(n for n in m.graph.node if "scores" in n.output)
        producer.output[list(producer.output).index("scores")] = "scores_raw"
        m.graph.node.append(helper.make_node("Hardmax", ["scores_raw"], ["scores"], name="their/hardmax"))
        onnx.save(m, str(onnx_path))
    out = tmp_path / "bundle"
    r = _door(onnx_path, spec, out)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and says in r.stderr, r.stderr[-3000:]
    assert not out.exists() and not any(p.name.startswith(".bundle") for p in tmp_path.iterdir())
