"""The paired dataset layout with masks, patients and splits (edge_pfm.dataset, export.splits): every problem listed
in one error before any work, bad input exits 2 and writes nothing; the grouped, stratified three-way split;
and a model trained on masks from images our own generator did not draw gets a lesion map measured on the test
split, which the runtime then shows. Real files, real training, real ONNX Runtime."""
import csv
import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import ROOT
from dataset_renderer import CLASSES, write_patients

from edge_pfm.dataset import DatasetError, PairedDataset
from export.splits import dataset_splits


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    return write_patients(tmp_path_factory.mktemp("patients") / "data", patients=24, visits=3, seed=1)


def _rewrite_labels(root, edit):
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = edit(rows)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _jpeg_mask(root):
    m = sorted((root / "masks").glob("p*.png"))[0]
    cv2.imwrite(str(m.with_suffix(".jpg")), cv2.imread(str(m), cv2.IMREAD_UNCHANGED))
    m.unlink()
    return m.with_suffix(".jpg").name


def _wrong_size_mask(root):
    m = sorted((root / "masks").glob("p*.png"))[1]
    cv2.imwrite(str(m), np.zeros((100, 100), np.uint8))
    return m.name


def _orphan_mask(root):
    cv2.imwrite(str(root / "masks" / "ghost.png"), np.zeros((360, 640), np.uint8))
    return "ghost.png"


def _unknown_label(root):
    _rewrite_labels(root, lambda rows: [{**r, "label": "cin3"} if i == 4 else r for i, r in enumerate(rows)])
    return "cin3"


def _partly_empty_group(root):
    _rewrite_labels(root, lambda rows: [{**r, "group": ""} if i in (2, 7) else r for i, r in enumerate(rows)])
    return "group column is empty for 2 of"


def _no_classes_txt(root):
    (root / "classes.txt").unlink()
    return "classes.txt"


@pytest.mark.parametrize("break_it", [_jpeg_mask, _wrong_size_mask, _orphan_mask, _unknown_label,
                                      _partly_empty_group, _no_classes_txt],
                         ids=["jpeg mask", "wrong-size mask", "mask without a pair", "unknown label",
                              "partly empty group", "labels without classes.txt"])
