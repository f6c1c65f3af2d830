"""A team's own model all the way: examples/their_pfm.py exported by plain torch.onnx.export (legacy and dynamo, no
hand edits) through the ONNX door, calibrated on their pairs in a process where torch cannot be imported, with
attention and MLP layers in Int8; and the preprocessing conformance check against their own pipeline's tensors
(passes as written, refuses a wrong spec field, names it, writes nothing). Real exports, real ONNX Runtime, real
TensorRT-RTX builds, real files."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, import_example

SPEC = ROOT / "examples/their_pfm.spec.json"


@pytest.fixture(scope="module")
def their_pfm():
    return import_example("their_pfm")


@pytest.fixture(scope="module")
def their_data(tmp_path_factory):
    from edge_pfm.synthetic import write_dataset

    root = tmp_path_factory.mktemp("their_data")
    return write_dataset(root / "data", 48, seed=21, size=(320, 240)), write_dataset(root / "heldout", 48, seed=22,
                                                                                       size=(320, 240))


@pytest.fixture(scope="module")
def their_weights(their_pfm, tmp_path_factory):
    torch.manual_seed(0)
    model = their_pfm.make_model(4, 16)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as after training
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    out = tmp_path_factory.mktemp("their_weights") / "their.pt"
    torch.save({"state_dict": model.state_dict()}, out)
    return out


def _run(module: str, *argv, block_torch: bool = False) -> subprocess.CompletedProcess:
    block = "sys.modules['torch'] = None; " if block_torch else ""  # `import torch` now raises ImportError
    code = (f"import runpy, sys; {block}sys.argv = [{module!r}, *{list(map(str, argv))!r}]; "
            f"runpy.run_module({module!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_their_plain_onnx_calibrates_without_torch_with_matmuls_in_int8(their_pfm, their_weights, their_data,
                                                                        their_tensors, tmp_path, dynamo):
    import onnx

    onnx_path = tmp_path / "their.onnx"  # their own export script, with PyTorch's outputs as references
    their_pfm.export_onnx(str(their_weights), str(onnx_path), dynamo, references=2)
    bundle = tmp_path / "bundle"
    r = _run("export", "--onnx", onnx_path, "--spec", SPEC, "--check-preprocessing", their_tensors, "--reference-inputs",
             tmp_path / "their.inputs.json", "--reference-outputs", tmp_path / "their.outputs.json", "--out", bundle,
             block_torch=True)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = json.loads((bundle / "manifest.json").read_text())
    assert exported["preprocessing_check"]["passed"] is True
    parity = exported["parity"]  # PyTorch's own outputs against ONNX Runtime on the bundle's graph
    assert parity["passed"] is True and parity["pairs"] == 4 and parity["max_abs_diff"] <= 1e-4, parity
    data, heldout = their_data
    c = _run("calibration", "--bundle", bundle, "--data", data, "--eval", heldout, "--allow-degraded",
             block_torch=True)
    assert c.returncode == 0, c.stderr[-3000:]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["calibration"]["quantized_ops"] == ["Conv", "MatMul", "Gemm"]
    q = onnx.load(str(bundle / "model.int8.onnx"))
    inits = {i.name: i for i in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    matmuls = [n for n in q.graph.node if n.op_type in ("MatMul", "Gemm")]
    dequantized = [n for n in matmuls if all(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
                                             for i in n.input[:2])]  # weights too: an int8 initializer through a DQ
    assert len(matmuls) >= 6 and len(dequantized) == len(matmuls)  # attention, MLP and head layers take int8 inputs
    assert not any(inits.get(n.input[1]) is not None for n in matmuls)
    build = m["build_checks"]["model.int8.onnx"]["tensorrt"]
    if build.get("checked"):  # TensorRT-RTX is installed (x86_64): the engine's own census
        census = build["compute_by_datatype"]
        assert census.get("Int8", 0) >= 0.7 * sum(census.values()), census  # the floor, conv + matmul layers
    report = json.loads((bundle / "accuracy.json").read_text())
    assert report["eval"]["samples"] == 48 and "int8" in report["results"]


@pytest.fixture(scope="module")
def their_bundle(their_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("their_bundle") / "bundle"
    r = _run("export", "--model", f"{ROOT}/examples/their_pfm.py:make_model", "--weights", their_weights, "--spec",
             SPEC, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def their_tensors(their_pfm, their_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("conformance") / "set"
    assert their_pfm.write_conformance(str(their_data[1]), str(out), 16) == 16
    return out


def test_their_own_pipeline_conforms_and_is_recorded(their_weights, their_tensors, tmp_path):
    out = tmp_path / "b"
    r = _run("export", "--model", f"{ROOT}/examples/their_pfm.py:make_model", "--weights", their_weights, "--spec",
             SPEC, "--check-preprocessing", their_tensors, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    check = json.loads((out / "manifest.json").read_text())["preprocessing_check"]
    assert check["passed"] and check["pairs"] == 16
    for stats in check["modalities"].values():  # below 4x the model's size ours is their one INTER_AREA step
        assert stats["mean_abs_grey_levels"] < 0.01 and stats["max_grey_levels"] < 0.01, stats
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "parity", "reference.fp32.npz",
                                                      "reference.inputs.npz", "report.json"]
    from edge_pfm.bundle import Bundle

    Bundle.load(out)  # the rewritten manifest still verifies every artifact


@pytest.mark.parametrize("field, value, says", [
    ("colour_order", "BGR", "set inputs.white_light.colour_order to 'RGB'"),
    ("crop_pct", 0.875, "set inputs.white_light.crop_pct to 1.0"),
    ("resize", "stretch", "set inputs.white_light.resize to 'center_crop'"),
])
def test_a_spec_field_that_does_not_match_their_pipeline_is_named(their_bundle, their_tensors, tmp_path, field, value,
                                                                  says):
    from export.preprocessing_check import check_preprocessing

    manifest = json.loads((their_bundle / "manifest.json").read_text())
    wrong = tmp_path / "bundle"
    import shutil

    shutil.copytree(their_bundle, wrong)
    manifest["inputs"][0]["preprocessing"][field] = value
    (wrong / "manifest.json").write_text(json.dumps(manifest))
    check = check_preprocessing(wrong, their_tensors)
    assert not check.passed and check.modalities["white_light"]["mean_abs_grey_levels"] > 2.0
    assert check.modalities["fluorescence"]["mean_abs_grey_levels"] <= 2.0
    assert any(says in a for a in check.advice), check.advice


def test_wrong_normalisation_is_fitted_from_their_tensors(their_bundle, their_tensors, tmp_path):
    from export.preprocessing_check import check_preprocessing

    manifest = json.loads((their_bundle / "manifest.json").read_text())
    wrong = tmp_path / "bundle"
    import shutil

    shutil.copytree(their_bundle, wrong)
    manifest["inputs"][1]["preprocessing"].update(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    (wrong / "manifest.json").write_text(json.dumps(manifest))
    check = check_preprocessing(wrong, their_tensors)
    assert not check.passed
    advice = " ".join(check.advice)
    assert "inputs.fluorescence.mean" in advice and "inputs.fluorescence.std" in advice
    fitted = json.loads(advice.split("inputs.fluorescence.std to ")[1].split(" in the spec")[0])
    assert np.allclose(fitted, 0.25, atol=0.02)  # their pipeline's std, read back from their tensors


def test_a_mismatch_beyond_the_bound_exits_2_and_writes_nothing(their_weights, their_tensors, tmp_path):
    spec = json.loads(SPEC.read_text())
    spec["inputs"]["white_light"]["colour_order"] = "BGR"
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "b"
    r = _run("export", "--model", f"{ROOT}/examples/their_pfm.py:make_model", "--weights", their_weights, "--spec",
             tmp_path / "spec.json", "--check-preprocessing", their_tensors, "--out", out)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "set inputs.white_light.colour_order to 'RGB' in the spec" in r.stderr and "Nothing was written" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]


def test_a_refused_check_leaves_the_bundle_already_there(their_bundle, their_weights, their_tensors, tmp_path):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(their_bundle, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    spec = json.loads(SPEC.read_text())
    spec["inputs"]["fluorescence"]["resize"] = "stretch"
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = _run("export", "--model", f"{ROOT}/examples/their_pfm.py:make_model", "--weights", their_weights,
             "--spec", tmp_path / "spec.json", "--check-preprocessing", their_tensors, "--out", out)
    assert r.returncode == 2 and "inputs.fluorescence.resize to 'center_crop'" in r.stderr, r.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial directory left


def test_a_conformance_set_without_tensors_names_the_file(their_bundle, their_tensors, tmp_path):
    import shutil

    from edge_pfm.errors import InvalidArgument
    from export.preprocessing_check import check_preprocessing

    partial = tmp_path / "set"
    shutil.copytree(their_tensors, partial)
    victim = sorted((partial / "tensors").iterdir())[3]
    victim.unlink()
    with pytest.raises(InvalidArgument, match=f"needs its tensors; missing: .*{victim.name}"):
        check_preprocessing(their_bundle, partial)


def test_a_crop_pct_bundle_is_schema_2_so_an_older_runtime_refuses_it(their_weights, tmp_path):
    from edge_pfm.bundle import Bundle

    spec = json.loads(SPEC.read_text())
    spec["inputs"]["white_light"]["crop_pct"] = 0.875
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = _run("export", "--model", f"{ROOT}/examples/their_pfm.py:make_model", "--weights", their_weights, "--spec",
             tmp_path / "spec.json", "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr[-3000:]
    b = Bundle.load(tmp_path / "b")
    assert b.manifest["schema_version"] == 2 and b.preprocessing["white_light"].crop_pct == 0.875
    assert b.preprocessing["fluorescence"].crop_pct == 1.0


# --- their trainer honours a split column; the bundle records what the model was trained on (issue 39) ---

@pytest.fixture(scope="module")
def their_split_data(tmp_path_factory):
    """48 pairs with a split column: 6 train, 3 val, 3 test of each class."""
    from edge_pfm.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("their_split") / "data", 48, seed=21, size=(320, 240),
                         split=(0.5, 0.25, 0.25))


def _train(data, out, *more) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "examples/their_pfm.py"), "--data", str(data), "--epochs", "2",
                           "--threads", "1", "--out", str(out), *more], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_their_trainer_trains_on_train_picks_on_val_and_never_reads_test(their_pfm, their_split_data, tmp_path):
    import csv
    import shutil

    data = tmp_path / "data"
    shutil.copytree(their_split_data, data)
    rows = list(csv.DictReader((data / "labels.csv").open()))
    test = [r["sample"] for r in rows if r["split"] == "test"]
    assert len(test) == 12 and sum(r["split"] == "train" for r in rows) == 24
    for name in test:  # a test pair read by the trainer would now end it with "unreadable image"
        for sub in ("white", "fluorescence"):
            (data / sub / f"{name}.png").write_bytes(b"not a png")
    r = _train(data, tmp_path / "w.pt")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(tmp_path / "w.pt", weights_only=True)
    t = ckpt["training"]
    assert t["split"] == "labels.csv split column" and t["samples"] == {"train": 24, "val": 12, "test_unread": 12}
    assert t["data"] == str(data.resolve()) and t["seed"] == 0 and t["threads"] == 1
    assert 1 <= ckpt["epoch"] <= t["epochs_run"] <= 2 and 0.0 <= ckpt["val_accuracy"] <= 1.0
    their_pfm.make_model(4, 16).load_state_dict(ckpt["state_dict"])  # what --model loads, strict
    assert "no split column" not in r.stderr


def test_their_trainer_without_a_split_column_says_so_and_keeps_the_best_val_checkpoint(their_pfm, their_data,
                                                                                        tmp_path):
    from edge_pfm.dataset import PairedDataset

    acc = their_pfm.train(str(their_data[0]), epochs=4, out=str(tmp_path / "w.pt"), seed=1, threads=1, patience=1)
    ckpt = torch.load(tmp_path / "w.pt", weights_only=True)
    t = ckpt["training"]
    assert t["split"].startswith("no split column: seeded (seed 1) stratified 80%/20%")
    assert t["samples"] == {"train": 40, "val": 8}  # 12 pairs a class: round(2.4) of each for val
    assert t["epochs_run"] - ckpt["epoch"] <= 1 and ckpt["val_accuracy"] == acc
    # the saved weights are the best epoch's: they give the recorded val accuracy again on the same val pairs
    ds = PairedDataset(their_data[0])
    _, val, _ = their_pfm.training_sets(ds, 1)
    w, f, y = their_pfm._tensors(ds, val)
    model = their_pfm.make_model(4, 16)
    model.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        again = float((model.eval()(w, f)["logits"].argmax(1) == y).float().mean())
    assert again == pytest.approx(acc)
    r = _train(their_data[0], tmp_path / "cli.pt", "--epochs", "1")
    assert r.returncode == 0 and "no split column: seeded (seed 0)" in r.stderr, r.stderr[-2000:]


@pytest.fixture(scope="module")
def their_legacy_onnx(their_pfm, their_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("their_onnx") / "their.onnx"
    their_pfm.export_onnx(str(their_weights), str(out), dynamo=False)
    return out


@pytest.mark.parametrize("door", ["model", "onnx"])
def test_the_bundle_records_the_training_split_or_says_it_is_unknown(door, their_weights, their_legacy_onnx,
                                                                     their_split_data, their_data, tmp_path):
    """The spec's training.data (relative to the spec's folder) names a dataset without a split column: the
    bundle says which pairs trained the model is unknown. --model adds --trained-on a split-column dataset,
    which wins: the split's digests, exactly what export.splits makes of it (the shape our checkpoints record
    and calibration reads). One export per door; the record itself is one function for both."""
    from edge_pfm.dataset import PairedDataset
    from export.splits import UNKNOWN_SPLIT, dataset_splits

    spec = json.loads(SPEC.read_text())
    (tmp_path / "specs").mkdir()
    (tmp_path / "their_data").symlink_to(their_data[0])
    spec["training"] = {"data": "../their_data"}
    (tmp_path / "specs/spec.json").write_text(json.dumps(spec))
    source = (["--model", f"{ROOT}/examples/their_pfm.py:make_model", "--weights", their_weights,
               "--trained-on", their_split_data] if door == "model" else ["--onnx", their_legacy_onnx])
    r = _run("export", *source, "--spec", tmp_path / "specs/spec.json", "--out", tmp_path / "b",
             block_torch=door == "onnx")
    assert r.returncode == 0, r.stderr[-3000:]
    training = json.loads((tmp_path / "b/manifest.json").read_text())["provenance"]["training"]
    if door == "model":
        want = dataset_splits(PairedDataset(their_split_data)).to_dict()
        assert training == {"data": str(their_split_data.resolve()), "splits": want, "declared_by": "--trained-on"}
        assert want["source"] == "labels.csv split column" and len(want["test_sha256"]) == 64
        assert (want["train_samples"], want["val_samples"], want["test_samples"]) == (24, 12, 12)
    else:
        assert training == {"data": str((tmp_path / "their_data").resolve()), "splits": None,
                            "note": UNKNOWN_SPLIT, "declared_by": "the spec's training.data"}


@pytest.mark.parametrize("door", ["model", "onnx"])
def test_a_missing_training_folder_exits_2_naming_it_and_writes_nothing(door, their_weights, their_legacy_onnx,
                                                                        tmp_path):
    source = (["--model", f"{ROOT}/examples/their_pfm.py:make_model", "--weights", their_weights] if door == "model"
              else ["--onnx", their_legacy_onnx])
    missing = tmp_path / "nowhere"
    r = _run("export", *source, "--spec", SPEC, "--trained-on", missing, "--out", tmp_path / "b",
             block_torch=door == "onnx")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"--trained-on {missing}" in r.stderr and "does not exist" in r.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("training, says", [
    ("data", "training: must be an object"),
    ({"path": "x"}, "training.path: unknown key"),
    ({"data": 3}, "training.data: must be the path"),
])
def test_a_bad_training_entry_in_the_spec_is_named(training, says):
    from export.model_spec import ModelSpec, SpecError

    spec = json.loads(SPEC.read_text())
    spec["training"] = training
    with pytest.raises(SpecError, match=says):
        ModelSpec.from_dict(spec, "spec.json")
