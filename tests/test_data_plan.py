"""Which pairs do what in a calibration (calibration/data_plan.py): val never holds training pairs, --val and
--agreement-data need no labels, a team's unknown training data is said, options never abbreviate, the gate's
agreement is decided where --agreement-data says, and a recipe that met val by luck is caught by confirmation."""
from __future__ import annotations

import copy
import csv
import warnings

import numpy as np
import pytest

from calibration.__main__ import build_parser, plan_from_args
from calibration.accuracy import agreement_report, gate
from calibration.calibrate import CalibrationPlan
from calibration.data import PairReader, synthetic_pair_chunks, synthetic_pairs
from calibration.data_plan import pair_digest, plan_data
from calibration.mixed import ValSet, choose_recipe
from calibration.qdq import quantize_qdq
from edge_pfm.bundle import Bundle
from edge_pfm.synthetic import write_dataset
from export.quant_scheme import DEFAULT_QUANTIZED_OPS


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    write_dataset(root / "split", 60, seed=3, size=(96, 72), split=(0.6, 0.2, 0.2))
    write_dataset(root / "heldout", 12, seed=4, size=(96, 72))
    write_dataset(root / "recording", 16, seed=5, size=(96, 72))
    rows = list(csv.DictReader((root / "recording" / "labels.csv").open()))
    with (root / "recording" / "labels.csv").open("w", newline="") as f:  # a device recording: no labels
        w = csv.writer(f)
        w.writerow(["sample", "label"])
        w.writerows([r["sample"], ""] for r in rows)
    return root


def _digests(pairs) -> set[str]:
    return {pair_digest(p) for p in pairs}


def test_with_eval_the_split_column_keeps_val_off_the_training_pairs(tiny_bundle, datasets):
    data = datasets / "split"
    plan = plan_data(Bundle.load(tiny_bundle), CalibrationPlan(data=data, eval=datasets / "heldout"))
    assert plan.splits is not None and "val split" in plan.val.source and plan.eval_source == str(datasets / "heldout")
    val = _digests(p for chunk in plan.val.chunks() for p in chunk)
    assert val and not val & _digests(plan.calib)
    labels = {r["sample"]: r["split"] for r in csv.DictReader((data / "labels.csv").open())}
    assert len(plan.calib) == sum(s == "train" for s in labels.values()) and plan.val.n == sum(
        s == "val" for s in labels.values())


def test_with_eval_a_split_column_needs_no_test_split(tiny_bundle, datasets, tmp_path):
    import shutil

    data = shutil.copytree(datasets / "split", tmp_path / "train_val")
    rows = list(csv.DictReader((data / "labels.csv").open()))
    with (data / "labels.csv").open("w", newline="") as f:  # a team that keeps its test set elsewhere
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "split": "train" if r["split"] == "test" else r["split"]} for r in rows)
    plan = plan_data(Bundle.load(tiny_bundle), CalibrationPlan(data=data, eval=datasets / "heldout"))
    assert not plan.splits.test and "val split" in plan.val.source


def test_val_and_agreement_sets_need_no_labels(tiny_bundle, datasets):
    plan = plan_data(Bundle.load(tiny_bundle), CalibrationPlan(
        data=datasets / "split", eval=datasets / "heldout", val=datasets / "recording",
        agreement_data=datasets / "recording"))
    assert plan.val.n == 16 and "--val" in plan.val.source and plan.agreement.n == 16
    assert plan.gate_agreement_pairs == 16  # what the recipe's margin must predict
    assert plan.confirm is None and "cannot be halved" in plan.confirm_note  # 16 val pairs: none to spare


def test_a_team_model_without_a_training_record_is_said_to_be_unknown(tiny_bundle, datasets):
    b = Bundle.load(tiny_bundle)
    b.manifest = copy.deepcopy(b.manifest)
    b.manifest["provenance"]["training"] = {}  # what a team's ONNX door wrote before issue 39
    unsplit = datasets / "heldout"  # labelled, no split column
    with pytest.warns(UserWarning, match="does not record its training data.*--val DIR"):
        plan = plan_data(b, CalibrationPlan(data=unsplit, eval=datasets / "split"))
    assert "split` column" in plan.training_note
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit --val (and --eval): nothing is drawn from --data but ranges
        assert not plan_data(b, CalibrationPlan(data=unsplit, eval=datasets / "split",
                                                val=datasets / "recording")).training_note


def test_options_never_abbreviate_and_val_excludes_val_synthetic(datasets):
    ap = build_parser()
    base = ["--bundle", "b", "--data", str(datasets / "split")]
    with pytest.raises(SystemExit):
        ap.parse_args([*base, "--val-synth", "5"])  # a prefix is not an option
    with pytest.raises(SystemExit):
        ap.parse_args([*base, "--val", "d", "--val-synthetic", "5"])
    plan = plan_from_args(ap.parse_args([*base, "--val", "d", "--agreement-data", "r"]))
    assert (plan.val, plan.agreement_data, plan.val_synthetic) == ("d", "r", CalibrationPlan.val_synthetic)


def _results(agree: int, n: int) -> dict:
    ok = {"delta": 0.0, "ci95": [0.0, 0.0], "n": n, "lost": 0, "gained": 0, "mcnemar_p_loss": 1.0}
    return {"int8": {"agreement_ci95": [0.9, 1.0], "top1_agreement": agree / n, "disagreements": n - agree,
                     "samples": n, "recall_change": {"hsil": ok}, "accuracy_change": ok}}