def test_bad_datasets_exit_2_list_the_files_and_write_nothing(patients, tmp_path, break_it):
    data = tmp_path / "data"
    shutil.copytree(patients, data)
    says = break_it(data)
    out = tmp_path / "c.pt"
    r = subprocess.run([sys.executable, "-m", "export.train", "--data", str(data), "--epochs", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert says in r.stderr and str(data) in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_one_error_lists_every_problem(patients, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(patients, data)
    found = [_orphan_mask(data), _unknown_label(data), _jpeg_mask(data), _wrong_size_mask(data)]
    (data / "fluorescence" / "p000_v0.png").unlink()
    with pytest.raises(DatasetError) as err:
        PairedDataset(data)
    for says in [*found, "p000_v0.png", "unpaired"]:
        assert says in str(err.value)


def test_grouped_split_keeps_patients_together_with_every_class_in_every_set(patients, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(patients, data)
    # the same pair under a second name joins its original's group
    shutil.copyfile(data / "white" / "p005_v1.png", data / "white" / "copy.png")
    shutil.copyfile(data / "fluorescence" / "p005_v1.png", data / "fluorescence" / "copy.png")
    _rewrite_labels(data, lambda rows: [*rows, {**rows[16], "sample": "copy", "group": "someone-else"}])
    ds = PairedDataset(data)
    for seed in (0, 1, 2):
        s = dataset_splits(ds, seed=seed)
        assert sorted(s.train + s.val + s.test) == list(range(len(ds)))
        side = {}
        for name in ("train", "val", "test"):
            assert {ds.samples[i].label for i in s.indices(name)} == set(range(len(CLASSES))), (seed, name)
            for i in s.indices(name):
                side.setdefault(ds.samples[i].group, set()).add(name)
        assert all(len(v) == 1 for v in side.values()), seed  # no patient on two sides
        names = {ds.samples[i].name: n for n in ("train", "val", "test") for i in s.indices(n)}
        assert names["copy"] == names["p005_v1"]  # identical content, one side
    assert dataset_splits(ds, seed=0) == dataset_splits(ds, seed=0)


def test_a_split_column_is_used_as_given_and_checked(tmp_path):
    split = {p: ("train", "train", "val", "test")[p // 4 % 4] for p in range(16)}
    data = write_patients(tmp_path / "data", patients=16, visits=2, seed=2, split_column=split)
    ds = PairedDataset(data)
    s = dataset_splits(ds)
    assert s.source == "labels.csv split column"
    assert [ds.samples[i].split for i in s.test] == ["test"] * len(s.test) and len(s.test) == 8
    # a patient on two sides is refused
    _rewrite_labels(data, lambda rows: [{**r, "split": "val"} if r["sample"] == "p000_v1" else r for r in rows])
    with pytest.raises(DatasetError, match="patient000"):
        dataset_splits(PairedDataset(data))


def test_a_class_missing_from_a_given_split_is_named(tmp_path):
    split = {p: "test" if p == 3 else ("train", "val", "test")[p % 3] for p in range(12)}
    split.update({p: "train" for p in range(12) if p % 4 == 3 and p != 3})  # hsil only in test, not in val
    data = write_patients(tmp_path / "data", patients=12, visits=1, seed=3, split_column=split)
    with pytest.raises(DatasetError, match=r"split 'val' has no sample of class\(es\) \['hsil'\]"):
        dataset_splits(PairedDataset(data))


def test_their_masks_train_a_lesion_map_measured_on_the_test_split_and_shown(tmp_path):
    """Acceptance: masks and patients from images edge_pfm.synthetic did not draw -> pfm_tiny with a map head,
    exported, calibrated with --data alone (train calibrates, test gates and measures), the map shown with its
    test-set Dice and pointing and their intervals."""
    split = {p: "test" if p % 5 in (1, 3) else "val" if p % 5 == 0 else "train" for p in range(100)}
    data = write_patients(tmp_path / "data", patients=100, visits=3, seed=4, split_column=split)
    ckpt, bundle = tmp_path / "c.pt", tmp_path / "bundle"
    run = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": 900}
    r = subprocess.run([sys.executable, "-m", "export.train", "--data", str(data), "--variant", "pfm_tiny", "--epochs",
                        "6", "--out", str(ckpt)], **run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test accuracy" in r.stderr
    r = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(ckpt), "--out", str(bundle)], **run)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((bundle / "manifest.json").read_text())
    training = m["provenance"]["training"]
    assert training["splits"]["test_samples"] == 120 and training["test"]["samples"] == 120
    assert "test split" in training["lesion_map"]["source"]
    assert [o["name"] for o in m["outputs"]] == ["logits", "lesion_map"]
    r = subprocess.run([sys.executable, "-m", "calibration", "--bundle", str(bundle), "--data", str(data),
                        "--allow-degraded"], **run)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((bundle / "accuracy.json").read_text())
    assert report["eval"]["source"].endswith("(test split)") and report["eval"]["samples"] == 120
    assert report["calibration"]["source"].endswith("(train split)")
    from edge_pfm.bundle import Bundle
    from edge_pfm.lesion import map_verdict

    verdict = map_verdict(Bundle.load(bundle), "fp32")
    assert verdict.shown, verdict.describe()
    fp32 = json.loads((bundle / "manifest.json").read_text())["outputs"][1]["measurements"]["fp32"]
    assert fp32["pairs"] >= 50 and "test split" in fp32["source"]
    assert fp32["dice"]["low"] <= fp32["dice"]["mean"] <= fp32["dice"]["high"]
    assert fp32["pointing"]["low"] <= fp32["pointing"]["rate"] <= fp32["pointing"]["high"]
