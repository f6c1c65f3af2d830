"""Export: graph census in onnxruntime-quantization-test style, parity, bundle integrity, bad input."""
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import copy_bundle
from onnx import TensorProto, helper

from edge_pfm.bundle import Bundle, BundleError
from export import parity as parity_mod
from export.__main__ import main as export_main
from export.checkpoint import load_checkpoint
from export.onnx_graph import ExportError, check_graph, op_census


def check_op_type_count(proto, **expected):
    census = op_census(proto)
    for op, n in expected.items():
        assert census.get(op, 0) == n, f"{op}: expected {n}, got {census.get(op, 0)} in {dict(census)}"


def test_graph_census_and_symbolic_batch(tiny_bundle):
    proto = onnx.load(str(tiny_bundle / "model.onnx"))
    check_op_type_count(proto, ScatterND=0, BatchNormalization=0, LayerNormalization=3, Softmax=1, Resize=1)
    assert op_census(proto)["Split"] >= 5  # PConv: split + concat
    for value in [*proto.graph.input, *proto.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [i.name for i in proto.graph.input] == ["white_light", "fluorescence"]
    assert [o.name for o in proto.graph.output] == ["logits", "lesion_map"]
    assert [d.dim_value for d in proto.graph.output[1].type.tensor_type.shape.dim[1:]] == [1, 16, 16]  # static map
    lesion = json.loads((tiny_bundle / "manifest.json").read_text())["outputs"][1]
    assert lesion["shape"] == ["batch", 1, 16, 16] and lesion["stride"] == 8 and "crop" in lesion["frame_mapping"]
    assert proto.ir_version <= 13 and proto.opset_import[0].version == 17


@pytest.mark.parametrize("batch", [1, 4])
def test_onnxruntime_matches_pytorch(tiny_bundle, tiny_checkpoint, batch):
    model, _ = load_checkpoint(tiny_checkpoint)
    sess = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(batch)
    w, f = (rng.standard_normal((batch, 3, 128, 128)).astype(np.float32) for _ in range(2))
    got, got_map = sess.run(["logits", "lesion_map"], {"white_light": w, "fluorescence": f})
    with torch.inference_mode():
        ref, ref_map = model.forward_multitask(torch.from_numpy(w), torch.from_numpy(f))
    assert got.shape == (batch, 4) and got_map.shape == (batch, 1, 16, 16)
    assert np.abs(got - ref.numpy()).max() <= 1e-4
    assert np.abs(got_map - ref_map.sigmoid().numpy()).max() <= 1e-4


def test_parity_report_in_bundle(tiny_bundle):
    report = json.loads((tiny_bundle / "report.json").read_text())
    p = report["parity"]
    assert p["passed"] and p["pairs"] >= 64 and p["max_abs_diff"] <= 1e-4 and p["top1_agreement"] == 1.0
    assert p["lesion_map_max_abs_diff"] <= p["tolerance"]["lesion_map_max_abs_diff"]  # the map has its own bound
    assert 1 in p["batch_sizes"] and max(p["batch_sizes"]) > 1
    assert "PASS" in (tiny_bundle / "report.md").read_text()


def test_polygraphy_cli_one_line_parity(tiny_bundle, tmp_path):
    polygraphy = shutil.which("polygraphy") or str(__import__("pathlib").Path(sys.executable).parent / "polygraphy")
    cmd = [polygraphy, "run", str(tiny_bundle / "model.onnx"), "--onnxrt",
           "--load-inputs", str(tiny_bundle / "parity/inputs.json"),
           "--load-outputs", str(tiny_bundle / "parity/outputs.json"), "--atol", "1e-4", "--rtol", "1e-4"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "PASSED" in ok.stdout + ok.stderr
    # the same check against a different model must fail: it is a real comparison
    other = tmp_path / "other.onnx"
    proto = onnx.load(str(tiny_bundle / "model.onnx"))
    head = next(i for i in proto.graph.initializer if i.name.endswith("head.bias"))
    arr = onnx.numpy_helper.to_array(head) + 1.0
    head.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), head.name))
    onnx.save(proto, str(other))
    bad = subprocess.run([*cmd[:2], str(other), *cmd[3:]], capture_output=True, text=True)
    assert bad.returncode != 0