def test_the_agreement_set_decides_the_agreement_criterion():
    held = _results(398, 400)  # 400 labelled pairs: 99.5 % cannot show a 99 % lower bound
    assert any("agreement" in r for r in gate(held, ("hsil",)))
    ref = np.zeros((3000, 4), np.float32)
    ref[:, 0] = 1
    int8 = ref.copy()
    int8[:9, 1] = 2  # 9 of 3000 differ: lower bound 99.43 %
    agreement = agreement_report({"fp32": ref, "int8": int8}, "recording")
    assert agreement["int8"]["disagreements"] == 9 and agreement["int8"]["agreement_ci95"][0] > 0.99
    assert gate(held, ("hsil",), agreement=agreement) == []
    int8[:60, 1] = 2  # 60 differ: refused, and the reason names the set
    reasons = gate(held, ("hsil",), agreement=agreement_report({"fp32": ref, "int8": int8}, "recording"))
    assert len(reasons) == 1 and "on recording" in reasons[0]


def test_the_noise_floor_perturbs_pixels_and_explains_a_refusal(tiny_bundle):
    """FP32 with Gaussian pixel noise really reads other pixels (more noise, more decisions change), and a refusal
    whose count FP32 itself exceeds under a grey level of noise says so."""
    from calibration.accuracy import evaluate_stream, noise_floor

    b = Bundle.load(tiny_bundle)
    pairs = synthetic_pairs(48, 3, (320, 240), b.classes)
    fp32 = b.model_path("fp32")
    logits, _ = evaluate_stream({"fp32": fp32, "calm": fp32, "loud": fp32}, [pairs], b.preprocessing, b.input_names,
                                progress=None, noise={"calm": 0.0, "loud": 80.0})
    assert np.array_equal(logits["calm"], logits["fp32"])  # no noise: the same logits
    assert np.abs(logits["loud"] - logits["fp32"]).max() > 1e-3
    floor = noise_floor({"fp32": logits["fp32"], "fp32_noise": logits["loud"], "int8": logits["fp32"]}, "pairs", 80.0)
    assert floor["samples"] == 48 and floor["int8_changed"] == 0
    ref = np.zeros((3000, 4), np.float32)
    ref[:, 0] = 1
    int8 = ref.copy()
    int8[:30, 1] = 2
    held = _results(398, 400)
    shaky = {"samples": 3000, "fp32_changed": 25, "sigma_grey_levels": 1.0}
    reasons = gate(held, ("hsil",), agreement=agreement_report({"fp32": ref, "int8": int8}, "rec"), floor_report=shaky)
    assert "FP32 itself changes 25 of 3000" in reasons[0]
    steady = {**shaky, "fp32_changed": 2}
    reasons = gate(held, ("hsil",), agreement=agreement_report({"fp32": ref, "int8": int8}, "rec"), floor_report=steady)
    assert "FP32 itself" not in reasons[0]


def test_a_recipe_that_met_val_by_luck_is_caught_by_confirmation(tiny_bundle, tmp_path):
    """A val set that is unrepresentative (one pair INT8 gets right, 64 times) passes full INT8; pairs the search
    never saw refuse it, and the search goes on to the fragile layer that costs it."""
    from test_int8_recipe import make_fragile

    b = Bundle.load(tiny_bundle)
    calib = synthetic_pairs(64, 1, (320, 240), b.classes)
    reader = PairReader(calib, b.preprocessing, b.input_names)
    path = tmp_path / "fragile.onnx"
    name = make_fragile(b.model_path("fp32"), path, [reader.feed(p) for p in calib[:16]])
    from calibration.ranges import compute_all_ranges

    ranges = compute_all_ranges(path, reader)
    confirm = ValSet(lambda: synthetic_pair_chunks(400, 7, (320, 240), classes=b.classes), 400, b.preprocessing,
                     b.input_names, path)
    full = quantize_qdq(path, ranges["percentile"], None)
    alone = confirm.score(quantize_qdq(path, ranges["percentile"], None, float_nodes=(name,)))
    margin = min(0.90, alone.lower - 0.005)
    assert confirm.score(full).lower < margin - 0.05  # full INT8 is far from the margin on representative pairs
    pairs = [p for chunk in synthetic_pair_chunks(400, 7, (320, 240), classes=b.classes) for p in chunk]
    lucky = next(p for p, agree in zip(pairs, _agrees(full, path, pairs, b)) if agree)
    val = ValSet(lambda: [[lucky] * 64], 64, b.preprocessing, b.input_names, path)
    assert val.score(full).agree == 64  # val alone would ship full INT8
    recipe = choose_recipe(path, ranges, DEFAULT_QUANTIZED_OPS, val, methods=["percentile"], margin=margin,
                           confirm=confirm)
    first = recipe.confirmations[0]
    assert first["recipe"].startswith("full INT8") and not first["met"]
    assert recipe.kind == "mixed" and name in recipe.float_layers and recipe.confirmations[-1]["met"]
    assert recipe.confirm.n == 400 and recipe.confirm.lower >= margin


def _agrees(qmodel, fp32, pairs, b) -> list[bool]:
    from calibration.accuracy import evaluate_stream

    logits, _ = evaluate_stream({"fp32": fp32, "int8": qmodel}, [pairs], b.preprocessing, b.input_names,
                                progress=None)
    return list(logits["fp32"].argmax(1) == logits["int8"].argmax(1))