def test_bundle_load_verifies_and_exposes_contract(tiny_bundle):
    b = Bundle.load(tiny_bundle)
    assert b.classes == ("normal", "inflammation", "lsil", "hsil")
    assert b.preprocessing["white_light"].size == (128, 128)
    assert b.input_names == {"white_light": "white_light", "fluorescence": "fluorescence"}
    assert b.model_path("fp32").is_file()
    with pytest.raises(BundleError, match="run calibration first"):
        b.model_path("int8")
    assert "pfm_tiny" in b.summary()


def test_tampered_model_is_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    with open(b / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"model\.onnx: sha256 mismatch"):
        Bundle.load(b)


@pytest.mark.parametrize("mutate,match", [
    (lambda m: m.pop("inputs"), r"lacks required fields \['inputs'\]"),
    (lambda m: m.update(schema_version=99), "schema_version 99 is not supported"),
    (lambda m: m["model"].update(classes=["a", "b", "c"]), "does not match 3 classes"),
    (lambda m: m.update(schema="other"), "not an edge-pfm bundle"),
])
def test_bad_manifest_is_refused(tiny_bundle, tmp_path, mutate, match):
    b = copy_bundle(tiny_bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    mutate(m)
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=match):
        Bundle.load(b)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="manifest.json is missing"):
        Bundle.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(tmp_path)


def _tiny_graph(op: str, batch_dim="batch", **attrs):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 4])
    nodes = [helper.make_node(op, ["x"], ["y"], **attrs)]
    g = helper.make_graph(nodes, "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_check_graph_refuses_undeployable_graphs():
    assert check_graph(_tiny_graph("Relu"))["nodes"] == 1
    with pytest.raises(ExportError, match="not symbolic 'batch'"):
        check_graph(_tiny_graph("Relu", batch_dim=1))
    with pytest.raises(ExportError, match=r"does not support: \['Hardmax'\]"):
        check_graph(_tiny_graph("Hardmax"))
    idx = helper.make_tensor("i", TensorProto.INT64, [1, 1], [0])
    upd = helper.make_tensor("u", TensorProto.FLOAT, [1, 4], [0, 0, 0, 0])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    g = helper.make_graph([helper.make_node("ScatterND", ["x", "i", "u"], ["y"])], "g", [x], [y], [idx, upd])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    with pytest.raises(ExportError, match="ScatterND x1: in-place slice assignment"):
        check_graph(m)


def test_export_bad_inputs_leave_nothing(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert export_main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04garbage")
    assert export_main(["--checkpoint", str(garbage), "--out", str(out)]) == 2
    assert "not a loadable PyTorch checkpoint" in capsys.readouterr().err
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    for key, value, match in (("format", "other/v9", "format tag"), ("variant", "pfm_xl", "unknown variant")):
        bad = tmp_path / f"bad_{key}.pt"
        torch.save({**ckpt, key: value}, bad)
        assert export_main(["--checkpoint", str(bad), "--out", str(out)]) == 2
        assert match in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(blocker / "bundle")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_parity_gate_failure_leaves_no_bundle(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(parity_mod.TOLERANCE, "max_abs_diff", 0.0)  # any float difference now fails
    out = tmp_path / "bundle"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--parity-pairs", "8"]) == 2
    assert "parity gate failed" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_topological_sort_repairs_node_order(tiny_bundle):
    import random

    from export.onnx_graph import ExportError, topological_sort

    model = onnx.load(str(tiny_bundle / "model.onnx"))
    nodes = list(model.graph.node)
    random.Random(0).shuffle(nodes)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model, full_check=True)
    onnx.checker.check_model(topological_sort(model), full_check=True)
    model.graph.node[0].input.append("nobody_makes_this")
    with pytest.raises(ExportError, match="nobody_makes_this"):
        topological_sort(model)


def test_a_native_model_onnx_carries_its_spec(tiny_bundle):
    """Like a team's, a native bundle's spec is in the manifest and in model.onnx's metadata_props: a loose
    model.onnx still says how to feed it, and the spec reads back as the bundle's own contract."""
    from export.model_spec import SPEC_METADATA_KEY, ModelSpec

    proto = onnx.load(str(tiny_bundle / "model.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    raw = json.loads(props[SPEC_METADATA_KEY])
    b = Bundle.load(tiny_bundle)
    assert raw == b.manifest["spec"]
    spec = ModelSpec.from_dict(raw)
    assert spec.classes == tuple(b.classes) and spec.roles.to_dict() == b.manifest["model"]["roles"]
    assert spec.preprocessing == b.preprocessing
    assert (spec.lesion_map is not None) == ("lesion_map" in [o["name"] for o in b.manifest["outputs"]])
